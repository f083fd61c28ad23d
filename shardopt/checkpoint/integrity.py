"""What a checkpoint reader may trust, checked before anything in the checkpoint is unpickled.

A shardopt checkpoint is committed by two files: the commit record
``.shardopt-commit-<sha256 of .metadata>.json`` (JSON: the SHA-256 and size of DCP's
``.metadata``, and the size of every data file with the SHA-256 of every slice in it, the
slices covering every byte; optionally an HMAC-SHA256 signature over all of it) and DCP's
``.metadata`` itself, written last (renamed into place, or put whole on an object store). A
reader reads ``.metadata``'s bytes once, finds the record named by their digest, checks the
signature when it has a key, and only then unpickles those bytes, with an allowlist unpickler
that builds DCP's metadata classes and nothing else (:func:`unpickle_metadata`). Data slices
are checked against the record as they are read (:class:`VerifyingReader`), so a file changed
between the check and the read never reaches the state; values load with ``weights_only``.

Checksums detect corruption, not forgery: anyone who can write the directory can write a
matching record. A key (:func:`read_key`) makes the record a signature: with one, only
checkpoints signed with that key load.

Owns the record format, the signing key, the metadata unpickler and the verifying DCP reader.
Talks to: the checkpoint's store (:mod:`shardopt.checkpoint.storage`: a directory or an object
store, through fsspec) and DCP's ``FileSystemReader``; used by
:mod:`shardopt.checkpoint.format` and the client's protocol (:mod:`shardopt.client.checkpoints`),
and by the shards reading their parts.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import math
import os
import pathlib
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from shardopt.checkpoint.storage import fs_of, store_at

METADATA = ".metadata"
"""DCP's metadata (a pickle), renamed into place last: the commit."""
RECORD_PREFIX = ".shardopt-commit-"
"""Commit records are ``RECORD_PREFIX + sha256(.metadata) + ".json"``."""
LEGACY_CHECKSUMS = ".shardopt-checksums.json"
"""The checksum file of checkpoints written before commit records (refused, removed on save)."""
FORMAT = "shardopt-checkpoint/1"
KEY_ENV = "SHARDOPT_CHECKPOINT_KEY_FILE"
"""The environment variable naming the key file when no ``--checkpoint-key-file`` is given."""
MIN_KEY_BYTES = 16
MAX_METADATA_BYTES = 256 << 20
"""Larger ``.metadata`` or commit records are refused unread (about 500,000 entries)."""
_SIGNED_PREFIX = b"shardopt checkpoint record v1\n"
_DATA_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.distcp")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ----- files ------------------------------------------------------------------------------------


def _read_small(where: str, name: str) -> bytes:
    store = store_at(where)
    fs, root = store.fs()
    path = f"{root}/{name}"
    store.check_regular(name)
    size = fs.size(path)
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"{where}/{name} has {size} bytes, more than {MAX_METADATA_BYTES}")
    with fs.open(path, "rb") as f:
        return f.read(MAX_METADATA_BYTES + 1)


def _hash_range(f: Any, length: int, shown: str) -> str:
    digest = hashlib.sha256()
    while length > 0:
        block = f.read(min(length, 1 << 22))
        if not block:
            raise ValueError(f"checkpoint data file {shown} is corrupted (shorter than recorded)")
        digest.update(block)
        length -= len(block)
    return digest.hexdigest()


def digest_file(
    where: str,
    name: str,
    slices: Iterable[tuple[int, int]],
    known: Mapping[tuple[int, int], str] | None = None,
) -> dict[str, Any]:
    """The record entry of one data file: its size and the SHA-256 of every slice in it.

    ``slices`` are the (offset, length) DCP's writer reported; bytes outside them (DCP writes
    none) get entries of their own, so that the entries cover every byte. ``known`` holds the
    digests the writer computed as it wrote, by (start, end) (an object store's uploads): the
    file is read back only for ranges it lacks, in one sequential pass.
    """
    fs, root = fs_of(where)
    path, shown = f"{root}/{name}", f"{where}/{name}"
    size = fs.size(path)
    ranges: list[tuple[int, int]] = []
    end = 0
    for offset, length in sorted(set(slices)):
        if offset < end:
            raise ValueError(f"{shown}: overlapping slices at offset {offset}")
        if offset > end:
            ranges.append((end, offset - end))
        ranges.append((offset, length))
        end = offset + length
    if size > end:
        ranges.append((end, size - end))
    elif size < end:
        raise ValueError(f"checkpoint data file {shown} has {size} bytes, fewer than written")
    known = known or {}
    digests = {_slice_key(o, n): known[(o, o + n)] for o, n in ranges if (o, o + n) in known}
    missing = [(o, n) for o, n in ranges if _slice_key(o, n) not in digests]
    if missing:
        with fs.open(path, "rb") as f:
            for offset, length in missing:
                f.seek(offset)
                digests[_slice_key(offset, length)] = _hash_range(f, length, shown)
    return {"size": size, "slices": digests}


