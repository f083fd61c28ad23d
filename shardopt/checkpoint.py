"""Sharded checkpoints in torch.distributed.checkpoint (DCP) format, written by the shards.

A checkpoint is a DCP directory: one data file per shard (``__{i}_0.distcp``), written by that
shard in parallel straight from its actor, a ``.shardopt-checksums.json`` with every data file's
SHA-256, and DCP's ``.metadata``, written last by rename: the commit. The proxy plays DCP's
coordinator (local plans -> global plan -> per-shard writes -> metadata), so plain PyTorch reads
it: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(path, "opt.pt")`` gives a
torch.optim state dict. DCP turns dict keys into strings, so the parameter ids are stored as
strings in both ``state`` and each group's ``params``; torch.optim's ``load_state_dict`` only
matches the two, so the converted file loads into ``torch.optim.<Name>`` as it is.

Loading reshards online: each shard reads only its own parameters' entries, validates them with
the same all-or-nothing prepare/commit as ``load_state_dict``. Non-tensor values are read with
``torch.load``'s ``weights_only`` default: nothing arbitrary is unpickled.

Owns the format and its pieces: the shard side (:class:`ShardSave`, :func:`read_params_state`),
the coordinator's steps (:func:`coordinate`, :func:`commit`) and the reader's checks
(:func:`verify`); :mod:`shardopt.client.checkpoints` drives the protocol from the client.

Talks to: the file system, through DCP's ``FileSystemWriter`` / ``FileSystemReader`` (fsspec's
for ``memory://``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

CHECKSUMS = ".shardopt-checksums.json"
"""The integrity record, written before the commit."""
METADATA = ".metadata"
"""DCP's commit record, written last (by rename)."""


def location(path: str | os.PathLike) -> str:
    """Where a checkpoint lives: an absolute local directory, or a ``memory://`` URL.

    ``file://`` URLs become local directories, which every shard on a shared file system
    writes itself. ``memory://`` (fsspec's in-process store) exists only in the proxy's
    process, so there the proxy does the I/O for its shards.

    Raises:
        ValueError: another URL scheme.
    """
    text = os.fspath(path)
    if "://" not in text:
        return os.path.abspath(text)
    scheme, rest = text.split("://", 1)
    if scheme == "file":
        return os.path.abspath(rest)
    if scheme == "memory":
        return text.rstrip("/")
    raise ValueError(
        f"unsupported checkpoint location {scheme}://: use a directory every shard reaches "
        "(local or shared file system, file://) or memory://"
    )


def shards_reach(where: str) -> bool:
    """Whether the shards can do their own I/O there (not for the proxy's in-process store)."""
    return "://" not in where


