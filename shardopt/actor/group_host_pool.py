"""Idle shard hosts of closed shard groups, kept for the next group the registry creates.

Starting a :class:`~shardopt.actor.shard_group_host.GroupShardHost` is a new worker process
importing torch: seconds. A training script, a test suite or a sweep that makes group after
group would pay that for every shard of every group. So the registry
(:mod:`shardopt.actor.shard_group_registry`) hands the hosts of a group it closes to this pool
(once each host has dropped its shard, files and lanes: :meth:`GroupShardHost.recycle
<shardopt.actor.shard_group_host.GroupShardHost.recycle>`), and a new group takes hosts from it
before it starts any.

Only the hosts of plain groups are pooled: no placement group (a host lives in its group's
reservation), not elastic, not replicated (their hosts come and go with fail-overs), world
sizes up to :data:`MAX_POOLED_WORLD_SIZE` (a pooled host is started with the thread count such
a group needs). A host is reused only for the very same actor options (resources, runtime
environment...). At most :data:`MAX_IDLE_HOSTS` wait, each at most :data:`IDLE_TIMEOUT_S`;
the registry kills the others.

Talks to nothing: the registry starts, recycles and kills the hosts it holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from shardopt.core.records import GroupConfig

MAX_POOLED_WORLD_SIZE = 64
"""The largest world size whose group takes (and gives back) pooled hosts."""
POOLED_CONCURRENCY = MAX_POOLED_WORLD_SIZE + 8
"""The ``max_concurrency`` a poolable host is started with (a sync round's pushes all wait)."""
MAX_IDLE_HOSTS = 8
"""Idle hosts kept at most; the registry kills the ones beyond."""
IDLE_TIMEOUT_S = 600.0
"""An idle host not taken within this long is killed."""


def poolable(config: GroupConfig) -> bool:
    """Whether a group with ``config`` takes its hosts from the pool and gives them back."""
    return (
        config.placement is None
        and not config.elastic
        and not config.replicate
        and config.world_size is not None
        and config.world_size <= MAX_POOLED_WORLD_SIZE
    )


@dataclass
class _Idle:
    host: Any
    key: str
    since: float


class GroupHostPool:
    """The idle hosts, oldest first. Not thread-safe: the registry calls it under its lock."""

    def __init__(self, max_idle: int = MAX_IDLE_HOSTS, idle_timeout_s: float = IDLE_TIMEOUT_S):
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        self._idle: list[_Idle] = []

    def take(self, key: str, count: int) -> list[Any]:
        """Up to ``count`` idle hosts started with options ``key`` (most recently used first)."""
        taken: list[Any] = []
        for entry in reversed(list(self._idle)):
            if len(taken) == count:
                break
            if entry.key == key:
                self._idle.remove(entry)
                taken.append(entry.host)
        return taken

    def give(self, host: Any, key: str) -> list[Any]:
        """Keeps ``host``; returns the hosts the pool lets go of (the oldest beyond
        ``max_idle``): the caller kills them."""
        self._idle.append(_Idle(host, key, time.monotonic()))
        excess = len(self._idle) - self.max_idle
        if excess <= 0:
            return []
        dropped, self._idle = self._idle[:excess], self._idle[excess:]
        return [e.host for e in dropped]

    def expired(self) -> list[Any]:
        """Takes out the hosts idle longer than ``idle_timeout_s`` (the caller kills them)."""
        now = time.monotonic()
        old = [e for e in self._idle if now - e.since > self.idle_timeout_s]
        self._idle = [e for e in self._idle if e not in old]
        return [e.host for e in old]

    def __len__(self) -> int:
        return len(self._idle)
