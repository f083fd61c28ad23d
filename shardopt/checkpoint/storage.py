"""Where a checkpoint's bytes go: a local directory, fsspec's in-process store, or an object store.

A checkpoint location (:func:`location`) is one of three kinds of :class:`Store`, chosen once by
:func:`store_at`:

- :class:`LocalDir`: a directory (a path or a ``file://`` URL) that every shard reaches, on a
  local or shared file system. Small files are written to a temporary name, synced and renamed
  into place; saves there exclude each other with a ``flock``
  (:class:`shardopt.checkpoint.commit.SaveLock`).
- :class:`InProcess`: fsspec's ``memory://``, which exists only in this process: the proxy
  does its shards' I/O.
- :class:`ObjectStore`: any other fsspec protocol whose file system is installed (``s3://``
  with s3fs, ``gs://`` with gcsfs, ``az://``/``abfs://`` with adlfs, ...). Every shard writes
  its own data object straight to the store from its actor. An object is put whole (a reader
  sees the old object or the new one, never a mix) and there is no rename: the commit is the
  put of ``.metadata`` (:mod:`shardopt.checkpoint.commit` says what it then guarantees).
  Listings are never cached, since other processes write the objects, and a data object's
  SHA-256 is computed as its bytes go out (:class:`_DigestingStream`), so a save reads nothing
  back from the store. A failed save's unfinished multipart uploads (a shard killed mid-write)
  are aborted (:meth:`ObjectStore.drop_unfinished`).

Credentials are never part of a location, nor of a gateway request: the file system takes them
from the environment and configuration of the process that opens the store (for s3fs:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws``, instance or
pod roles; for any protocol, fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` variables). Every node
whose shards save or load needs them.

Owns what a location string means and the storage operations that differ between the kinds.
Talks to: the local file system (``os``), fsspec and the protocol's file system package, and
DCP's ``FileSystemWriter``/``FsspecWriter`` (the writers the shards use).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import stat
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import fsspec
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as FsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

LOCAL_SCHEMES = ("file", "local")
"""fsspec's names for the local file system: a location with one is a :class:`LocalDir`."""
MAX_LISTINGS = 100
"""At most this many pages (of up to 1000 uploads each) are listed to find a save's unfinished
uploads."""


def location(path: str | os.PathLike) -> str:
    """Where a checkpoint lives: an absolute local directory, or a URL (no trailing ``/``).

    ``file://`` URLs become local directories. ``memory://`` is fsspec's in-process store.
    Any other ``protocol://`` names an object store whose fsspec file system must be installed
    (``s3://bucket/run/step-100`` needs s3fs).

    Raises:
        ValueError: a protocol fsspec does not know, a chained URL (``a::b://``), one with
            ``?`` or ``#``, or one that names no bucket or container.
        ImportError: the protocol's file system package is not installed (fsspec's message
            names it).
    """
    text = os.fspath(path)
    if "://" not in text:
        return os.path.abspath(text)
    scheme, rest = text.split("://", 1)
    if scheme in LOCAL_SCHEMES:
        return os.path.abspath(rest)
    if "::" in text:
        raise ValueError(f"chained fsspec URLs are not checkpoint locations: {text!r}")
    if scheme == "memory":
        return text.rstrip("/")
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise ValueError(
            f"unsupported checkpoint location {scheme}://: fsspec knows no such protocol (use "
            "a directory every shard reaches, an object store URL such as s3://bucket/prefix, "
            "or memory://)"
        ) from None
    if "?" in rest or "#" in rest:
        raise ValueError(f"a checkpoint URL has no query or fragment: {text!r}")
    if not rest.strip("/"):
        raise ValueError(f"checkpoint URL {text!r} names no bucket or container")
    return f"{scheme}://{rest.rstrip('/')}"


class Store:
    """One checkpoint location and the operations a save and a load need there."""

    shards_reach: ClassVar[bool] = True
    """Whether the shards do their own I/O here (False for the proxy's in-process store)."""
    fs_options: ClassVar[dict[str, Any]] = {}
    """Extra options of the fsspec file system (never credentials: those come from the
    environment of the process that opens it)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fs(self) -> tuple[Any, str]:
        """The fsspec file system and the root path of this location in it."""
        return fsspec.core.url_to_fs(self.where, **self.fs_options)

    def shown(self, name: str) -> str:
        """``name`` as messages show it: the location's URL or directory, then the name."""
        return f"{self.where}/{name}"

    def prepare(self) -> None:
        """Makes the location exist before a save writes there."""
        fs, root = self.fs()
        fs.makedirs(root, exist_ok=True)

    def writer(self) -> FileSystemWriter:
        """The DCP writer one shard's data file is written with."""
        return FsspecWriter(self.where, sync_files=False, **self.fs_options)

    def names(self) -> list[str]:
        """The names of the files directly in this location (none if it does not exist)."""
        fs, root = self.fs()
        try:
            return [n.rstrip("/").rpartition("/")[2] for n in fs.ls(root, detail=False)]
        except FileNotFoundError:
            return []

    def remove(self, name: str) -> None:
        """Removes one file (never a pattern: the name is not expanded), if it exists."""
        fs, root = self.fs()
        try:
            fs.rm_file(f"{root}/{name}")
        except FileNotFoundError:
            pass

    def put(self, name: str, data: bytes, save_id: str) -> None:
        """Writes a small file whole: readers see all of it or the file it replaces."""
        fs, root = self.fs()
        fs.pipe_file(f"{root}/{name}", data)

    def sync(self) -> None:
        """Makes the files written here durable, where that is a separate step."""

    def drop_unfinished(self, match: Callable[[str], bool]) -> None:
        """Abandons the unfinished uploads of the files whose names ``match`` (where a store
        keeps them: those of a writer killed mid-upload)."""

    def check_regular(self, name: str) -> None:
        """Refuses a link, FIFO or device where a checkpoint file belongs (local only)."""

    def checkpoint_id(self) -> str | pathlib.Path:
        """The location as DCP's metadata records it."""
        return self.where