def _slice_key(offset: int, length: int) -> str:
    return f"{offset}+{length}"


def _ranges(entry: dict[str, Any]) -> list[tuple[int, int]] | None:
    """A record entry's slices, sorted, if they tile the file exactly; else None."""
    try:
        ranges = sorted(tuple(int(x) for x in key.split("+", 1)) for key in entry["slices"])
    except (ValueError, TypeError):
        return None
    end = 0
    for offset, length in ranges:
        if offset != end or length < 0 or _slice_key(offset, length) not in entry["slices"]:
            return None
        end = offset + length
    return ranges if end == entry["size"] else None


# ----- the key ----------------------------------------------------------------------------------


def read_key(path: str | os.PathLike) -> bytes:
    """The checkpoint signing key in a file (its bytes, surrounding whitespace stripped).

    Make one with ``python -c "import secrets; print(secrets.token_hex(32))" > key``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: fewer than 16 bytes.
    """
    key = pathlib.Path(path).read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"checkpoint key file {path} holds {len(key)} bytes; a key needs at least "
            f'{MIN_KEY_BYTES} (e.g. python -c "import secrets; print(secrets.token_hex(32))")'
        )
    return key


def key_from_env() -> bytes | None:
    """The key in the file named by ``SHARDOPT_CHECKPOINT_KEY_FILE``, or None when unset."""
    path = os.environ.get(KEY_ENV)
    return read_key(path) if path else None


def key_id(key: bytes) -> str:
    """A short public name of a key (an HMAC of a constant): says which key signed."""
    return hmac.new(key, b"shardopt checkpoint key id", hashlib.sha256).hexdigest()[:16]


def check_key(key: Any) -> None:
    if not isinstance(key, bytes):
        raise TypeError(f"a checkpoint key is bytes (see read_key), got {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a checkpoint key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}")


def _mac(key: bytes, record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "signature"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, _SIGNED_PREFIX + text, hashlib.sha256).hexdigest()


# ----- the commit record ------------------------------------------------------------------------


def record_name(metadata_sha256: str) -> str:
    return f"{RECORD_PREFIX}{metadata_sha256}.json"


def make_record(
    metadata_bytes: bytes, files: dict[str, dict[str, Any]], key: bytes | None
) -> tuple[str, bytes]:
    """The commit record of a checkpoint (signed with ``key`` if given): its name and bytes."""
    digest = hashlib.sha256(metadata_bytes).hexdigest()
    record: dict[str, Any] = {
        "format": FORMAT,
        "metadata": {"sha256": digest, "size": len(metadata_bytes)},
        "files": dict(sorted(files.items())),
    }
    if key is not None:
        check_key(key)
        record["signature"] = {"key_id": key_id(key), "hmac_sha256": _mac(key, record)}
    return record_name(digest), json.dumps(record, indent=1, sort_keys=True).encode()


@dataclass(frozen=True)
class Commit:
    """A committed checkpoint as checked: its location, ``.metadata``'s bytes, the record."""

    where: str
    metadata_bytes: bytes
    files: dict[str, dict[str, Any]]
    signed_by: str | None
    """The key id of a signature checked with the reader's key; None when none was checked."""
    signature_key_id: str | None
    """The key id the record says signed it (checked or not); None for an unsigned record."""
    _unpickled: list[Any] = field(default_factory=list, compare=False, repr=False)

    def metadata(self) -> Any:
        """DCP's metadata, unpickled with the allowlist and checked against the record (once;
        callers treat it as read-only)."""
        if not self._unpickled:
            self._unpickled.append(unpickle_metadata(self.metadata_bytes, self))
        return self._unpickled[0]

    def __reduce__(self) -> tuple[Any, ...]:
        # to a shard, through Ray (a trusted channel): the metadata too, once unpickled here,
        # so that shards do not run the (slower) allowlist unpickler again
        fields = (self.where, self.metadata_bytes, self.files, self.signed_by)
        return (Commit, (*fields, self.signature_key_id, list(self._unpickled)))


