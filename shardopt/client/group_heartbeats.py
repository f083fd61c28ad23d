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


def leave_group(registry: Any, name: str, rank: int, elastic: Heartbeats | None) -> None:
    """Detaches a worker (run by close() or when its optimizer is collected)."""
    if elastic is not None:
        elastic.stop()
    if not ray.is_initialized():
        return
    try:
        registry.leave.remote(name, rank)
        if elastic is not None and elastic.rank != rank:  # re-admitted under another rank
            elastic.coordinator.leave.remote(elastic.rank)
    except Exception:  # the cluster is going away
        pass


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
