"""Idle things kept for reuse, by key: the bookkeeping shared by shardopt's process pools.

Starting a Ray actor is a new worker process importing torch (seconds), so a closed shard
group's hosts (:mod:`shardopt.actor.group_host_pool`) and a closed optimizer's replica hosts
(:class:`~shardopt.client.runtime.IdleReplicaHosts`) are kept idle for the next user with the
same key (their actor options). :class:`IdlePool` holds them: at most ``max_idle`` (giving one
more lets the oldest go), each at most ``idle_timeout_s`` (None: no limit), taken most recently
used first. It only keeps lists: its owner checks, recycles and kills the hosts, and locks it.

Talks to nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Idle:
    """One idle item, the key it serves, where it runs (if known) and since when."""

    item: Any
    key: str
    node: str | None
    since: float


class IdlePool:
    """Idle items, oldest first. Not thread-safe: its owner calls it under a lock of its own.

    Args:
        max_idle: the most items kept.
        idle_timeout_s: how long an item may stay idle (see :meth:`expired`); None: forever.
    """

    def __init__(self, max_idle: int, idle_timeout_s: float | None = None) -> None:
        if max_idle < 0:
            raise ValueError(f"max_idle must be >= 0, got {max_idle}")
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        self._idle: list[Idle] = []

    def take(
        self, key: str, count: int = 1, accept: Callable[[Idle], bool] | None = None
    ) -> list[Any]:
        """Up to ``count`` items kept for ``key`` (and that ``accept`` takes, if given), most
        recently used first; they leave the pool."""
        taken: list[Idle] = []
        for entry in reversed(self._idle):
            if len(taken) == count:
                break
            if entry.key == key and (accept is None or accept(entry)):
                taken.append(entry)
        self._idle = [e for e in self._idle if all(e is not t for t in taken)]
        return [e.item for e in taken]

    def give(self, item: Any, key: str, node: str | None = None) -> list[Any]:
        """Keeps ``item`` for ``key``; returns the items the pool lets go of (the oldest beyond
        ``max_idle``, possibly ``item`` itself when ``max_idle`` is 0): the caller ends them."""
        self._idle.append(Idle(item, key, node, time.monotonic()))
        excess = len(self._idle) - self.max_idle
        if excess <= 0:
            return []
        dropped, self._idle = self._idle[:excess], self._idle[excess:]
        return [e.item for e in dropped]

    def expired(self) -> list[Any]:
        """Takes out the items idle longer than ``idle_timeout_s`` (the caller ends them)."""
        if self.idle_timeout_s is None:
            return []
        now = time.monotonic()
        old = [e for e in self._idle if now - e.since > self.idle_timeout_s]
        self._idle = [e for e in self._idle if all(e is not o for o in old)]
        return [e.item for e in old]

    def clear(self) -> list[Any]:
        """Takes out every item (the caller ends them, or forgets them with their cluster)."""
        items, self._idle = [e.item for e in self._idle], []
        return items

    def __len__(self) -> int:
        return len(self._idle)
