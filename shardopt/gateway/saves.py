"""A session's checkpoint saves in the background (``SaveCheckpoint`` with ``background``).

A background save returns once the shards are writing the state as of the call; its
:class:`~shardopt.checkpoint.format.SaveHandle` waits here, under an id, until the client's
``WaitCheckpoint`` finds it written and commits it (or reports its error). Until then the
directory stays locked against other saves. A session holds at most :data:`MAX_SAVES` saves in
flight, and closing a session commits the ones it left (a save's lock is this process's, so
none is left locked). Waiting is bounded: at most :data:`MAX_WAIT_S` per call.

Talks to: the saves' handles (the shards write; the commit runs in this process).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from shardopt.checkpoint.format import SaveHandle
from shardopt.core.errors import QuotaExceededError

logger = logging.getLogger(__name__)

MAX_SAVES = 2
"""Background saves one session may have in flight."""
MAX_WAIT_S = 60.0
"""The longest one WaitCheckpoint call waits."""
_POLL_S = 0.05


@dataclass
class _Save:
    path: str
    handle: SaveHandle
    lock: threading.Lock = field(default_factory=threading.Lock)


class BackgroundSaves:
    """One session's background saves by id (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._saves: dict[str, _Save] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._saves)

    def reserve(self) -> None:
        """Checks that another save may start.

        Raises:
            QuotaExceededError: the session has :data:`MAX_SAVES` in flight.
        """
        if len(self) >= MAX_SAVES:
            raise QuotaExceededError(
                f"this session has {MAX_SAVES} checkpoint saves in flight; wait for one "
                f"(WaitCheckpoint) first"
            )

    def add(self, path: str, handle: SaveHandle) -> str:
        """Keeps a started save; returns its id."""
        save_id = uuid.uuid4().hex[:16]
        with self._lock:
            self._saves[save_id] = _Save(path, handle)
        return save_id

    def wait(self, save_id: str, timeout_s: float) -> tuple[str, bool]:
        """Waits up to ``timeout_s`` for save ``save_id``'s files and commits it once written.

        Returns:
            Its path and whether it is committed (a committed save is forgotten).

        Raises:
            KeyError: no such save (NOT_FOUND: never started, or committed already).
            ValueError: a timeout that is negative or over :data:`MAX_WAIT_S`.
            Exception: the save's own error (it is forgotten; nothing was committed).
        """
        if not 0 <= timeout_s <= MAX_WAIT_S:
            raise ValueError(f"Invalid timeout: {timeout_s} s (0 to {MAX_WAIT_S:g})")
        with self._lock:
            save = self._saves.get(save_id)
        if save is None:
            raise KeyError(f"no checkpoint save {save_id!r} in flight in this session")
        with save.lock:  # one commit, whoever asks first
            deadline = time.monotonic() + timeout_s
            while not save.handle.done():
                if time.monotonic() >= deadline:
                    return save.path, False
                time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
            try:
                save.handle.wait()
            finally:
                with self._lock:
                    self._saves.pop(save_id, None)
        return save.path, True

    def finish_all(self) -> None:
        """Commits every save left (a closing session); errors are logged."""
        with self._lock:
            saves, self._saves = dict(self._saves), {}
        for save_id, save in saves.items():
            with save.lock:
                try:
                    save.handle.wait()
                except Exception:  # the client never asked: its error goes to the log
                    logger.exception("background checkpoint save %s failed", save_id)
