"""Committing a checkpoint on disk: the save lock, the commit, and what replaced files leave.

A save takes :class:`SaveLock` on the directory before its first write. When every shard has
written its data file, :func:`commit` writes the commit record (signed with the saver's key, if
any) and then DCP's ``.metadata``, each to a temporary name, synced, and renamed into place; the
rename of ``.metadata`` is the commit. Then it removes the files of the checkpoint it replaced
(no other save can be writing: the lock). :func:`abort` removes what a failed save wrote.

Owns the on-disk steps of a save after the shards' writes. Talks to: the file system (fsspec
for ``memory://``) and :mod:`shardopt.checkpoint.integrity` for the record's format.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import threading
from typing import Any

from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import StorageMeta

from shardopt.checkpoint import integrity
from shardopt.checkpoint.integrity import LEGACY_CHECKSUMS, METADATA, RECORD_PREFIX, Commit, fs_of
from shardopt.core.errors import CheckpointInUseError

logger = logging.getLogger(__name__)

LOCK = ".shardopt-save.lock"
"""``flock``-ed by the process whose save is in progress there; never removed."""


def in_process(where: str) -> bool:
    """Whether ``where`` is fsspec's in-process store (``memory://``) rather than a directory."""
    return "://" in where


def names_in(where: str) -> list[str]:
    """The names of the files in a checkpoint directory."""
    fs, root = fs_of(where)
    return [os.path.basename(n.rstrip("/")) for n in fs.ls(root, detail=False)]


def remove(where: str, name: str) -> None:
    fs, root = fs_of(where)
    if fs.exists(f"{root}/{name}"):
        fs.rm(f"{root}/{name}")


class SaveLock:
    """The exclusive right to save into one checkpoint directory, until :meth:`release`.

    A ``flock`` on ``.shardopt-save.lock`` (the kernel drops it when the process dies, so no
    stale lock outlives a crash); for ``memory://``, which lives in this process, a thread lock.

    Raises:
        CheckpointInUseError: another save there holds it (in this or another process).
    """

    _memory: dict[str, threading.Lock] = {}
    _memory_guard = threading.Lock()

    def __init__(self, where: str) -> None:
        self.where = where
        self._file: Any = None
        self._lock: threading.Lock | None = None
        if not in_process(where):
            import fcntl

            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self._file = os.fdopen(os.open(os.path.join(where, LOCK), flags, 0o644), "r+b")
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.close()
                raise self._in_use() from None
            except OSError as err:  # no locks here: unique names still keep loads whole
                logger.warning("cannot lock %s (%s): concurrent saves are not excluded", where, err)
        else:
            with self._memory_guard:
                lock = self._memory.setdefault(where, threading.Lock())
            if not lock.acquire(blocking=False):
                raise self._in_use()
            self._lock = lock

    def _in_use(self) -> CheckpointInUseError:
        return CheckpointInUseError(
            f"another save to {self.where} is in progress (in this or another process): wait "
            "for it to finish, or save to another directory"
        )

    def release(self) -> None:
        """Ends the save's hold on the directory (idempotent)."""
        if self._file is not None:
            self._file.close()  # drops the flock
            self._file = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _write_file(where: str, name: str, data: bytes, save_id: str) -> None:
    """Writes a file whole: to a temporary name, synced, then renamed over ``name``."""
    if in_process(where):
        fs, root = fs_of(where)
        fs.pipe_file(f"{root}/{name}", data)
        return
    tmp = os.path.join(where, f"{name}.{save_id}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(where, name))


def _sync_dir(where: str) -> None:
    if not in_process(where):
        fd = os.open(where, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_ours(name: str) -> bool:
    """Files that saves write (and may remove): data files, records, temporaries."""
    return (
        name.endswith(".distcp")
        or name.startswith(RECORD_PREFIX)
        or name == LEGACY_CHECKSUMS
        or (name.startswith(METADATA + ".") and name.endswith(".tmp"))
    )


def abort(where: str, save_id: str) -> None:
    """Removes what a failed save wrote, as far as it can; the checkpoint there is untouched."""
    try:
        for name in names_in(where):
            if _is_ours(name) and (f"_{save_id}_" in name or name.endswith(f".{save_id}.tmp")):
                remove(where, name)
    except OSError as err:
        logger.warning("could not remove the files of a failed save to %s: %s", where, err)


def commit(
    where: str, metadata: Any, outcomes: list[Any], key: bytes | None, save_id: str
) -> Commit:
    """Writes the commit record, then DCP's metadata by rename: from here the checkpoint loads.

    Then removes the files of the checkpoint it replaced (the lock keeps other saves out).
    """
    storage: dict[Any, Any] = {}
    files: dict[str, dict[str, Any]] = {}
    for results, digests in outcomes:
        storage.update({r.index: r.storage_data for r in results})
        files.update(digests)
    metadata.version = CURRENT_DCP_VERSION
    metadata.storage_data = storage
    checkpoint_id = where if in_process(where) else pathlib.Path(where)
    metadata.storage_meta = StorageMeta(checkpoint_id=checkpoint_id, save_id=save_id)
    data = pickle.dumps(metadata)
    name, record = integrity.make_record(data, files, key)
    _write_file(where, name, record, save_id)
    _write_file(where, METADATA, data, save_id)  # the commit
    _sync_dir(where)
    keep = set(files) | {name}
    for other in names_in(where):
        if _is_ours(other) and other not in keep:
            remove(where, other)
    signer = integrity.key_id(key) if key is not None else None
    return Commit(where, data, json.loads(record)["files"], signer, signer)