def _check_record(record: Any, where: str) -> dict[str, dict[str, Any]]:
    """The record's files, after checking every field the reader relies on."""
    bad = ValueError(f"the commit record of {where} is malformed")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise bad
    files = record.get("files")
    if not isinstance(files, dict) or not isinstance(record.get("metadata"), dict):
        raise bad
    for name, entry in files.items():
        if not (isinstance(name, str) and _DATA_NAME.fullmatch(name) and isinstance(entry, dict)):
            raise bad
        slices = entry.get("slices")
        if not (
            type(entry.get("size")) is int
            and isinstance(slices, dict)
            and all(isinstance(d, str) and _SHA256.fullmatch(d) for d in slices.values())
            and _ranges(entry) is not None  # the slices cover every byte, once
        ):
            raise bad
    signature = record.get("signature")
    if signature is not None and not (
        isinstance(signature, dict)
        and isinstance(signature.get("key_id"), str)
        and re.fullmatch(r"[0-9a-f]{16}", signature["key_id"])
        and isinstance(signature.get("hmac_sha256"), str)
        and _SHA256.fullmatch(signature["hmac_sha256"])
    ):
        raise bad
    return files


def read_commit(where: str, key: bytes | None) -> Commit:
    """Reads ``.metadata``'s bytes and their commit record; checks the signature with ``key``.

    Nothing is unpickled here.

    Raises:
        FileNotFoundError: no ``.metadata``: no committed checkpoint.
        ValueError: no record for these bytes (``.metadata`` changed after the save, or not
            written by shardopt), a malformed record, or, with a key, a missing or wrong
            signature.
    """
    if key is not None:
        check_key(key)
    fs, root = fs_of(where)
    try:
        data = _read_small(where, METADATA)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} holds no committed checkpoint (no {METADATA})") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        raw = _read_small(where, record_name(digest))
    except FileNotFoundError:
        if fs.exists(f"{root}/{LEGACY_CHECKSUMS}"):
            raise ValueError(
                f"{where} was written by an older shardopt without a commit record covering "
                f"{METADATA}; load it with that version and save it again"
            ) from None
        raise ValueError(
            f"{where}/{METADATA} matches no commit record: it was changed after the save or "
            "was not written by shardopt; refusing to unpickle it"
        ) from None
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError(f"the commit record of {where} is malformed") from None
    files = _check_record(record, where)
    if record["metadata"].get("sha256") != digest or record["metadata"].get("size") != len(data):
        raise ValueError(f"the commit record of {where} does not match its {METADATA}")
    signature = record.get("signature")
    claimed = signature["key_id"] if signature is not None else None
    if key is not None:
        if signature is None:
            raise ValueError(
                f"checkpoint {where} is not signed; with a checkpoint key set, only "
                "checkpoints signed with that key load"
            )
        if claimed != key_id(key):
            raise ValueError(
                f"checkpoint {where} was signed with another key (key id {claimed!r}, "
                f"this key's id is {key_id(key)!r})"
            )
        if not hmac.compare_digest(signature["hmac_sha256"], _mac(key, record)):
            raise ValueError(
                f"checkpoint {where} has a wrong signature: its files or record were changed "
                "after it was signed"
            )
    return Commit(where, data, files, key_id(key) if key is not None else None, claimed)


def check_files(commit: Commit, full: bool) -> None:
    """Checks that every data file is there with its recorded size (``full``: every byte too,
    slice by slice; the slices cover every byte).

    Raises:
        FileNotFoundError: a data file is missing (named in the message).
        ValueError: a data file of another size or checksum (named in the message).
    """
    store = store_at(commit.where)
    fs, root = store.fs()
    for name, entry in sorted(commit.files.items()):
        path, shown = f"{root}/{name}", f"{commit.where}/{name}"
        if not fs.exists(path):
            raise FileNotFoundError(f"checkpoint data file {shown} is missing")
        store.check_regular(name)
        changed = fs.size(path) != entry["size"]
        if full and not changed:
            with fs.open(path, "rb") as f:
                changed = any(
                    _hash_range(f, n, shown) != entry["slices"][_slice_key(o, n)]
                    for o, n in _ranges(entry) or ()
                )
        if changed:
            raise ValueError(f"checkpoint data file {shown} is corrupted (checksum mismatch)")


