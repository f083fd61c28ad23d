"""Shard groups: many workers attached to one sharded optimizer, found by name.

The :class:`GroupRegistry` is one named, detached Ray actor per cluster (``shardopt-groups`` in
the ``shardopt`` namespace). The first worker to attach to a group name creates the group: the
registry starts its shard hosts (:class:`~shardopt.actor.shard_group_host.GroupShardHost`,
detached and named ``group/<name>/shard/<i>``), placed as the group asks
(:mod:`shardopt.actor.placement`), from that worker's parameters. A plain group (no placement,
elasticity or replicas) takes idle hosts of closed groups from the registry's pool instead
(:mod:`shardopt.actor.group_host_pool`; such hosts are named ``group-host/<id>``) and gives
its hosts back to it when it closes. Later workers attach if they present the same
:class:`~shardopt.core.records.GroupSignature` (parameter names, shapes and dtypes, optimizer
class, hyperparameters, world size, mode...), and get a ``ValueError`` naming the first
difference otherwise. An elastic group (``elastic=True``) also gets a coordinator
(:class:`~shardopt.actor.group_membership.GroupMembers`, ``group/<name>/members``) that admits
its workers (assigning ranks when they pass none) and decides each round's participants.

The actor is created (and found) by :func:`shardopt.client.shard_group.registry`.

Lifetime: the worker that created a group owns it. A worker's ``close()`` detaches it; the group
is torn down (shard hosts killed, placement group removed) once its owner has closed and no
worker is attached any more, or when the owner's Ray job has ended (a watchdog thread checks the
members' jobs). :meth:`GroupRegistry.close_group` tears a group down at once, from anywhere.

Talks to: Ray (named actors, the job table); workers' backends
(:mod:`shardopt.client.shard_group`) call in.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

import ray

from shardopt.actor import placement
from shardopt.actor.group_host_pool import (
    POOLED_CONCURRENCY,
    GroupHostPool,
    options_key,
    poolable,
)
from shardopt.actor.group_replica import start_replica
from shardopt.actor.host import NAMESPACE, kill_actors, threads_per_shard
from shardopt.core.errors import OptimizerClosedError, ShardUnavailableError
from shardopt.core.events import emit
from shardopt.core.records import GroupConfig, GroupMembership, GroupSignature

logger = logging.getLogger(__name__)

REGISTRY_NAME = "shardopt-groups"
"""The registry actor's name (in the ``shardopt`` namespace)."""
WATCH_INTERVAL_S = 1.0
POOL_CALL_TIMEOUT_S = 30.0
"""How long recycling or reusing a pooled host may take before it is killed instead."""


@dataclass
class _Group:
    signature: GroupSignature
    owner_rank: int
    owner_job: str
    hosts: list[Any]
    keys: list[str]
    node_ids: list[str]
    pg: Any
    members: dict[int, str] = field(default_factory=dict)  # rank -> job id
    owner_closed: bool = False
    coordinator: Any = None  # an elastic group's GroupMembers actor
    replicas: list[Any] = field(default_factory=list)  # replicate=True: per shard, or None
    retired: list[Any] = field(default_factory=list)  # primaries replaced by their replicas
    spare: Any = None  # replicate=True: a started host, the next fail-over's new replica

    @property
    def actors(self) -> list[Any]:
        extra = [a for a in (self.coordinator, self.spare) if a is not None]
        return [*self.hosts, *self.replicas, *self.retired, *extra]


def _option_mismatch(where: str, ours: tuple, theirs: tuple, name: str) -> str | None:
    mine, group = dict(ours), dict(theirs)
    for key in sorted(set(mine) | set(group)):
        if mine.get(key, "<unset>") != group.get(key, "<unset>"):
            return (
                f"{where} {key!r} is {mine.get(key, '<unset>')!r} here, "
                f"{group.get(key, '<unset>')!r} in group {name!r}"
            )
    return None


