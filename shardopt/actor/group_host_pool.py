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
the registry kills the others (the bookkeeping is :class:`~shardopt.core.idle_pool.IdlePool`'s).

Talks to nothing: the registry starts, recycles and kills the hosts it holds.
"""

from __future__ import annotations

from shardopt.core.idle_pool import IdlePool
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


class GroupHostPool(IdlePool):
    """The idle hosts, by options key (see :class:`~shardopt.core.idle_pool.IdlePool`). Not
    thread-safe: the registry calls it under its lock."""

    def __init__(self, max_idle: int = MAX_IDLE_HOSTS, idle_timeout_s: float = IDLE_TIMEOUT_S):
        super().__init__(max_idle, idle_timeout_s)