# ----- the allowlist unpickler ------------------------------------------------------------------

_BUILDABLE: tuple[type, ...] = (
    dcp_metadata.Metadata,
    dcp_metadata.MetadataIndex,
    dcp_metadata.StorageMeta,
    dcp_metadata.TensorProperties,
    dcp_metadata.TensorStorageMetadata,
    dcp_metadata.BytesStorageMetadata,
    dcp_metadata.ChunkStorageMetadata,
    dcp_filesystem._StorageInfo,
)
"""DCP's metadata classes: the only types whose instances a ``.metadata`` may build."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {(c.__module__, c.__name__): c for c in _BUILDABLE}
    enum = dcp_metadata._MEM_FORMAT_ENCODING
    allowed[(enum.__module__, enum.__name__)] = enum
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath):
        allowed[(cls.__module__, cls.__name__)] = cls
        allowed[("pathlib", cls.__name__)] = cls
    return allowed


_ALLOWED = _allowed_globals()


class _MetadataUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Python's pickle machine, building only DCP's metadata classes and the values they hold.

    ``find_class`` hands out the allowlisted classes and constants only (no function that does
    anything but build a value), and BUILD may set state only on instances of DCP's metadata
    classes (never on a class, which would change it for the whole process). Persistent ids are
    refused (no ``persistent_load``).
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which is not one of DCP's metadata classes"
            ) from None

    def load_build(self) -> None:
        if type(self.stack[-2]) not in _BUILDABLE:
            raise pickle.UnpicklingError(
                f"it sets the state of a {type(self.stack[-2]).__name__}, "
                "which is not one of DCP's metadata classes"
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def unpickle_metadata(data: bytes, commit: Commit) -> Any:
    """DCP's metadata from ``.metadata``'s bytes, with the allowlist, checked against the record.

    Raises:
        ValueError: the bytes name anything but DCP's metadata classes, or describe data the
            record does not cover, in a way the reader would trust (sizes, slices, paths).
    """
    where = f"{commit.where}/{METADATA}"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # any malformed pickle: a clear refusal, never a crash
        raise ValueError(f"refusing to unpickle {where}: {err}") from None
    _check_metadata(metadata, commit, where)
    return metadata


MAX_CHUNKS = 4096
"""Chunks one tensor may be saved in (a split parameter has one per shard holding rows)."""


def _tiles(size: torch.Size, chunks: list) -> bool:
    """Whether ``chunks`` cover a tensor of ``size`` exactly once each element: every chunk
    inside it, no two overlapping, their elements adding up to the tensor's (a reader would
    otherwise keep uninitialised memory where a chunk is missing)."""
    boxes = []
    for chunk in chunks if 0 < len(chunks) <= MAX_CHUNKS else [None]:
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if not (
            type(chunk) is dcp_metadata.ChunkStorageMetadata
            and type(offsets) is type(sizes) is torch.Size
            and len(offsets) == len(sizes) == len(size)
            and all(o >= 0 and n >= 0 and o + n <= d for o, n, d in zip(offsets, sizes, size))
        ):
            return False
        boxes.append((tuple(offsets), tuple(sizes)))
    if sum(math.prod(n) for _, n in boxes) != math.prod(size):
        return False
    return not any(  # a few row ranges in practice
        all(a + m > b and b + n > a for a, m, b, n in zip(a_off, a_size, b_off, b_size))
        and all(a_size)
        and all(b_size)
        for i, (a_off, a_size) in enumerate(boxes)
        for b_off, b_size in boxes[i + 1 :]
    )


def _check_metadata(metadata: Any, commit: Commit, where: str) -> None:
    """The fields DCP's load path uses, with sizes bounded by the data the record covers."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{where} is malformed: {what}")

    if type(metadata) is not dcp_metadata.Metadata:
        raise bad(f"a {type(metadata).__name__}, not DCP's Metadata")
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise bad("state_dict_metadata and storage_data must be dicts")
    budget = sum(entry["size"] for entry in commit.files.values())
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise bad("a non-string key")
        if type(entry) is dcp_metadata.TensorStorageMetadata:
            props = entry.properties
            if not (
                type(props) is dcp_metadata.TensorProperties
                and isinstance(props.dtype, torch.dtype)
                and type(entry.size) is torch.Size
                and all(type(d) is int and d >= 0 for d in entry.size)
                and isinstance(entry.chunks, list)
            ):
                raise bad(f"the tensor entry {fqn!r}")
            if math.prod(entry.size) * props.dtype.itemsize > budget:
                raise bad(f"{fqn!r} is larger than all the data files together")
            if not _tiles(entry.size, entry.chunks):
                raise bad(f"the chunks of {fqn!r} do not tile it (gaps, overlaps, or outside)")
        elif type(entry) is not dcp_metadata.BytesStorageMetadata:
            raise bad(f"the entry {fqn!r} is a {type(entry).__name__}")
    planner_data = metadata.planner_data
    if planner_data is not None:
        if not isinstance(planner_data, dict):
            raise bad("planner_data must be a dict")
        for path in planner_data.values():
            if not (
                isinstance(path, tuple)
                and 0 < len(path) <= 16
                and all(type(p) is str or (type(p) is int and 0 <= p <= len(entries)) for p in path)
            ):
                raise bad("a planner_data path of anything but a few keys and small indices")
    for index, info in storage.items():
        if type(index) is not dcp_metadata.MetadataIndex or type(info) is not (
            dcp_filesystem._StorageInfo
        ):
            raise bad("storage_data must map MetadataIndex to _StorageInfo")
        name = info.relative_path
        recorded = commit.files.get(name) if isinstance(name, str) else None
        if recorded is None:
            raise bad(f"it points to {name!r}, which the commit record does not cover")
        if not (type(info.offset) is int and type(info.length) is int):
            raise bad("a slice of non-integer offset or length")
        if _slice_key(info.offset, info.length) not in recorded["slices"]:
            raise bad(f"a slice of {info.relative_path} the commit record does not cover")
        if getattr(info, "transform_descriptors", None):
            raise bad("stream transforms (shardopt writes none)")