def signature_mismatch(name: str, group: GroupSignature, mine: GroupSignature) -> str | None:
    """The first difference between a worker's signature and its group's, in words."""
    if mine.optimizer_class != group.optimizer_class:
        return (
            f"optimizer class is {mine.optimizer_class} here, {group.optimizer_class} in "
            f"group {name!r}"
        )
    if mine.group_sizes != group.group_sizes:
        return (
            f"param group sizes are {list(mine.group_sizes)} here, {list(group.group_sizes)} "
            f"in group {name!r}"
        )
    if mine.group_splits != group.group_splits:
        return (
            f"split (per param group) is {list(mine.group_splits)} here, "
            f"{list(group.group_splits)} in group {name!r}"
        )
    if len(group.params) != len(mine.params):
        return (
            f"this worker has {len(mine.params)} parameters, group {name!r} has {len(group.params)}"
        )
    for i, (theirs, ours) in enumerate(zip(group.params, mine.params)):
        if theirs != ours:
            what = ("name", "shape", "dtype")
            k = next(k for k in range(3) if theirs[k] != ours[k])
            return (
                f"parameter {i} ({ours[0]!r}) has {what[k]} {ours[k]!r} here, "
                f"{theirs[k]!r} in group {name!r}"
            )
    problem = _option_mismatch("hyperparameter", mine.defaults, group.defaults, name)
    for g, (ours, theirs) in enumerate(zip(mine.group_options, group.group_options)):
        problem = problem or _option_mismatch(f"param group {g} option", ours, theirs, name)
    if problem:
        return problem
    for f in fields(GroupConfig):
        ours, theirs = getattr(mine.config, f.name), getattr(group.config, f.name)
        if ours != theirs:
            return f"{f.name} is {ours!r} here, {theirs!r} in group {name!r}"
    return None


def _close_hosts(hosts: list[Any], timeout_s: float = 10.0) -> None:
    """Asks a group's shard hosts to remove their shared-memory files before they are killed."""
    try:
        ray.wait([h.close.remote() for h in hosts], num_returns=len(hosts), timeout=timeout_s)
    except Exception as err:  # hosts already gone
        logger.debug("closing group hosts: %s", err)


