"""An elastic group worker's liveness: the heartbeats that tell its coordinator it is alive,
and how a worker leaves its group.

An elastic shard group (:mod:`shardopt.client.shard_group`) drops a worker whose heartbeats stop
for ``heartbeat_timeout_s``; :class:`Heartbeats` sends them from a background thread, never on
the step's path. :func:`leave_group` detaches a worker from the registry (and, elastic, from the
coordinator), run by ``close()`` or when its optimizer is collected.

Talks to: the group registry and coordinator actors (given to it), through Ray.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

logger = logging.getLogger(__name__)


LEAVE_WAIT_S = 30.0
"""How long ``close()`` waits for the registry to let a worker go (and end its group)."""


def leave_group(
    registry: Any, name: str, rank: int, elastic: Heartbeats | None, wait_s: float | None = None
) -> None:
    """Detaches a worker (run by close() or when its optimizer is collected).

    Args:
        wait_s: (close()) wait at most this long for the registry to have let it go, and,
            where it was the group's last worker, ended the group: its hosts closed and their
            shared-memory files removed, before the caller goes on (and perhaps stops Ray).
            Collecting an optimizer does not wait.
    """
    if elastic is not None:
        elastic.stop()
    if not ray.is_initialized():
        return
    try:
        left = registry.leave.remote(name, rank)
        if elastic is not None and elastic.rank != rank:  # re-admitted under another rank
            elastic.coordinator.leave.remote(elastic.rank)
        if wait_s is not None:
            ray.get(left, timeout=wait_s)
    except Exception as err:  # the cluster is going away, or the registry is busy
        logger.debug("leaving group %r: %s", name, err)


class Heartbeats:
    """A background thread telling an elastic group's coordinator that this worker is alive
    (a few times per ``heartbeat_timeout``; never on the step's path)."""

    def __init__(self, coordinator: Any, rank: int, timeout_s: float) -> None:
        self.coordinator = coordinator
        self.rank = rank
        self._stop = threading.Event()
        self._interval = timeout_s / 5
        self._thread = threading.Thread(target=self._run, daemon=True, name="shardopt-heartbeat")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.coordinator.heartbeat.remote(self.rank)
            except Exception as err:  # Ray going away, or the group torn down
                logger.debug("heartbeat not sent: %s", err)

    def stop(self) -> None:
        self._stop.set()
