"""Sharded checkpoints in torch.distributed.checkpoint (DCP) format, written by the shards.

A checkpoint is a DCP directory (or an object store prefix: :mod:`shardopt.checkpoint.storage`):
one data file per shard (``__{i}_{save}_0.distcp``, with a name of its own for every save),
written by that shard in parallel straight from its actor; a commit record (the SHA-256 of
``.metadata`` and of every slice of every data file, signed when the saver has a key:
:mod:`shardopt.checkpoint.integrity`); and DCP's ``.metadata``, written last: the commit. The
proxy plays DCP's coordinator (local plans -> global plan -> per-shard writes -> metadata), so
plain PyTorch reads it:
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(path, "opt.pt")`` gives a
torch.optim state dict (it unpickles with plain ``pickle``: only for checkpoints you trust;
:func:`export` is the safe route). DCP turns dict keys into strings, so the parameter ids are
stored as strings in both ``state`` and each group's ``params``; torch.optim's
``load_state_dict`` only matches the two, so the converted file loads into
``torch.optim.<Name>`` as it is.

A save holds a lock on the location (:class:`shardopt.checkpoint.commit.SaveLock`) from before
its first write until its commit: a second save there fails with
:class:`~shardopt.core.errors.CheckpointInUseError` (on an object store, one from the same
process; see :mod:`shardopt.checkpoint.commit`). Until the commit, the checkpoint the save
replaces loads as it was; after it, that checkpoint's files are removed. A load reads
``.metadata`` once and checks every slice it reads against the record those bytes name: it sees
one whole checkpoint or fails.

Loading reshards online: each shard reads only its own parameters' entries, validates them with
the same all-or-nothing prepare/commit as ``load_state_dict``. Nothing is unpickled but with an
allowlist (``.metadata``) or ``torch.load``'s ``weights_only`` (values).

Owns the format and its pieces: the shard side (:class:`ShardSave`, :func:`read_params_state`),
the coordinator's step (:func:`coordinate`) and the reader's checks (:func:`verify`);
:mod:`shardopt.client.checkpoints` drives the protocol from the client.

Talks to: the checkpoint's store (:mod:`shardopt.checkpoint.storage`, whose DCP writer the
shards write with), and :mod:`shardopt.checkpoint.integrity` for everything it reads back.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
    _EmptyStateDictLoadPlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import _create_read_items
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from shardopt.checkpoint import integrity
from shardopt.checkpoint.integrity import Commit, VerifyingReader
from shardopt.checkpoint.storage import digests_written, location, store_at
from shardopt.core.plan import RowRange

# ----- shard side -------------------------------------------------------------------------------


class ShardSave:
    """One shard's part of a save: a snapshot of its state, DCP's planner and writer for it."""

    def __init__(self, where: str, state: dict[str, Any], is_coordinator: bool):
        self.where = where
        self.store = store_at(where)
        self.writer = self.store.writer()
        self.writer.set_up_storage_writer(is_coordinator)
        self.planner = DefaultSavePlanner()
        self.planner.set_up_planner(state, None, is_coordinator)
        self._thread: threading.Thread | None = None
        self._outcome: Any = None

    def local_plan(self) -> Any:
        # not the writer's prepare_local_plan, which warns about the committed checkpoint this
        # save replaces (it stays loadable until the commit)
        self.store.prepare()
        return self.planner.create_local_plan()

    def start_writing(self, plan: Any) -> None:
        """Writes this shard's data file in a thread: the shard keeps serving steps meanwhile."""

        def write() -> None:
            try:
                final = self.planner.finish_plan(plan)
                results = self.writer.write_data(final, self.planner).wait()
                slices: dict[str, list[tuple[int, int]]] = {}
                for result in results:
                    info = result.storage_data
                    slices.setdefault(info.relative_path, []).append((info.offset, info.length))
                digests = {
                    f: integrity.digest_file(self.where, f, s, digests_written(self.writer, f))
                    for f, s in slices.items()
                }
                self._outcome = (results, digests)
            except BaseException as exc:  # reported to the proxy by wait()
                self._outcome = exc

        self._thread = threading.Thread(target=write, name="shardopt-save", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def wait(self) -> tuple[list[Any], dict[str, dict[str, Any]]]:
        """DCP's write results and the record entries (digests) of the files written."""
        assert self._thread is not None
        self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome


def snapshot(value: Any, piece: RowRange | None = None) -> Any:
    """A deep copy of a state tree with tensors cloned to CPU (the state as of the save call).

    Args:
        piece: for the state of a parameter split across shards, the rows this shard holds:
            its tensors shaped like the piece are written as those rows of the whole tensor
            (DCP chunks with offsets), so a reader sees whole tensors.
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu", copy=True)
        if piece is not None and tensor.dim() and tensor.shape[0] == piece.stop - piece.start:
            _write_as_rows(tensor, piece)
        return tensor
    if isinstance(value, dict):
        return {k: snapshot(v, piece) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v, piece) for v in value)
    return value


def _chunk(piece: RowRange, tensor: torch.Tensor) -> ChunkStorageMetadata:
    """The chunk of the whole tensor that ``tensor`` (the rows ``piece`` of it) is."""
    offsets = torch.Size([piece.start] + [0] * (tensor.dim() - 1))
    return ChunkStorageMetadata(offsets=offsets, sizes=tensor.size())


def _write_as_rows(tensor: torch.Tensor, piece: RowRange) -> None:
    """Makes DCP's planner write ``tensor`` as a chunk (rows of a whole tensor), through the
    checkpointable hooks DCP looks for (as DTensor does)."""
    chunk = _chunk(piece, tensor)

    def write_items(fqn: str, obj: Any) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, chunk.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=chunk,
                    properties=TensorProperties.create_from_tensor(tensor),
                    size=torch.Size([piece.rows, *tensor.shape[1:]]),
                ),
            )
        ]

    tensor.__create_write_items__ = write_items
    tensor.__get_tensor_shard__ = lambda index: tensor


def _read_as_rows(size: torch.Size, dtype: torch.dtype, piece: RowRange) -> torch.Tensor:
    """An empty tensor for rows of a saved whole tensor: DCP reads only what overlaps them."""
    tensor = torch.empty((piece.stop - piece.start, *size[1:]), dtype=dtype)
    chunk = _chunk(piece, tensor)
    tensor.__create_chunk_list__ = lambda: [chunk]
    tensor.__get_tensor_shard__ = lambda index: tensor
    return tensor


class _WeightsOnlyLoadPlanner(_EmptyStateDictLoadPlanner):
    """DCP's key-selecting load planner, but non-tensor values load with ``weights_only=True``.

    DCP's own planners ``torch.load(..., weights_only=False)`` them: a crafted checkpoint could
    run code. Optimizer state and param groups need nothing beyond weights_only.
    """

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class _PieceLoadPlanner(_WeightsOnlyLoadPlanner):
    """Reads only its pieces' rows of split parameters' saved tensors (resharding as it reads:
    whatever chunks they were saved in)."""

    def __init__(self, keys: set[str], pieces: dict[int, RowRange]) -> None:
        super().__init__(keys=keys)
        self._pieces = pieces
        self._rows: dict[str, torch.Tensor] = {}  # fqn -> the tensor its rows are read into

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False
    ) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        for fqn in list(self.state_dict):
            path = metadata.planner_data.get(fqn) if metadata.planner_data else None
            if not path or len(path) < 3 or path[0] != "state" or not str(path[1]).isdigit():
                continue
            piece = self._pieces.get(int(path[1]))
            md = metadata.state_dict_metadata.get(fqn)
            if piece is None or not isinstance(md, TensorStorageMetadata):
                continue
            if len(md.size) and md.size[0] == piece.rows:  # shaped like the whole parameter
                rows = _read_as_rows(md.size, md.properties.dtype, piece)
                self.state_dict[fqn] = self._rows[fqn] = rows
                set_element(self.original_state_dict, self.mappings[fqn], rows)

    def create_local_plan(self) -> LoadPlan:
        """DCP's plan for whole values, plus reads of the saved chunks that overlap each
        piece's rows (DCP's own plan would refuse a tensor smaller than the saved one)."""
        whole = {k: v for k, v in self.state_dict.items() if k not in self._rows}
        plan = create_default_local_load_plan(whole, self.metadata, not self.allow_partial_load)
        items = [
            item
            for fqn, rows in self._rows.items()
            for item in _create_read_items(fqn, self.metadata.state_dict_metadata[fqn], rows)
        ]
        return LoadPlan(plan.items + items)


def _read_keys(
    commit: Commit, keys: set[str], pieces: dict[int, RowRange] | None = None
) -> dict[str, Any]:
    """Entries of a checked checkpoint, read in this process without a process group."""
    state: dict[str, Any] = {}
    planner = _PieceLoadPlanner(keys, pieces) if pieces else _WeightsOnlyLoadPlanner(keys=keys)
    try:
        _load_state_dict(
            state_dict=state,
            storage_reader=VerifyingReader(commit),
            no_dist=True,
            planner=planner,
        )
    except CheckpointException as err:
        failure = next(iter(err.failures.values()), err)  # DCP: (exception, traceback)
        cause = failure[0] if isinstance(failure, tuple) else getattr(failure, "exc", failure)
        if isinstance(cause, FileNotFoundError):
            raise FileNotFoundError(str(cause)) from None
        raise ValueError(f"cannot read checkpoint {commit.where}: {cause}") from None
    return state


def read_params_state(
    commit: Commit, param_ids: list[int], pieces: dict[int, RowRange] | None = None
) -> dict[int, Any]:
    """The saved state of some parameters (by id), read from a checked checkpoint.

    Args:
        pieces: for parameters of which only some rows are wanted (a split parameter's piece),
            those rows: their tensors shaped like the whole parameter come back as those rows.
    """
    if not param_ids:
        return {}
    loaded = _read_keys(commit, {f"state.{pid}" for pid in param_ids}, pieces)
    return {int(k): v for k, v in loaded.get("state", {}).items()}


# ----- proxy side: committing -------------------------------------------------------------------


@dataclass
class SaveHandle:
    """A save in progress (``blocking=False``).

    ``done()`` says whether every shard has written its file; ``wait()`` waits for them and
    commits the checkpoint (the commit record, then DCP's metadata). Until ``wait()`` returns,
    the new checkpoint does not load (one it replaces still does) and the directory stays
    locked against other saves.
    """

    _poll: Callable[[], bool]
    _finish: Callable[[], Commit | None]
    _committed: bool = False
    commit: Commit | None = None
    """The committed checkpoint once ``wait()`` has returned (None over gRPC)."""
    _on_commit: list[Callable[[Commit | None], None]] = dataclasses.field(default_factory=list)

    @classmethod
    def committed(cls, commit: Commit | None = None) -> SaveHandle:
        """The handle of a save that is already committed (over gRPC: ``commit`` None)."""
        return cls(_poll=lambda: True, _finish=lambda: commit, _committed=True, commit=commit)

    def on_commit(self, callback: Callable[[Commit | None], None]) -> None:
        """Runs ``callback(commit)`` once the checkpoint is committed (at once if it is)."""
        if self._committed:
            callback(self.commit)
        else:
            self._on_commit.append(callback)

    def done(self) -> bool:
        return self._committed or self._poll()

    def wait(self) -> None:
        if not self._committed:
            self.commit = self._finish()
            self._committed = True
            for callback in self._on_commit:
                callback(self.commit)


def coordinate(local_plans: list[Any], save_id: str) -> tuple[list[Any], Any]:
    """DCP's coordinator step: the global plan and the metadata for all shards' local plans.

    Every data file gets a name of its own (``__{i}_{save_id}_0.distcp``): a save never
    overwrites the files of the checkpoint it replaces.
    """
    planner = DefaultSavePlanner()
    planner.set_up_planner({}, None, True)
    global_plans, metadata = planner.create_global_plan(local_plans)
    named = [
        dataclasses.replace(plan, storage_data=_StoragePrefix(f"__{i}_{save_id}_"))
        for i, plan in enumerate(global_plans)
    ]
    return named, metadata


# ----- proxy side: reading ----------------------------------------------------------------------


def verify(path: str | os.PathLike, key: bytes | None = None) -> Commit:
    """Checks that ``path`` is a committed shardopt checkpoint with intact files.

    The commit record, its signature (with ``key``), the metadata (allowlist unpickler) and
    the SHA-256 of every byte of every data file (slice by slice).

    Returns:
        The checked commit.

    Raises:
        FileNotFoundError: no committed checkpoint (no ``.metadata``) or a missing data file.
        ValueError: a checksum or signature that does not match, or metadata that is not DCP's
            (named in the message).
    """
    commit = integrity.read_commit(location(path), key)
    commit.metadata()
    integrity.check_files(commit, full=True)
    return commit


def read_param_groups(commit: Commit) -> list[dict[str, Any]]:
    return _read_keys(commit, {"param_groups"})["param_groups"]


def _state_ids(metadata: Any) -> list[int]:
    """The parameter ids with state (keys ``state.<id>.<name>``; others are ignored)."""
    parts = (key.split(".") for key in metadata.state_dict_metadata)
    ids = {p[1] for p in parts if p[0] == "state" and len(p) > 2}
    return sorted(int(i) for i in ids if i.isascii() and i.isdigit())


def describe(path: str | os.PathLike, key: bytes | None = None) -> dict[str, Any]:
    """What ``shardopt ckpt inspect`` shows: files, integrity, signature, parameters, dtypes,
    sizes, step. Nothing is unpickled that the commit record (and its signature, with ``key``)
    does not cover."""
    directory = location(path)
    info: dict[str, Any] = {"path": directory}
    try:
        commit = integrity.read_commit(directory, key)
        metadata = commit.metadata()
    except (FileNotFoundError, ValueError) as err:
        info["integrity"] = f"FAILED: {err}"
        return info
    if key is not None:
        info["signature"] = f"ok (key id {commit.signed_by})"
    elif commit.signature_key_id is not None:
        info["signature"] = f"signed (key id {commit.signature_key_id}), not checked: no key"
    else:
        info["signature"] = "unsigned"
    try:
        integrity.check_files(commit, full=True)
        info["integrity"] = "ok"
    except (FileNotFoundError, ValueError) as err:
        info["integrity"] = f"FAILED: {err}"
    info["data_files"] = {name: entry["size"] for name, entry in sorted(commit.files.items())}
    tensors: dict[str, dict[str, int]] = {}
    for name, meta in metadata.state_dict_metadata.items():
        if name.startswith("state.") and hasattr(meta, "size"):
            dtype = str(meta.properties.dtype).replace("torch.", "")
            entry = tensors.setdefault(name.split(".", 2)[2], {})
            nbytes = int(torch.Size(meta.size).numel()) * meta.properties.dtype.itemsize
            entry[dtype] = entry.get(dtype, 0) + nbytes
    info["state_tensors"] = tensors
    ids = _state_ids(metadata)
    info["params_with_state"] = len(ids)
    if info["integrity"] != "ok":  # the metadata alone: damaged data files are not read
        info["step"], info["param_groups"] = None, []
        return info
    groups = read_param_groups(commit)
    info["param_groups"] = [
        {k: v for k, v in g.items() if k in ("lr", "weight_decay", "betas", "momentum")}
        | {"params": len(g["params"])}
        for g in groups
    ]
    steps = _read_keys(
        commit,
        {f"state.{i}.step" for i in ids if f"state.{i}.step" in metadata.state_dict_metadata},
    )
    values = [float(s["step"]) for s in steps.get("state", {}).values() if "step" in s]
    info["step"] = max(values) if values else None
    return info


def export(
    path: str | os.PathLike,
    out: str | os.PathLike,
    progress: bool = False,
    key: bytes | None = None,
) -> int:
    """Writes a checkpoint as one torch.optim state dict file (``torch.save``), integer ids.

    Checks what :func:`verify` checks first, and reads nothing but with the allowlist and
    ``weights_only``: the safe way to convert a checkpoint that came from elsewhere.

    Returns:
        The number of parameters with state.
    """
    commit = verify(path, key)
    groups = read_param_groups(commit)
    ids = _state_ids(commit.metadata())
    state: dict[int, Any] = {}
    batches = [ids[i : i + 64] for i in range(0, len(ids), 64)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="export", unit="batch")
    for batch in batches:
        read = read_params_state(commit, batch)  # in the files' order
        state.update((pid, read[pid]) for pid in batch if pid in read)  # in torch's: by id
    for group in groups:
        group["params"] = [int(p) for p in group["params"]]
    torch.save({"state": state, "param_groups": groups}, out)
    return len(state)


# ----- the save and load protocols, driven from the proxy -------------------------------------
