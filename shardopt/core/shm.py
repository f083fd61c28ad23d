"""Shared-memory files: the zero-copy channel between the proxy and shards on its node.

A buffer is a file in ``/dev/shm`` (a tmpfs) that both processes map with
``torch.from_file(shared=True)``. The creator reserves its pages up front (``posix_fallocate``), so
a full tmpfs is a clear ``OSError`` at creation rather than a SIGBUS at first write (Docker's
default ``/dev/shm`` is 64 MB: give containers ``shm_size``). The receiving side maps the file and
unlinks it at once; the memory then lives as long as a mapping does, and nothing is left in
``/dev/shm`` when a process dies.

Talks to nothing but the file system.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import torch

SHM_DIR = "/dev/shm"
"""Where shared buffers live."""


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def create(nbytes: int) -> tuple[torch.Tensor, str]:
    """A new shared uint8 buffer of ``nbytes`` and the path another process can map it by.

    Raises:
        OSError: the tmpfs has no room for it (nothing is left behind).
    """
    path = os.path.join(SHM_DIR, f"shardopt-{os.getpid()}-{uuid.uuid4().hex}")
    size = max(nbytes, 1)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return torch.from_file(path, shared=True, size=size, dtype=torch.uint8), path


def link(path: str) -> str:
    """A second name for an existing buffer, for one more process to :func:`attach` (which
    unlinks the name it maps): a buffer read by several processes keeps its own name.

    Raises:
        FileNotFoundError: no such buffer.
    """
    other = os.path.join(SHM_DIR, f"shardopt-{os.getpid()}-{uuid.uuid4().hex}")
    os.link(path, other)
    return other


def attach(path: str, nbytes: int) -> torch.Tensor:
    """Maps a buffer another process created, and unlinks its file.

    Raises:
        FileNotFoundError: no such buffer (already mapped and unlinked, or never made):
            ``torch.from_file(shared=True)`` would silently create an unrelated empty one.
    """
    try:
        fd = os.open(path, os.O_RDWR)  # never O_CREAT
    except FileNotFoundError:
        raise FileNotFoundError(f"shared buffer {path} does not exist (mapped already?)") from None
    try:
        if os.fstat(fd).st_size < max(nbytes, 1):
            raise ValueError(f"shared buffer {path} is smaller than {nbytes} bytes")
        return torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)
    finally:
        os.close(fd)
        remove(path)


def read_into(path: str, pieces: list[tuple[int, torch.Tensor]]) -> None:
    """Reads a buffer another process created into tensors of this process, and unlinks its
    file: ``pieces`` are (offset in the file, a contiguous CPU tensor to fill with the bytes
    there). Unlike :func:`attach`, nothing is mapped, so the buffer's pages never count
    towards this process's memory: only the tensors filled do.

    Raises:
        FileNotFoundError: no such buffer.
        ValueError: the file is shorter than the pieces say.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FileNotFoundError(f"shared buffer {path} does not exist (read already?)") from None
    try:
        remove(path)
        for offset, tensor in pieces:
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise ValueError(f"shared buffer {path} ends before byte {offset + done}")
                done += n
    finally:
        os.close(fd)


def remove(path: str) -> None:
    """Unlinks a buffer's file if it is still there (mappings stay valid)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
