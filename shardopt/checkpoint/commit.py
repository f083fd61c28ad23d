"""Committing a checkpoint: the save lock, the commit, and what replaced files leave.

A save takes :class:`SaveLock` on its location before its first write. When every shard has
written its data file, :func:`commit` checks that every one is there with its recorded size,
writes the commit record (signed with the saver's key, if any) and then DCP's ``.metadata``:
in a directory each goes to a temporary name, is synced and renamed into place; on an object
store each is one put, whole. Writing ``.metadata`` is the commit. Then the files of the
checkpoint it replaced are removed, never before. :func:`abort` removes what a failed save
wrote.

Which files a commit removes depends on whether its lock excludes every other save:

- excluded (a directory with ``flock``, the in-process ``memory://``): every file a save
  writes that the new record does not name, strays of crashed saves included;
- not excluded (an object store, which has no lock across processes, or a file system without
  ``flock``): only the files of the checkpoint its ``.metadata`` replaced, read just before
  the commit. A save never removes the committed checkpoint of another save, nor the files of
  one still writing: concurrent saves from several processes leave the last commit, whole,
  and the parts of the others behind (no record names them, nothing reads them).

Owns the steps of a save after the shards' writes. Talks to: the checkpoint's store
(:mod:`shardopt.checkpoint.storage`) and :mod:`shardopt.checkpoint.integrity` for the
record's format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import threading
from typing import Any

from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import StorageMeta

from shardopt.checkpoint import integrity
from shardopt.checkpoint.integrity import LEGACY_CHECKSUMS, METADATA, RECORD_PREFIX, Commit
from shardopt.checkpoint.storage import InProcess, LocalDir, Store, store_at
from shardopt.core.errors import CheckpointInUseError

logger = logging.getLogger(__name__)

LOCK = ".shardopt-save.lock"
"""``flock``-ed by the process whose save is in progress in a directory; never removed."""


class SaveLock:
    """The right to save into one checkpoint location, until :meth:`release`.

    In a directory, a ``flock`` on ``.shardopt-save.lock`` (the kernel drops it when the process
    dies, so no stale lock outlives a crash): it excludes saves from every process. Elsewhere
    (``memory://``, an object store) a lock of this process: it excludes the saves of this
    process (a gateway's sessions, say); an object store's saves from other processes are not
    excluded (see the module's docstring for what then holds).

    Raises:
        CheckpointInUseError: another save there holds it (in this or another process).
    """

    _saving: set[str] = set()
    """The locations this process's saves hold (but those held by ``flock``)."""
    _guard = threading.Lock()

    def __init__(self, where: str) -> None:
        self.where = where
        self._file: Any = None
        self._held = False
        store = store_at(where)
        self.exclusive = isinstance(store, InProcess)
        """Whether no other save, from any process, can write there until the release."""
        if isinstance(store, LocalDir):
            import fcntl

            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self._file = os.fdopen(os.open(os.path.join(where, LOCK), flags, 0o644), "r+b")
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.exclusive = True
            except BlockingIOError:
                self._file.close()
                raise self._in_use() from None
            except OSError as err:  # no locks here: unique names still keep loads whole
                logger.warning("cannot lock %s (%s): concurrent saves are not excluded", where, err)
        else:
            with self._guard:
                if where in self._saving:
                    raise self._in_use()
                self._saving.add(where)
            self._held = True

    def _in_use(self) -> CheckpointInUseError:
        return CheckpointInUseError(
            f"another save to {self.where} is in progress (in this or another process): wait "
            "for it to finish, or save to another directory"
        )

    def release(self) -> None:
        """Ends the save's hold on the location (idempotent)."""
        if self._file is not None:
            self._file.close()  # drops the flock
            self._file = None
        if self._held:
            with self._guard:
                self._saving.discard(self.where)
            self._held = False


def _is_ours(name: str) -> bool:
    """Files that saves write (and may remove): data files, records, temporaries."""
    return (
        name.endswith(".distcp")
        or name.startswith(RECORD_PREFIX)
        or name == LEGACY_CHECKSUMS
        or (name.startswith(METADATA + ".") and name.endswith(".tmp"))
    )


def abort(where: str, save_id: str) -> None:
    """Removes what a failed save wrote (on an object store, its unfinished uploads too), as
    far as it can; the checkpoint there is untouched."""
    store = store_at(where)

    def written(name: str) -> bool:
        return _is_ours(name) and (f"_{save_id}_" in name or name.endswith(f".{save_id}.tmp"))

    try:
        for name in store.names():
            if written(name):
                store.remove(name)
        store.drop_unfinished(written)  # the uploads of a shard killed mid-write
    except OSError as err:
        logger.warning("could not remove the files of a failed save to %s: %s", where, err)


def _committed_files(where: str) -> set[str]:
    """The record and data files of the checkpoint committed at ``where`` now (none if there is
    none, or if it is not a shardopt checkpoint: then nothing of it is removed)."""
    try:
        committed = integrity.read_commit(where, None)
    except (FileNotFoundError, ValueError):
        return set()
    digest = hashlib.sha256(committed.metadata_bytes).hexdigest()
    return {integrity.record_name(digest), *committed.files}


def _check_parts(store: Store, files: dict[str, dict[str, Any]]) -> None:
    """Every data file is there with the size its shard wrote, before anything names it.

    Raises:
        FileNotFoundError, ValueError: one is missing or of another size (named).
    """
    fs, root = store.fs()
    for name, entry in sorted(files.items()):
        size = fs.size(f"{root}/{name}")
        if size != entry["size"]:
            raise ValueError(
                f"checkpoint data file {store.shown(name)} has {size} bytes, "
                f"its shard wrote {entry['size']}"
            )


def commit(
    where: str,
    metadata: Any,
    outcomes: list[Any],
    key: bytes | None,
    save_id: str,
    exclusive: bool = True,
) -> Commit:
    """Writes the commit record, then DCP's metadata: from here the checkpoint loads.

    Then removes the files of the checkpoint it replaced: with ``exclusive`` (the lock keeps
    other saves out), every file of a save the new record does not name; without, only the
    files of the checkpoint committed there just before. Nothing after the commit raises.
    """
    store = store_at(where)
    storage: dict[Any, Any] = {}
    files: dict[str, dict[str, Any]] = {}
    for results, digests in outcomes:
        storage.update({r.index: r.storage_data for r in results})
        files.update(digests)
    _check_parts(store, files)
    metadata.version = CURRENT_DCP_VERSION
    metadata.storage_data = storage
    metadata.storage_meta = StorageMeta(checkpoint_id=store.checkpoint_id(), save_id=save_id)
    data = pickle.dumps(metadata)
    replaced = set() if exclusive else _committed_files(where)
    name, record = integrity.make_record(data, files, key)
    store.put(name, record, save_id)
    store.put(METADATA, data, save_id)  # the commit
    keep = set(files) | {name}
    try:
        store.sync()
        if exclusive:
            replaced = {other for other in store.names() if _is_ours(other)}
        for other in sorted(replaced - keep):
            store.remove(other)
    except OSError as err:  # committed: what is left over wastes space, nothing else
        logger.warning("%s is committed, but removing what it replaced failed: %s", where, err)
    signer = integrity.key_id(key) if key is not None else None
    return Commit(where, data, json.loads(record)["files"], signer, signer)