# ----- the verifying reader ---------------------------------------------------------------------


class VerifyingReader(FileSystemReader):
    """DCP's file system reader over a checked :class:`Commit`.

    ``read_metadata`` hands out the allowlist-unpickled metadata (``.metadata`` is not read
    again), and ``read_data`` reads each slice once, checks its SHA-256 against the record, and
    only then loads it: tensors and other values alike with ``weights_only=True``.
    """

    def __init__(self, commit: Commit) -> None:
        super().__init__(commit.where)
        self.commit = commit

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        return self.commit.metadata()

    def read_data(self, plan: Any, planner: Any) -> Future:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            name = self.storage_data[item.storage_index].relative_path
            per_file.setdefault(name, []).append(item)
        fs, root = fs_of(self.commit.where)
        for name, items in per_file.items():
            digests = self.commit.files[name]["slices"]
            shown = f"{self.commit.where}/{name}"
            try:
                stream = fs.open(f"{root}/{name}", "rb")
            except FileNotFoundError:
                raise FileNotFoundError(f"checkpoint data file {shown} is missing") from None
            with stream:
                for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                    info = self.storage_data[item.storage_index]
                    stream.seek(info.offset)
                    data = stream.read(info.length)
                    expected = digests[_slice_key(info.offset, info.length)]
                    if hashlib.sha256(data).hexdigest() != expected:
                        raise ValueError(
                            f"checkpoint data file {shown} is corrupted (checksum mismatch)"
                        )
                    self._load_item(item, data, planner)
        done: Future = Future()
        done.set_result(None)
        return done

    @staticmethod
    def _load_item(item: Any, data: bytes, planner: Any) -> None:
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(data))
            return
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise ValueError(
                f"checkpoint entry {item.dest_index.fqn!r} has shape {tuple(tensor.size())}, "
                f"its metadata says {tuple(target.size())}"
            )
        target.copy_(tensor)
        planner.commit_tensor(item, target)