class LocalDir(Store):
    """A directory that every shard reaches (a local or shared file system)."""

    def writer(self) -> FileSystemWriter:
        return FileSystemWriter(self.where, sync_files=True)

    def names(self) -> list[str]:
        try:
            return os.listdir(self.where)
        except FileNotFoundError:
            return []

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.where, name))

    def put(self, name: str, data: bytes, save_id: str) -> None:
        """Writes ``data`` to a temporary name, synced, then renames it over ``name``."""
        tmp = os.path.join(self.where, f"{name}.{save_id}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.where, name))

    def sync(self) -> None:
        fd = os.open(self.where, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def check_regular(self, name: str) -> None:
        """Raises FileNotFoundError (no such file) or ValueError (not a regular file)."""
        mode = os.lstat(os.path.join(self.where, name)).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{self.shown(name)} is not a regular file (a link, FIFO or device)")

    def checkpoint_id(self) -> str | pathlib.Path:
        return pathlib.Path(self.where)


class InProcess(Store):
    """fsspec's ``memory://``: it lives in this process, which does the shards' I/O."""

    shards_reach = False


class ObjectStore(Store):
    """An object store reached through fsspec (S3, GCS, Azure, ...), from every process."""

    fs_options: ClassVar[dict[str, Any]] = {"use_listings_cache": False}

    def prepare(self) -> None:
        """Nothing: an object store has no directories (and a bucket is not made here)."""

    def writer(self) -> FileSystemWriter:
        return _ObjectWriter(self.where, **self.fs_options)

    def drop_unfinished(self, match: Callable[[str], bool]) -> None:
        """Aborts the multipart uploads of matching objects directly in this location (S3's
        API, s3fs: a large object is uploaded in parts, which a killed writer leaves on the
        store, unseen but stored, until aborted; other file systems: nothing to do).

        Raises:
            OSError: the store refused to list or abort them.
        """
        fs, root = self.fs()
        call = getattr(fs, "call_s3", None)
        if call is None:
            return
        bucket, _, prefix = root.partition("/")
        marker: dict[str, str] = {}
        for _ in range(MAX_LISTINGS):
            listing = call("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker)
            for upload in listing.get("Uploads", []):
                folder, _, name = upload["Key"].rpartition("/")
                if folder == prefix and match(name):
                    call(
                        "abort_multipart_upload",
                        Bucket=bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )
            if not listing.get("IsTruncated"):
                return
            marker = {
                "KeyMarker": listing["NextKeyMarker"],
                "UploadIdMarker": listing["NextUploadIdMarker"],
            }


def store_at(where: str) -> Store:
    """The :class:`Store` of a location as :func:`location` returns it."""
    if "://" not in where:
        return LocalDir(where)
    if where.startswith("memory://"):
        return InProcess(where)
    return ObjectStore(where)


def fs_of(where: str) -> tuple[Any, str]:
    """The fsspec file system and root path of a location (see :meth:`Store.fs`)."""
    return store_at(where).fs()


# ----- writing data objects with their digests -------------------------------------------------


def digests_written(writer: FileSystemWriter, name: str) -> dict[tuple[int, int], str]:
    """The SHA-256 of the byte ranges of data file ``name`` that ``writer`` hashed as it wrote
    them, by (start, end): one range per DCP item (empty for writers that do not hash)."""
    fs = getattr(writer, "fs", None)
    return dict(getattr(fs, "digests", {}).get(name, {}))


class _DigestingStream:
    """A write stream that hashes what goes through it, range by range.

    DCP's writer asks ``tell()`` before and after each item it writes, so the ranges between
    two ``tell()`` calls are the items' slices: each gets its SHA-256 in ``segments``. Only
    what a writer needs is here (write, tell, flush, close).
    """

    def __init__(self, raw: Any, segments: dict[tuple[int, int], str]) -> None:
        self.raw = raw
        self.segments = segments
        self._start = raw.tell()
        self._hash = hashlib.sha256()
        self.closed = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        written = self.raw.write(data)
        self._hash.update(memoryview(data).cast("B")[:written])
        return written

    def tell(self) -> int:
        position = self.raw.tell()
        if position != self._start:
            self.segments[(self._start, position)] = self._hash.hexdigest()
            self._start, self._hash = position, hashlib.sha256()
        return position

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        """Completes the upload: from here the object exists, whole."""
        if not self.closed:
            self.tell()
            self.raw.close()
            self.closed = True


def _discard(raw: Any) -> None:
    """Drops an unfinished upload: no object, whole or partial, appears."""
    with contextlib.suppress(Exception):
        raw.discard()  # s3fs: aborts the multipart upload
    raw.closed = True  # so that closing (or collecting) it does not complete the upload


class _DigestingFileSystem(FsspecFileSystem):
    """DCP's fsspec file system whose write streams hash what they write."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, dict[tuple[int, int], str]] = {}

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = os.fspath(path).rstrip("/").rpartition("/")[2]
        raw = self.fs.open(os.fspath(path), mode)
        stream = _DigestingStream(raw, self.digests.setdefault(name, {}))
        try:
            yield stream
        except BaseException:
            _discard(raw)
            raise
        stream.close()


class _ObjectWriter(FsspecWriter):
    """DCP's fsspec writer whose data files are hashed as they are uploaded."""

    def __init__(self, where: str, **options: Any) -> None:
        super().__init__(where, sync_files=False, **options)
        self.fs = _DigestingFileSystem()
        self.path = self.fs.init_path(where, **options)
