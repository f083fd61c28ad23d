"""A state dict written as a ``torch.save`` file straight from the shards, never whole here.

``optimizer.save_state_dict(path)`` writes the file ``torch.save(optimizer.state_dict(), path)``
would write, but this process never holds the state: every shard packs its part aside
(:meth:`~shardopt.actor.shard.Shard.pack_state`); the file's skeleton (the pickle, with every
tensor's storage record reserved but not written) is saved first with torch's own
``torch.serialization.skip_data`` over fake tensors of the right shapes; then each shard's part
is pulled a chunk at a time and written at its storage record's offset in the zip archive (a
split parameter's pieces at their rows' offsets). The file is written aside and renamed into
place, so ``path`` is either the old file or the whole new one. ``torch.load(path,
weights_only=True)`` reads it; ``torch.load(path, mmap=True, weights_only=True)`` maps it
instead of reading it, so ``optimizer.load_state_dict`` of that holds one shard's part at a
time in memory.

Backends that cannot stream (the gateway's, LBFGS's) and state_dict hooks get the gathered
dict saved the same atomic way (:func:`save_whole`).

Talks to: the shards through their handles (pack, chunks, drop) and the file system.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.serialization import skip_data

from shardopt.client.data_path import pull_chunks
from shardopt.client.handles import ShardHandle
from shardopt.client.runtime import ray_get
from shardopt.client.shard_map import ShardMap
from shardopt.core.buffers import TensorSlot, tensors_in

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header (30 bytes)


def _storage_offsets(path: str) -> list[tuple[int, int]]:
    """(offset in the file, size) of every storage record of a ``torch.save`` archive, by key."""
    records: dict[int, tuple[int, int]] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if len(parts) == 3 and parts[1] == "data" and parts[2].isdigit():
                raw.seek(info.header_offset)
                header = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
                name_len, extra_len = header[-2], header[-1]
                start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
                records[int(parts[2])] = (start, info.file_size)
    return [records[k] for k in range(len(records))]


def _aside(path: str) -> str:
    """Where a file for ``path`` is written before it is renamed into place."""
    return f"{path}.shardopt-{os.getpid()}.tmp"


def save_whole(state_dict: dict[str, Any], path: str) -> None:
    """``torch.save(state_dict, path)``, written aside and renamed into place (atomic)."""
    aside = _aside(path)
    try:
        with open(aside, "wb") as f:
            torch.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(aside, path)
    except BaseException:
        if os.path.exists(aside):
            os.unlink(aside)
        raise


def save_state_file(
    path: str | os.PathLike,
    shard_map: ShardMap,
    handles: Sequence[ShardHandle],
    order: list[int],
    param_groups: list[dict[str, Any]],
) -> None:
    """Writes ``{"state": ..., "param_groups": param_groups}`` to ``path`` in ``torch.save``'s
    format from the shards' parts (see the module docstring).

    Args:
        order: the ids with state in torch's order (others follow in id order).
    """
    path = os.fspath(path)
    live = shard_map.live_shards()
    packs = dict(zip(live, ray_get([handles[s].pack_state() for s in live])))
    aside = _aside(path)
    try:
        mode = FakeTensorMode()
        state: dict[int, dict[str, Any]] = {}
        sinks: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}  # (shard, slot) -> where
        for s in live:
            _, skeleton, layout = packs[s]
            for pid, value in skeleton.items():
                rows = shard_map.rows_of(pid, s)
                whole = state.setdefault(pid, {})
                for key, slot in value.items():
                    if not isinstance(slot, TensorSlot):
                        whole.setdefault(key, slot)
                        continue
                    shape, dtype = layout.shapes[slot.index], layout.dtypes[slot.index]
                    start = 0
                    if rows is not None and shard_map.is_piece_shaped(pid, s, shape):
                        start = rows[0] * dtype.itemsize * (int(torch.Size(shape[1:]).numel()))
                        shape = (rows[2], *shape[1:])
                    if key not in whole:
                        with mode:
                            whole[key] = torch.empty(shape, dtype=dtype)
                    sinks[s, slot.index] = (whole[key], start)
        ids = [pid for pid in order if pid in state]
        ids += sorted(set(state) - set(ids))
        state_dict = {"state": {pid: state[pid] for pid in ids}, "param_groups": param_groups}
        with skip_data(materialize_fake_tensors=True):
            torch.save(state_dict, aside)
        records = _storage_offsets(aside)
        tensors = tensors_in(state_dict)  # torch.save numbers storages in this order
        if len(records) != len(tensors) or any(
            size != t.numel() * t.element_size() for (_, size), t in zip(records, tensors)
        ):
            raise RuntimeError("torch.save laid out the storages in an unexpected order")
        at = {id(t): offset for t, (offset, _) in zip(tensors, records)}
        fd = os.open(aside, os.O_WRONLY)
        try:
            for s in live:
                token, _, layout = packs[s]

                def write(i: int, offset: int, data: torch.Tensor, s: int = s) -> None:
                    tensor, start = sinks[s, i]
                    os.pwrite(fd, memoryview(data.numpy()), at[id(tensor)] + start + offset)

                pull_chunks(handles[s], token, layout, write)
                handles[s].drop_state(token)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(aside, path)
    except BaseException:
        for s in packs:
            handles[s].drop_state(packs[s][0])
        if os.path.exists(aside):
            os.unlink(aside)
        raise
