"""The checkpoint protocol, driven from the client: DCP's coordinator with shards as writers.

Saving: every shard snapshots its state and plans its part (``save_plan``), this process makes
DCP's global plan, the shards write their files in parallel straight from their actors
(``save_write``), and the commit (:func:`shardopt.checkpoint.commit`) comes last. Where the
shards cannot reach the path (an in-process ``memory://`` store), or for state this process
holds (LBFGS's gathered vectors), this process writes the parts itself.

Loading: the checkpoint is verified first, then every shard reads its own parameters' entries
and validates them (``prepare_load_from_checkpoint``), and all commit or none does.

Talks to: shards through :class:`~shardopt.client.handles.ShardHandle`; the format in
:mod:`shardopt.checkpoint`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from shardopt import checkpoint
from shardopt.checkpoint import SaveHandle
from shardopt.client.handles import ShardHandle
from shardopt.client.runtime import ray_get
from shardopt.core.buffers import pack_tree
from shardopt.core.param_groups import check_param_groups


def save(
    path: str | os.PathLike,
    groups: list[dict[str, Any]],
    blocking: bool,
    shards: Sequence[ShardHandle] = (),
    parts: Callable[[], Iterable[dict[int, Any]]] | None = None,
) -> SaveHandle:
    """Writes a checkpoint of ``groups`` (ids as strings) and the shards' state.

    Args:
        shards: the shards that hold state; they write their own files where they reach
            ``path``.
        parts: the state, one part at a time, for this process to write (where the shards do
            not reach ``path``, or for state held here).
    """
    where = checkpoint.location(path)
    checkpoint.make_dirs(where)
    for name in (checkpoint.METADATA, checkpoint.CHECKSUMS):  # an older one stops loading first
        checkpoint.remove(where, name)
    token = uuid.uuid4().hex
    if shards and checkpoint.shards_reach(where):
        plans = ray_get(
            [h.save_plan(token, where, groups if i == 0 else None) for i, h in enumerate(shards)]
        )
        global_plans, metadata, writer = checkpoint.coordinate(where, plans)
        ray_get([h.save_write(token, p) for h, p in zip(shards, global_plans)])

        def outcomes() -> list[Any]:
            return ray_get([h.save_wait(token) for h in shards])

        def poll() -> bool:
            return all(ray_get([h.save_done(token) for h in shards]))

    else:
        if parts is None:
            raise ValueError(f"the shards cannot reach {where} and no parts were given")
        saves = []
        for i, state in enumerate(parts()):
            tree: dict[str, Any] = {"state": {str(pid): v for pid, v in state.items()}}
            if i == 0:
                tree["param_groups"] = groups
            saves.append(checkpoint.ShardSave(where, tree, is_coordinator=i == 0))
        if not saves:
            saves.append(checkpoint.ShardSave(where, {"state": {}, "param_groups": groups}, True))
        global_plans, metadata, writer = checkpoint.coordinate(
            where, [save_part.local_plan() for save_part in saves]
        )
        for save_part, plan in zip(saves, global_plans):
            save_part.start_writing(plan)

        def outcomes() -> list[Any]:
            return [save_part.wait() for save_part in saves]

        def poll() -> bool:
            return all(save_part.done() for save_part in saves)

    def finish() -> None:
        checkpoint.commit(where, writer, metadata, outcomes())

    handle = SaveHandle(poll, finish)
    if blocking:
        handle.wait()
    return handle


def read_groups(
    path: str | os.PathLike, current_groups: list[dict[str, Any]], num_params: int
) -> tuple[str, list[dict[str, Any]]]:
    """Verifies a checkpoint and checks its param groups against ``current_groups``.

    Returns:
        Where it is, and its groups (integer ids).

    Raises:
        FileNotFoundError: no committed checkpoint, or a missing data file.
        ValueError: a corrupted file, or a checkpoint of other parameters.
    """
    where = checkpoint.location(path)
    checkpoint.verify(where)
    saved_groups = check_param_groups(current_groups, checkpoint.read_param_groups(where))
    expected = [str(i) for i in range(num_params)]
    if [str(p) for g in saved_groups for p in g["params"]] != expected:
        raise ValueError(f"{where} was not written by shardopt (unexpected parameter ids)")
    for group in saved_groups:
        group["params"] = [int(p) for p in group["params"]]
    return where, saved_groups


def prepare_on_shards(
    where: str,
    token: str,
    options: tuple[dict[str, Any], ...],
    shards: Sequence[ShardHandle],
    ids_of: Callable[[int], list[int]],
) -> list[tuple[Exception | None, tuple[int, ...]]]:
    """Phase one of a checkpoint load: each shard reads (or is sent) and validates its part.

    Returns:
        Each shard's verdict (the exception that rejected its part, or None) and the ids it
        found state for.
    """
    if checkpoint.shards_reach(where):  # each shard reads its own parameters' state
        return ray_get([h.prepare_load_from_checkpoint(token, options, where) for h in shards])
    answers = []  # an in-process store: read here, one shard's part at a time
    for h in shards:
        state = checkpoint.read_params_state(where, ids_of(h.index))
        error = ray_get(h.prepare_load(token, options, pack_tree(state)))
        answers.append((error, tuple(state)))
    return answers