class GroupRegistry:
    """The cluster's shard groups by name: creation, attachment, lifetime. A plain class, made
    a named detached actor by :func:`shardopt.client.shard_group.registry`."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._groups: dict[str, _Group] = {}
        self._pool = GroupHostPool()  # idle hosts of closed plain groups, for the next ones
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, daemon=True)
        self._watchdog.start()

    def join(
        self,
        name: str,
        signature: GroupSignature,
        rank: int | None,
        job_id: str,
        spec_refs: list[Any],
        actor_id: str | None = None,
    ) -> GroupMembership:
        """Attaches ``rank`` to group ``name``, creating the group if it does not exist.

        Args:
            rank: the worker's rank; None in an elastic group: the next unused one.
            actor_id: the worker's Ray actor, if it is one (an elastic group drops it when the
                actor dies).
            spec_refs: object refs to the worker's shard specs (its initial parameters), one
                per shard; only the shard hosts of a group being created read them.

        Raises:
            ValueError: the signature differs from the group's, or the rank is taken.
            PlacementError: the cluster cannot place the group's shards.
        """
        with self._lock:
            group = self._groups.get(name)
            created = group is None
            if group is None:
                if not spec_refs:
                    raise LookupError(f"group {name!r} does not exist (any more): send specs")
                group = self._create(name, signature, rank, job_id, spec_refs)
                self._groups[name] = group
            else:
                problem = signature_mismatch(name, group.signature, signature)
                if problem is not None:
                    raise ValueError(f"cannot attach rank {rank} to group {name!r}: {problem}")
                if group.owner_closed:
                    raise OptimizerClosedError(
                        f"group {name!r} was closed by its owner (rank {group.owner_rank})"
                    )
                if rank is not None and rank in group.members:
                    raise ValueError(
                        f"rank {rank} is already attached to group {name!r} (attached ranks: "
                        f"{sorted(group.members)}); each worker needs its own rank"
                    )
            first_round = 0
            if group.coordinator is not None:
                try:
                    admission = ray.get(group.coordinator.admit.remote(rank, actor_id, job_id))
                except Exception:
                    if created:
                        self.close_group(name)
                    raise
                rank, first_round = admission.rank, admission.first_round
                if created:
                    group.owner_rank = rank
            assert rank is not None
            group.members[rank] = job_id
            emit(logger, "worker_attached", group=name, rank=rank, job=job_id, created=created)
            return GroupMembership(
                name, rank, created, tuple(group.hosts), tuple(group.keys),
                tuple(group.node_ids), group.coordinator, first_round, tuple(group.replicas),
            )  # fmt: skip

    def _create(
        self,
        name: str,
        signature: GroupSignature,
        rank: int | None,
        job_id: str,
        spec_refs: list[Any],
    ) -> _Group:
        from shardopt.actor.group_membership import GroupMembers
        from shardopt.actor.shard_group_host import (
            GroupShardHost,  # torch only where shards are made
        )

        config = signature.config
        options = dict(config.actor_options)
        pg, per_shard = None, [dict(options) for _ in range(config.num_shards)]
        if config.placement is not None:
            bundle = dict(config.shard_resources)
            pg, placed = placement.reserve(
                config.num_shards, config.placement, bundle, f"shardopt/{name}", config.timeout_s
            )
            per_shard = [{**options, **p} for p in placed]
        coordinator = None
        if config.elastic:
            coordinator = (
                ray.remote(GroupMembers)
                .options(
                    name=f"group/{name}/members",
                    namespace=NAMESPACE,
                    lifetime="detached",
                    max_concurrency=2 * config.num_shards + (config.world_size or 64) + 8,
                    num_cpus=0,
                )
                .remote(name, config.num_shards, config.heartbeat_timeout_s, config.world_size)
            )
        remote_host = ray.remote(GroupShardHost)
        hosts = self._pooled_hosts(name, config) if poolable(config) else []
        hosts += [
            remote_host.options(
                name=(
                    f"group-host/{uuid.uuid4().hex[:12]}"  # serves one group after another
                    if poolable(config)
                    else f"group/{name}/shard/{s}"
                ),
                namespace=NAMESPACE,
                lifetime="detached",
                max_concurrency=(
                    POOLED_CONCURRENCY if poolable(config) else (config.world_size or 64) + 8
                ),
                **per_shard[s],
            ).remote(name, config, coordinator)
            for s in range(len(hosts), config.num_shards)
        ]
        replicas = [
            start_replica(remote_host, name, s, config, options) if config.replicate else None
            for s in range(config.num_shards)
        ]
        actors = [*hosts, *replicas, *([coordinator] if coordinator is not None else [])]
        try:
            if coordinator is not None:
                ray.get(coordinator.set_hosts.remote(hosts))
            infos = ray.get([h.info.remote() for h in hosts])
            node_ids = [info["node_id"] for info in infos]
            reserved = config.placement is not None or "num_cpus" in dict(config.actor_options)
            threads = threads_per_shard(node_ids, reserved)
            keys = [f"{name}/{s}" for s in range(config.num_shards)]
            ray.get(
                [h.create.remote(keys[s], s, spec_refs[s], threads[s]) for s, h in enumerate(hosts)]
                + [
                    r.create.remote(keys[s], s, spec_refs[s], threads[s])
                    for s, r in enumerate(replicas)
                    if r is not None
                ]
            )
            ray.get(
                [h.set_replica.remote(keys[s], r) for s, (h, r) in enumerate(zip(hosts, replicas))]
            )
        except Exception:
            kill_actors([a for a in actors if a is not None])
            placement.release(pg)
            raise
        emit(
            logger, "group_created", group=name, rank=rank, shards=config.num_shards,
            world_size=config.world_size, mode=config.mode, nodes=node_ids,
            elastic=config.elastic,
        )  # fmt: skip
        spare = start_replica(remote_host, name, -1, config, options) if config.replicate else None
        return _Group(
            signature, rank, job_id, hosts, keys, node_ids, pg, coordinator=coordinator,
            replicas=replicas if config.replicate else [], spare=spare,
        )  # fmt: skip

    def leave(self, name: str, rank: int) -> None:
        """Detaches ``rank``; the owner's leaving closes the group once nobody is attached."""
        with self._lock:
            group = self._groups.get(name)
            if group is None:
                return
            if group.members.pop(rank, None) is not None:
                emit(logger, "worker_detached", group=name, rank=rank)
                if group.coordinator is not None:
                    group.coordinator.leave.remote(rank)
            if rank == group.owner_rank:
                group.owner_closed = True
            self._collect(name)

    def close_group(self, name: str) -> bool:
        """Tears a group down now, attached workers or not. Returns whether it existed."""
        with self._lock:
            group = self._groups.pop(name, None)
        if group is None:
            return False
        kept = self._recycle(group) if poolable(group.signature.config) else []
        shard_hosts = [*group.hosts, *group.replicas, *group.retired, group.spare]
        _close_hosts([h for h in shard_hosts if h is not None and h not in kept])
        kill_actors([a for a in group.actors if a is not None and a not in kept])
        placement.release(group.pg)
        emit(logger, "group_closed", group=name, members=sorted(group.members))
        return True

    def _pooled_hosts(self, name: str, config: GroupConfig) -> list[Any]:
        """Idle hosts from the pool (:mod:`shardopt.actor.group_host_pool`), now serving
        group ``name``; a host that does not answer is killed and left out."""
        with self._lock:
            taken = self._pool.take(options_key(dict(config.actor_options)), config.num_shards)
        hosts = []
        for host in taken:
            try:
                ray.get(host.reuse.remote(name, config), timeout=POOL_CALL_TIMEOUT_S)
                hosts.append(host)
            except Exception as err:  # gone meanwhile: start another
                logger.debug("pooled group host unusable: %s", err)
                kill_actors([host])
        return hosts

    def _recycle(self, group: _Group) -> list[Any]:
        """Gives a closed group's hosts to the pool; returns those it took."""
        key = options_key(dict(group.signature.config.actor_options))
        refs = [h.recycle.remote() for h in group.hosts]
        kept, excess = [], []
        for host, ref in zip(group.hosts, refs):
            try:
                if not ray.get(ref, timeout=POOL_CALL_TIMEOUT_S):
                    continue  # a push still in progress: it is killed with the group
            except Exception as err:
                logger.debug("group host not recycled: %s", err)
                continue
            kept.append(host)
            with self._lock:
                excess += self._pool.give(host, key)
        kill_actors(excess)
        return kept

    def shard_hosts(self, name: str) -> tuple[list[Any], list[str]]:
        """Group ``name``'s shard hosts (the current primaries) and its shards' keys.

        Raises:
            KeyError: no such group.
        """
        with self._lock:
            group = self._groups[name]
            return list(group.hosts), list(group.keys)

    def pooled_hosts(self) -> int:
        """How many idle group hosts wait for the next group."""
        with self._lock:
            return len(self._pool)

    def fail_over(self, name: str, shard: int, lost: Any) -> tuple[Any, Any]:
        """Replaces shard ``shard``'s primary ``lost`` by its replica, which gets a new replica
        (see :mod:`shardopt.actor.group_replica`); the first worker to find the primary lost
        asks, the others get the same answer.

        Returns:
            The shard's primary and replica now.

        Raises:
            ShardUnavailableError: the group has no (usable) replica of the shard.
        """
        with self._lock:
            group = self._groups.get(name)
            if group is None:
                raise OptimizerClosedError(f"group {name!r} does not exist (any more)")
            current = group.hosts[shard]
            if current._actor_id != lost._actor_id:  # another worker asked first
                return current, group.replicas[shard]
            try:
                ray.get(current.info.remote(), timeout=30)
                return current, group.replicas[shard]  # it is alive: the caller may retry
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            replica = group.replicas[shard] if group.replicas else None
            if replica is None:
                raise ShardUnavailableError(
                    f"shard {shard} of group {name!r} was lost and has no replica "
                    "(replicate=True keeps one)"
                )
            from shardopt.actor.shard_group_host import GroupShardHost

            config = group.signature.config
            new = group.spare  # started already: the fail-over does not wait for a process
            group.spare = start_replica(
                ray.remote(GroupShardHost), name, -1, config, dict(config.actor_options)
            )
            try:
                ray.get(replica.take_over.remote(group.keys[shard], new, group.coordinator))
            except Exception:
                kill_actors([new])
                raise
            group.retired.append(current)
            group.hosts[shard], group.replicas[shard] = replica, new
            if group.coordinator is not None:
                group.coordinator.set_hosts.remote(group.hosts)
            emit(logger, "replica_promoted", logging.WARNING, group=name, shard=shard)
            return replica, new

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._groups

    def groups(self) -> dict[str, dict[str, Any]]:
        """Every live group: its attached ranks, owner, and whether the owner has closed it."""
        with self._lock:
            return {
                name: {
                    "members": sorted(g.members),
                    "owner_rank": g.owner_rank,
                    "owner_closed": g.owner_closed,
                    "node_ids": list(g.node_ids),
                    "world_size": g.signature.config.world_size,
                    "mode": g.signature.config.mode,
                    "elastic": g.signature.config.elastic,
                    "replicate": g.signature.config.replicate,
                }
                for name, g in self._groups.items()
            }

    def _collect(self, name: str) -> None:
        group = self._groups[name]
        if group.owner_closed and not group.members:
            self.close_group(name)

    def _watch(self) -> None:
        """Detaches the members of ended jobs; an ended owner job counts as the owner closing."""
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                dead = {j["JobID"] for j in ray._private.state.jobs() if j.get("IsDead")}
            except Exception as err:  # GCS briefly unreachable: try again
                logger.debug("job table unavailable: %s", err)
                continue
            with self._lock:
                expired = self._pool.expired()
            kill_actors(expired)
            with self._lock:
                for name in list(self._groups):
                    group = self._groups[name]
                    gone = [r for r, job in group.members.items() if job in dead]
                    for r in gone:
                        job = group.members.pop(r)
                        emit(logger, "worker_dropped", logging.WARNING, group=name, rank=r, job=job)
                        if group.coordinator is not None:
                            group.coordinator.drop.remote(r, "its job ended")
                    if group.owner_job in dead:
                        group.owner_closed = True
                    self._collect(name)
