"""A lock between one process that changes a shared-memory buffer and the processes that copy it,
with the buffer's version beside it.

An async group shard applies every push as it arrives, while the workers on its node copy its
parameters out of its shared buffer (:mod:`shardopt.actor.group_buffers`). A :class:`ReadGate` is
a small file in ``/dev/shm`` that they all open: a reader copies under a shared ``flock(2)`` and
the writer changes the buffer under an exclusive one, so no copy ever sees half a step; the file
holds the buffer's version (8 bytes, little-endian), written under the exclusive lock and read
under the shared one, so a reader knows which version it copied. ``flock`` is the kernel's: it
works the same on every architecture, orders the memory accesses around it (a system call), and
is let go of when a process dies while holding it.

The writer waits for readers at most ``timeout_s`` and then raises (a reader holds the lock for
one copy of the buffer, so only a stopped process holds it longer); readers wait for the writer
without a limit, as the writer is the process that answered them.

Talks to the file system (``/dev/shm``) only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
import weakref
from collections.abc import Iterator

from shardopt.core import shm

_VERSION = struct.Struct("<q")


class ReadGate:
    """One end of a gate: the writer's (:meth:`create`) or a reader's (:meth:`open`)."""

    def __init__(self, fd: int, path: str | None) -> None:
        self._fd = fd
        self._path = path  # the writer's file, removed at close (readers' names are unlinked)
        self._depth = 0  # the writer's nested writing() blocks (its callers serialize them)
        self._release = weakref.finalize(self, _release, fd, path)  # at close, or when collected

    @classmethod
    def create(cls, version: int = 0) -> ReadGate:
        """The writer's end, at ``version`` (nobody reads it yet).

        Raises:
            OSError: ``/dev/shm`` has no room for it.
        """
        _, path = shm.create(_VERSION.size)
        fd = os.open(path, os.O_RDWR)
        gate = cls(fd, path)
        os.pwrite(fd, _VERSION.pack(version), 0)
        return gate

    @classmethod
    def open(cls, path: str) -> ReadGate:
        """A reader's end, from a name :meth:`link` gave (the name is unlinked).

        Raises:
            FileNotFoundError: no such gate (opened already, or never made).
        """
        try:
            fd = os.open(path, os.O_RDONLY)  # never O_CREAT
        except FileNotFoundError:
            raise FileNotFoundError(f"read gate {path} does not exist (opened already?)") from None
        shm.remove(path)
        return cls(fd, None)

    @property
    def path(self) -> str:
        """The writer's file (its readers' names are gone once they opened them)."""
        if self._path is None:
            raise ValueError("a reader's end of a read gate has no file name")
        return self._path

    def link(self) -> str:
        """A name for one more reader to :meth:`open`."""
        if self._path is None:
            raise ValueError("only the writer's end of a read gate hands out names")
        return shm.link(self._path)

    @contextlib.contextmanager
    def writing(self, timeout_s: float) -> Iterator[None]:
        """The block runs while no reader copies (nested blocks take the lock once).

        Raises:
            TimeoutError: a reader held its lock for more than ``timeout_s``.
        """
        if self._depth == 0:
            self._lock_exclusive(timeout_s)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _lock_exclusive(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pause = 5e-5
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"a reader of a shared parameter buffer held it for more than "
                        f"{timeout_s:g} s (a stopped worker process?)"
                    ) from None
                time.sleep(pause)  # a reader's copy takes a millisecond or so
                pause = min(pause * 2, 2e-3)

    def set_version(self, version: int) -> None:
        """(The writer, inside :meth:`writing`.) The version the buffer now holds."""
        if self._depth == 0:
            raise RuntimeError("a read gate's version is set inside writing()")
        os.pwrite(self._fd, _VERSION.pack(version), 0)

    @contextlib.contextmanager
    def reading(self) -> Iterator[int]:
        """The block runs while the writer changes nothing; yields the buffer's version."""
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            (version,) = _VERSION.unpack(os.pread(self._fd, _VERSION.size, 0))
            yield version
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Closes this end (its lock goes with it); the writer's also removes its file."""
        self._release()


def _release(fd: int, path: str | None) -> None:
    os.close(fd)
    if path is not None:
        shm.remove(path)