def _fs(where: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(where)


def _file(where: str, name: str) -> str:
    return f"{where}/{name}"


def _writer(where: str) -> FileSystemWriter:
    if shards_reach(where):
        return FileSystemWriter(where, sync_files=True)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(where, sync_files=False)


def _reader(where: str) -> FileSystemReader:
    if shards_reach(where):
        return FileSystemReader(where)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(where)


def exists(where: str, name: str) -> bool:
    fs, root = _fs(where)
    return fs.exists(f"{root}/{name}")


def remove(where: str, name: str) -> None:
    fs, root = _fs(where)
    if fs.exists(f"{root}/{name}"):
        fs.rm(f"{root}/{name}")


def make_dirs(where: str) -> None:
    fs, root = _fs(where)
    fs.makedirs(root, exist_ok=True)


def data_files(where: str) -> dict[str, int]:
    """The checkpoint's data files and their sizes."""
    fs, root = _fs(where)
    return {
        os.path.basename(entry["name"]): entry["size"]
        for entry in fs.ls(root, detail=True)
        if entry["name"].endswith(".distcp")
    }


def sha256_of(where: str, name: str) -> str:
    fs, root = _fs(where)
    digest = hashlib.sha256()
    with fs.open(f"{root}/{name}", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ----- shard side -------------------------------------------------------------------------------


class ShardSave:
    """One shard's part of a save: a snapshot of its state, DCP's planner and writer for it."""

    def __init__(self, where: str, state: dict[str, Any], is_coordinator: bool):
        self.where = where
        self.writer = _writer(where)
        self.writer.set_up_storage_writer(is_coordinator)
        self.planner = DefaultSavePlanner()
        self.planner.set_up_planner(state, None, is_coordinator)
        self._thread: threading.Thread | None = None
        self._outcome: Any = None

    def local_plan(self) -> Any:
        return self.writer.prepare_local_plan(self.planner.create_local_plan())

    def start_writing(self, plan: Any) -> None:
        """Writes this shard's data file in a thread: the shard keeps serving steps meanwhile."""

        def write() -> None:
            try:
                final = self.planner.finish_plan(plan)
                results = self.writer.write_data(final, self.planner).wait()
                files = sorted({r.storage_data.relative_path for r in results})
                self._outcome = (results, {f: sha256_of(self.where, f) for f in files})
            except BaseException as exc:  # reported to the proxy by wait()
                self._outcome = exc

        self._thread = threading.Thread(target=write, name="shardopt-save", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def wait(self) -> tuple[list[Any], dict[str, str]]:
        assert self._thread is not None
        self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome


def snapshot(value: Any) -> Any:
    """A deep copy of a state tree with tensors cloned to CPU (the state as of the save call)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


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


def _read_keys(path: str, keys: set[str]) -> dict[str, Any]:
    """Entries of a checkpoint, read in this process without a process group."""
    state: dict[str, Any] = {}
    try:
        _load_state_dict(
            state_dict=state,
            storage_reader=_reader(path),
            no_dist=True,
            planner=_WeightsOnlyLoadPlanner(keys=keys),
        )
    except CheckpointException as err:
        failure = next(iter(err.failures.values()), err)
        cause = getattr(failure, "exc", failure)
        raise ValueError(f"cannot read checkpoint {path}: {cause}") from None
    return state


def read_params_state(path: str, param_ids: list[int]) -> dict[int, Any]:
    """The saved state of some parameters (by id), read from a checkpoint."""
    if not param_ids:
        return {}
    loaded = _read_keys(path, {f"state.{pid}" for pid in param_ids})
    return {int(k): v for k, v in loaded.get("state", {}).items()}


# ----- proxy side -------------------------------------------------------------------------------


@dataclass
class SaveHandle:
    """A save in progress (``blocking=False``).

    ``done()`` says whether every shard has written its file; ``wait()`` waits for them and
    commits the checkpoint (checksums, then DCP's metadata). Until ``wait()`` returns, the
    checkpoint does not load.
    """

    _poll: Any
    _finish: Any
    _committed: bool = False
    _on_commit: list[Any] = field(default_factory=list)

    @classmethod
    def committed(cls) -> SaveHandle:
        """The handle of a save that is already committed."""
        return cls(_poll=lambda: True, _finish=lambda: None, _committed=True)

    def on_commit(self, callback: Any) -> None:
        """Runs ``callback()`` once the checkpoint is committed (at once if it is)."""
        if self._committed:
            callback()
        else:
            self._on_commit.append(callback)

    def done(self) -> bool:
        return self._committed or self._poll()

    def wait(self) -> None:
        if not self._committed:
            self._finish()
            self._committed = True
            for callback in self._on_commit:
                callback()


def coordinate(path: str, local_plans: list[Any]) -> tuple[list[Any], Any, FileSystemWriter]:
    """DCP's coordinator step: the global plan and the metadata for all shards' local plans."""
    planner = DefaultSavePlanner()
    planner.set_up_planner({}, None, True)
    global_plans, metadata = planner.create_global_plan(local_plans)
    writer = _writer(path)
    writer.set_up_storage_writer(True)
    return writer.prepare_global_plan(global_plans), metadata, writer


def commit(path: str, writer: FileSystemWriter, metadata: Any, outcomes: list[Any]) -> None:
    """Writes the checksums, then DCP's metadata by rename: from here the checkpoint loads."""
    results = [results for results, _ in outcomes]
    checksums: dict[str, str] = {}
    for _, files in outcomes:
        checksums.update(files)
    record = json.dumps({"sha256": checksums}, indent=1, sort_keys=True)
    if shards_reach(path):
        tmp = os.path.join(path, CHECKSUMS + ".tmp")
        with open(tmp, "w") as f:
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, CHECKSUMS))
    else:
        fs, root = _fs(path)
        with fs.open(f"{root}/{CHECKSUMS}", "w") as f:
            f.write(record)
    writer.finish(metadata, results)


def verify(path: str) -> dict[str, Any]:
    """Checks that ``path`` is a committed shardopt checkpoint with intact data files.

    Returns:
        The DCP metadata.

    Raises:
        FileNotFoundError: no committed checkpoint (no ``.metadata``) or a missing data file.
        ValueError: a data file whose checksum does not match (named in the message).
    """
    if not exists(path, METADATA):
        raise FileNotFoundError(f"{path} holds no committed checkpoint (no {METADATA})")
    metadata = _reader(path).read_metadata()
    fs, root = _fs(path)
    with fs.open(f"{root}/{CHECKSUMS}", "r") as f:
        expected = json.load(f)["sha256"]
    for name, digest in sorted(expected.items()):
        if not exists(path, name):
            raise FileNotFoundError(f"checkpoint data file {_file(path, name)} is missing")
        if sha256_of(path, name) != digest:
            raise ValueError(
                f"checkpoint data file {_file(path, name)} is corrupted (checksum mismatch)"
            )
    return metadata


def read_param_groups(path: str) -> list[dict[str, Any]]:
    return _read_keys(path, {"param_groups"})["param_groups"]


def _state_ids(metadata: Any) -> list[int]:
    return sorted(
        {int(key.split(".")[1]) for key in metadata.state_dict_metadata if key.startswith("state.")}
    )


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What ``shardopt ckpt inspect`` shows: files, integrity, parameters, dtypes, sizes, step."""
    directory = location(path)
    info: dict[str, Any] = {"path": directory}
    try:
        metadata = verify(directory)
        info["integrity"] = "ok"
    except (FileNotFoundError, ValueError) as err:
        info["integrity"] = f"FAILED: {err}"
        if not exists(directory, METADATA):
            return info
        metadata = _reader(directory).read_metadata()
    info["data_files"] = dict(sorted(data_files(directory).items()))
    tensors: dict[str, dict[str, int]] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("state.") and hasattr(meta, "size"):
            dtype = str(meta.properties.dtype).replace("torch.", "")
            entry = tensors.setdefault(key.split(".", 2)[2], {})
            nbytes = int(torch.Size(meta.size).numel()) * meta.properties.dtype.itemsize
            entry[dtype] = entry.get(dtype, 0) + nbytes
    info["state_tensors"] = tensors
    ids = _state_ids(metadata)
    info["params_with_state"] = len(ids)
    if info["integrity"] != "ok":  # the metadata alone: damaged data files are not read
        info["step"], info["param_groups"] = None, []
        return info
    groups = read_param_groups(directory)
    info["param_groups"] = [
        {k: v for k, v in g.items() if k in ("lr", "weight_decay", "betas", "momentum")}
        | {"params": len(g["params"])}
        for g in groups
    ]
    steps = _read_keys(
        directory,
        {f"state.{i}.step" for i in ids if f"state.{i}.step" in metadata.state_dict_metadata},
    )
    values = [float(s["step"]) for s in steps.get("state", {}).values() if "step" in s]
    info["step"] = max(values) if values else None
    return info


def export(path: str | os.PathLike, out: str | os.PathLike, progress: bool = False) -> int:
    """Writes a checkpoint as one torch.optim state dict file (``torch.save``), integer ids.

    Returns:
        The number of parameters with state.
    """
    directory = location(path)
    metadata = verify(directory)
    groups = read_param_groups(directory)
    ids = _state_ids(metadata)
    state: dict[int, Any] = {}
    batches = [ids[i : i + 64] for i in range(0, len(ids), 64)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="export", unit="batch")
    for batch in batches:
        state.update(read_params_state(directory, batch))
    for group in groups:
        group["params"] = [int(p) for p in group["params"]]
    torch.save({"state": state, "param_groups": groups}, out)
    return len(state)
