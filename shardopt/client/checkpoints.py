"""The checkpoint protocol, driven from the client: DCP's coordinator with shards as writers.

Saving: the location is locked against other saves, every shard snapshots its state and plans
its part (``save_plan``), this process makes DCP's global plan (a data file name of its own for
this save), the shards write their files in parallel straight from their actors
(``save_write``) to the store (a directory they all reach, or an object store:
:mod:`shardopt.checkpoint.storage`), and the commit (:func:`shardopt.checkpoint.commit.commit`)
comes last. Where the shards cannot reach the path (an in-process ``memory://`` store), or for
state this process holds (LBFGS's gathered vectors), this process writes the parts itself. A
save that fails waits for every writer to stop, then removes what it wrote; the checkpoint it
was replacing loads as it was.

Loading: the commit record (and its signature, with a key) is checked before anything is
unpickled, then every shard reads its own parameters' entries against that record and validates
them (``prepare_load_from_checkpoint``), and all commit or none does.

Talks to: shards through :class:`~shardopt.client.handles.ShardHandle`; the format in
:mod:`shardopt.checkpoint`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from shardopt.checkpoint import commit as committing
from shardopt.checkpoint import format as checkpoint
from shardopt.checkpoint import integrity, storage
from shardopt.checkpoint.format import SaveHandle
from shardopt.checkpoint.integrity import Commit
from shardopt.client.handles import ShardHandle
from shardopt.client.runtime import ray_get, settle
from shardopt.client.shard_map import ShardMap
from shardopt.core.buffers import pack_tree
from shardopt.core.events import emit
from shardopt.core.metrics import CHECKPOINT_BYTES, CHECKPOINT_SECONDS
from shardopt.core.param_groups import check_param_groups

logger = logging.getLogger(__name__)


def save(
    path: str,
    groups: list[dict[str, Any]],
    blocking: bool,
    key: bytes | None = None,
    shards: Sequence[ShardHandle] = (),
    parts: Callable[[], Iterable[dict[int, Any]]] | None = None,
) -> SaveHandle:
    """Writes a checkpoint of ``groups`` (ids as strings) and the shards' state.

    Args:
        key: an HMAC key that signs the commit record (None: unsigned).
        shards: the shards that hold state; they write their own files where they reach
            ``path``.
        parts: the state, one part at a time, for this process to write (where the shards do
            not reach ``path``, or for state held here).

    Raises:
        CheckpointInUseError: another save to ``path`` is in progress.
    """
    where = storage.location(path)
    store = storage.store_at(where)
    if key is not None:
        integrity.check_key(key)
    store.prepare()
    lock = committing.SaveLock(where)
    save_id = uuid.uuid4().hex[:12]
    token = uuid.uuid4().hex
    writing: list[ShardHandle] = []  # shards that may be writing: settled before an abort
    try:
        if shards and store.shards_reach:  # each shard writes its own file
            plans = ray_get(
                [
                    h.save_plan(token, where, groups if i == 0 else None)
                    for i, h in enumerate(shards)
                ]
            )
            global_plans, metadata = checkpoint.coordinate(plans, save_id)
            writing = list(shards)
            ray_get([h.save_write(token, p) for h, p in zip(shards, global_plans)])

            def outcomes() -> list[Any]:
                waits = [h.save_wait(token) for h in shards]
                try:
                    return ray_get(waits)
                except BaseException:
                    settle(waits)  # no shard still writing when the abort removes its files
                    raise

            def poll() -> bool:
                return all(ray_get([h.save_done(token) for h in shards]))

        else:  # an in-process store (memory://), or state held here: this process writes
            if parts is None:
                raise ValueError(f"the shards cannot reach {where} and no parts were given")
            saves = []
            for i, state in enumerate(parts()):
                tree: dict[str, Any] = {"state": {str(pid): v for pid, v in state.items()}}
                if i == 0:
                    tree["param_groups"] = groups
                saves.append(checkpoint.ShardSave(where, tree, is_coordinator=i == 0))
            if not saves:
                tree = {"state": {}, "param_groups": groups}
                saves.append(checkpoint.ShardSave(where, tree, is_coordinator=True))
            global_plans, metadata = checkpoint.coordinate(
                [part.local_plan() for part in saves], save_id
            )
            for part, plan in zip(saves, global_plans):
                part.start_writing(plan)

            def outcomes() -> list[Any]:
                settled = []
                for part in saves:  # every write ends before a failure aborts the save
                    try:
                        settled.append(part.wait())
                    except BaseException as exc:
                        settled.append(exc)
                for outcome in settled:
                    if isinstance(outcome, BaseException):
                        raise outcome
                return settled

            def poll() -> bool:
                return all(part.done() for part in saves)

    except BaseException:
        settle([h.save_wait(token) for h in writing])
        committing.abort(where, save_id)
        lock.release()
        raise

    def finish() -> Commit:
        try:
            return committing.commit(where, metadata, outcomes(), key, save_id, lock.exclusive)
        except BaseException:
            committing.abort(where, save_id)
            raise
        finally:
            lock.release()

    handle = SaveHandle(poll, finish)
    if blocking:
        handle.wait()
    return handle


def read_groups(
    path: str, current_groups: list[dict[str, Any]], num_params: int, key: bytes | None = None
) -> tuple[Commit, list[dict[str, Any]]]:
    """Checks a checkpoint's commit (and signature) and its param groups against
    ``current_groups``, before anything else is read.

    Returns:
        The checked commit, and its groups (integer ids).

    Raises:
        FileNotFoundError: no committed checkpoint, or a missing data file.
        ValueError: a corrupted or changed file, a missing or wrong signature (with ``key``),
            metadata that is not DCP's, or a checkpoint of other parameters.
    """
    where = storage.location(path)
    commit = integrity.read_commit(where, key)
    integrity.check_files(commit, full=False)  # a missing or cut file fails before any shard
    saved_groups = check_param_groups(current_groups, checkpoint.read_param_groups(commit))
    expected = [str(i) for i in range(num_params)]
    if [str(p) for g in saved_groups for p in g["params"]] != expected:
        raise ValueError(f"{where} was not written by shardopt (unexpected parameter ids)")
    for group in saved_groups:
        group["params"] = [int(p) for p in group["params"]]
    return commit, saved_groups


def prepare_on_shards(
    commit: Commit,
    token: str,
    options: tuple[dict[str, Any], ...],
    shards: Sequence[ShardHandle],
    shard_map: ShardMap,
) -> list[tuple[Exception | None, tuple[int, ...]]]:
    """Phase one of a checkpoint load: each shard reads (or is sent) and validates its part.

    Returns:
        Each shard's verdict (the exception that rejected its part, or None) and the ids it
        found state for.
    """
    if storage.store_at(commit.where).shards_reach:  # each shard reads its own parameters' state
        return ray_get([h.prepare_load_from_checkpoint(token, options, commit) for h in shards])
    answers = []  # an in-process store: read here, one shard's part at a time
    for h in shards:
        ids, rows = shard_map.ids_of(h.index), shard_map.row_ranges(h.index)
        state = checkpoint.read_params_state(commit, ids, rows)
        error = ray_get(h.prepare_load(token, options, pack_tree(state)))
        answers.append((error, tuple(state)))
    return answers


def checkpoint_done(operation: str, path: str, start: float, commit: Any) -> None:
    """Counts a committed save or a load, and logs it as one event line."""
    seconds = time.perf_counter() - start
    CHECKPOINT_SECONDS.labels(operation).observe(seconds)
    fields: dict[str, Any] = {"path": path, "seconds": seconds}
    if commit is not None:  # what the commit record lists (over gRPC, the gateway counts)
        nbytes = sum(entry["size"] for entry in commit.files.values())
        CHECKPOINT_BYTES.labels(operation).inc(nbytes)
        fields.update(files=len(commit.files), bytes=nbytes, signed=commit.signature_key_id)
    emit(logger, "checkpoint_committed" if operation == "save" else "checkpoint_loaded", **fields)
