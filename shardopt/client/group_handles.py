"""A group worker's typed handles on its group's shards: push and pull, mirrored to replicas.

:class:`GroupShardHandle` adds a worker's push and pull to the shard calls of
:class:`~shardopt.client.handles.ShardHandle`; in a replicated group
(``replicate=k``, :mod:`shardopt.actor.group_replica`) :class:`MirroredGroupShardHandle` also
forwards the calls that change a shard (parameter writes, loads) to its replicas, as the
registry knows them now (a lost replica is rebuilt on another host).

Talks to: the group's shard hosts (:mod:`shardopt.actor.shard_group_host`) and the group
registry (:mod:`shardopt.actor.shard_group_registry`), both through Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shardopt.client.handles import ShardHandle
from shardopt.client.replication import MirroredHandle
from shardopt.client.runtime import ray_get
from shardopt.core.errors import ShardUnavailableError
from shardopt.core.records import GroupMembership, PushRequest

logger = logging.getLogger(__name__)


class GroupShardHandle(ShardHandle):
    """A handle on one shard of a group: the shard calls, and a worker's push and pull."""

    def push(self, request: PushRequest) -> Any:
        return self.host.push.remote(self.key, request)

    def pull(self, rank: int | None = None, at_least: int = 0) -> Any:
        return self.host.pull.remote(self.key, rank, at_least)

    def attach_shared(self, rank: int, node_id: str, own_copy: bool = False) -> Any:
        return self.host.attach_shared.remote(self.key, rank, node_id, own_copy)

    def open_push_lane(self, rank: int) -> Any:
        return self.host.open_lane.remote(self.key, rank)

    def open_net_lane(self, rank: int) -> Any:
        return self.host.open_net_lane.remote(self.key, rank)


class MirroredGroupShardHandle(MirroredHandle, GroupShardHandle):
    """A replicated group shard's handle: a worker's calls that change the shard (parameter
    writes, loads) reach its replica too (rounds reach it from the primary)."""


class _GroupReplicas:
    """The replicas of a group's shards as :class:`MirroredHandle` forwards calls to them: the
    registry's current ones (a lost replica is rebuilt on another host, which this worker's
    membership does not know of), each call to every one that is alive."""

    def __init__(self, name: str, keys: list[str], registry: Any) -> None:
        self.name = name
        self.keys = keys
        self.registry = registry

    def follow(self, shard: int, call: Callable[[ShardHandle], Any], changes_state: bool) -> None:
        _, replicas = ray_get(self.registry.hosts_of.remote(self.name, shard))
        for replica in replicas:
            try:
                ray_get(call(ShardHandle(replica, self.keys[shard], shard)))
            except ShardUnavailableError as err:  # its primary drops it at its next round
                logger.warning(
                    "group %r: a replica of shard %d was lost: %s", self.name, shard, err
                )


def group_handles(membership: GroupMembership, registry: Any) -> list[GroupShardHandle]:
    """A worker's handles on its group's shards (mirrored to their replicas, if any;
    ``registry``: the group registry actor, which knows the replicas now)."""
    hosts, keys = list(membership.hosts), list(membership.keys)
    if not membership.replicas:
        return [GroupShardHandle(h, k, s) for s, (h, k) in enumerate(zip(hosts, keys))]
    replicas = _GroupReplicas(membership.name, keys, registry)
    return [
        MirroredGroupShardHandle(h, k, s, replicas)  # type: ignore[arg-type]
        for s, (h, k) in enumerate(zip(hosts, keys))
    ]
