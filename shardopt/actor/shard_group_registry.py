"""Shard groups: many workers attached to one sharded optimizer, found by name.

The :class:`GroupRegistry` is one named, detached Ray actor per cluster (``shardopt-groups`` in
the ``shardopt`` namespace). The first worker to attach to a group name creates the group: the
registry starts its shard hosts (:class:`~shardopt.actor.shard_group_host.GroupShardHost`,
detached and named ``group/<name>/shard/<i>``), placed as the group asks
(:mod:`shardopt.actor.placement`), from that worker's parameters. Without a placement (and
without a scheduling strategy in its actor options) the hosts go where the workers are, where
those nodes have room (a soft node affinity), not to wherever the registry runs: spread over
the nodes of the placement group that worker runs in (a Ray Train worker's), else on that
worker's node; workers there reach them through shared memory. A plain group (no placement,
elasticity or replicas) takes idle hosts of closed groups on those nodes from the registry's
pool instead (:mod:`shardopt.actor.group_host_pool`; such hosts are named
``group-host/<id>``) and gives its hosts back to it when it closes. Later workers attach if
they present the same :class:`~shardopt.core.records.GroupSignature` (parameter names, shapes
and dtypes, optimizer class, hyperparameters, world size, mode...), and get a ``ValueError``
naming the first difference otherwise. An elastic group (``elastic=True``) also gets a
coordinator (:class:`~shardopt.actor.group_membership.GroupMembers`, ``group/<name>/members``)
that admits its workers (assigning ranks when they pass none) and decides each round's
participants.

The actor is created (and found) by :func:`shardopt.client.shard_group.registry`.

A replicated group (``replicate=k``) gets ``k`` replica hosts per shard and one spare host,
started in advance; the registry promotes a replica when a worker finds a primary lost
(:meth:`GroupRegistry.fail_over`) and builds a new replica on the spare when a primary reports
a replica lost (:meth:`GroupRegistry.replica_lost`), starting a new spare each time (see
:mod:`shardopt.actor.group_replica`).

Lifetime: the worker that created a group owns it. A worker's ``close()`` detaches it; the group
is torn down (shard hosts killed, placement group removed) once its owner has closed and no
worker is attached any more, or when the owner's Ray job has ended (a watchdog thread checks the
members' jobs). :meth:`GroupRegistry.close_group` tears a group down at once, from anywhere.
A member *held* by a holder (``join(..., holder=...)``: a gateway's session store, whose
sessions outlive the gateway process, :mod:`shardopt.gateway.resume`) is not detached when its
job ends, and an owner so held does not close the group with its job: that rank stays attached
until it leaves (the session closed, or expired by the gateway or its store's reaper), and a
process presenting the same holder re-attaches to it (a restarted gateway resuming it).
Ordinary workers (no holder) keep the rules above.

Talks to: Ray (named actors, the job table); workers' backends
(:mod:`shardopt.client.shard_group`) call in.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardopt.actor import placement
from shardopt.actor.group_files import close_hosts, remove_files
from shardopt.actor.group_host_pool import (
    POOLED_CONCURRENCY,
    GroupHostPool,
    poolable,
)
from shardopt.actor.group_replica import start_replica
from shardopt.actor.group_signature import signature_mismatch
from shardopt.actor.host import NAMESPACE, kill_actors
from shardopt.actor.threads import threads_per_shard
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
    held: dict[int, str] = field(default_factory=dict)  # rank -> its holder (outlives its job)
    owner_closed: bool = False
    coordinator: Any = None  # an elastic group's GroupMembers actor
    replicas: list[list[Any]] = field(default_factory=list)  # replicate=k: per shard, k hosts
    retired: list[Any] = field(default_factory=list)  # lost primaries and replicas
    spare: Any = None  # replicate=k: a started host, the next new replica
    files: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    """Shared-memory files of the shard hosts: actor id -> node, paths (removed here if the
    host dies before it can)."""

    @property
    def shard_hosts(self) -> list[Any]:
        spare = [self.spare] if self.spare is not None else []
        return [*self.hosts, *(r for rs in self.replicas for r in rs), *self.retired, *spare]

    @property
    def actors(self) -> list[Any]:
        return [*self.shard_hosts, *([self.coordinator] if self.coordinator is not None else [])]


def _versions(hosts: list[Any], timeout_s: float = 30.0) -> dict[Any, int]:
    """The version of each host that answers (the lost ones are left out), in order."""
    refs = [h.version.remote() for h in hosts]
    alive = {}
    for host, ref in zip(hosts, refs):
        try:
            alive[host] = ray.get(ref, timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            logger.warning("a group shard's replica was lost: %s", err)
    return alive


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
        holder: str | None = None,
        nodes: tuple[str, ...] = (),
    ) -> GroupMembership:
        """Attaches ``rank`` to group ``name``, creating the group if it does not exist.

        Args:
            rank: the worker's rank; None in an elastic group: the next unused one.
            actor_id: the worker's Ray actor, if it is one (an elastic group drops it when the
                actor dies).
            holder: what holds this member beyond its job (a gateway's session store), or
                None; a rank attached under the same holder is attached again (re-attached by
                a restarted gateway), not refused.
            nodes: the nodes the worker's job is laid out on
                (:func:`~shardopt.actor.placement.worker_nodes`); a group it creates without a
                placement spreads its shards over them (none: where Ray puts them).
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
                group = self._create(name, signature, rank, job_id, spec_refs, nodes)
                self._groups[name] = group
            else:
                problem = signature_mismatch(name, group.signature, signature)
                if problem is not None:
                    raise ValueError(f"cannot attach rank {rank} to group {name!r}: {problem}")
                if group.owner_closed:
                    raise OptimizerClosedError(
                        f"group {name!r} was closed by its owner (rank {group.owner_rank})"
                    )
                again = holder is not None and group.held.get(rank) == holder
                if rank is not None and rank in group.members and not again:
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
            if holder is not None:
                group.held[rank] = holder
            emit(
                logger, "worker_attached", group=name, rank=rank, job=job_id, created=created,
                holder=holder,
            )  # fmt: skip
            return GroupMembership(
                name, rank, created, tuple(group.hosts), tuple(group.keys),
                tuple(group.node_ids), group.coordinator, first_round,
                tuple(tuple(rs) for rs in group.replicas),
            )  # fmt: skip

    def _create(
        self,
        name: str,
        signature: GroupSignature,
        rank: int | None,
        job_id: str,
        spec_refs: list[Any],
        nodes: tuple[str, ...] = (),
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
        follows = config.placement is None and "scheduling_strategy" not in options
        near = placement.beside_workers(config.num_shards, nodes if follows else ())
        for o, node in zip(per_shard, near):  # by the workers: shared memory for them
            if node is not None:
                o["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
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
        fresh: list[Any | None] = [None] * config.num_shards  # a new host for every shard
        pooled = self._pooled_hosts(name, config, near) if poolable(config) else fresh
        hosts = [
            pooled[s]
            if pooled[s] is not None
            else remote_host.options(
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
            for s in range(config.num_shards)
        ]
        k = config.replicate
        replicas = [
            [start_replica(remote_host, name, s, config, options) for _ in range(k)]
            for s in range(config.num_shards)
        ]
        flat_replicas = [(s, r) for s, rs in enumerate(replicas) for r in rs]
        actors = [*hosts, *(r for _, r in flat_replicas)]
        actors += [coordinator] if coordinator is not None else []
        try:
            if coordinator is not None:
                ray.get(coordinator.set_hosts.remote(hosts))
            infos = ray.get([h.info.remote() for h in hosts])
            node_ids = [info["node_id"] for info in infos]
            reserved = config.placement is not None or "num_cpus" in dict(config.actor_options)
            threads = threads_per_shard(infos, reserved)
            keys = [f"{name}/{s}" for s in range(config.num_shards)]
            ray.get(
                [h.create.remote(keys[s], s, spec_refs[s], threads[s]) for s, h in enumerate(hosts)]
                + [r.create.remote(keys[s], s, spec_refs[s], threads[s]) for s, r in flat_replicas]
            )
            files = {
                h._actor_id.hex(): (info["node_id"], tuple(info["shm_files"]))
                for h, info in zip(hosts, ray.get([h.info.remote() for h in hosts]))
            }
            if k:
                me = ray.get_runtime_context().current_actor
                ray.get(
                    [h.set_replicas.remote(keys[s], replicas[s], me) for s, h in enumerate(hosts)]
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
        spare = start_replica(remote_host, name, -1, config, options) if k else None
        return _Group(
            signature, rank, job_id, hosts, keys, node_ids, pg, coordinator=coordinator,
            replicas=replicas if k else [], spare=spare, files=files,
        )  # fmt: skip

    def leave(self, name: str, rank: int, holder: str | None = None) -> None:
        """Detaches ``rank`` (with ``holder``: only while that holder holds it); the owner's
        leaving closes the group once nobody is attached."""
        with self._lock:
            group = self._groups.get(name)
            if group is None or (holder is not None and group.held.get(rank) != holder):
                return
            group.held.pop(rank, None)
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
        others = [h for h in group.shard_hosts if h not in kept]
        remove_files(group.files, close_hosts(others))
        kill_actors([a for a in group.actors if a not in kept])
        placement.release(group.pg)
        emit(logger, "group_closed", group=name, members=sorted(group.members))
        return True

    def _pooled_hosts(
        self, name: str, config: GroupConfig, nodes: list[str | None]
    ) -> list[Any | None]:
        """Per shard, an idle host from the pool (:mod:`shardopt.actor.group_host_pool`) on
        that shard's node (any, where None), now serving group ``name``, or None: none there,
        or one that did not answer (killed)."""
        key = placement.options_key(config.actor_options)
        taken: list[Any | None] = []
        with self._lock:
            for node in nodes:
                on_node = None if node is None else (lambda idle, n=node: idle.node == n)
                taken += self._pool.take(key, 1, accept=on_node) or [None]
        hosts: list[Any | None] = []
        for host in taken:
            if host is None:
                hosts.append(None)
                continue
            try:
                ray.get(host.reuse.remote(name, config), timeout=POOL_CALL_TIMEOUT_S)
                hosts.append(host)
            except Exception as err:  # gone meanwhile: start another
                logger.debug("pooled group host unusable: %s", err)
                kill_actors([host])
                hosts.append(None)
        return hosts

    def _recycle(self, group: _Group) -> list[Any]:
        """Gives a closed group's hosts to the pool; returns those it took."""
        key = placement.options_key(group.signature.config.actor_options)
        refs = [h.recycle.remote() for h in group.hosts]
        kept, excess = [], []
        for host, node, ref in zip(group.hosts, group.node_ids, refs):
            try:
                if not ray.get(ref, timeout=POOL_CALL_TIMEOUT_S):
                    continue  # a push still in progress: it is killed with the group
            except Exception as err:
                logger.debug("group host not recycled: %s", err)
                continue
            kept.append(host)
            with self._lock:
                excess += self._pool.give(host, key, node)
        kill_actors(excess)
        return kept

    def primary_hosts(self, name: str) -> tuple[list[Any], list[str]]:
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

    def fail_over(self, name: str, shard: int, lost: Any) -> tuple[Any, tuple[Any, ...]]:
        """Replaces shard ``shard``'s primary ``lost`` by its most advanced live replica, which
        links the others and a new one (see :mod:`shardopt.actor.group_replica`); the first
        worker to find the primary lost asks, the others get the same answer.

        Returns:
            The shard's primary and replicas now.

        Raises:
            ShardUnavailableError: the group has no live replica of the shard.
        """
        with self._lock:
            group = self._groups.get(name)
            if group is None:
                raise OptimizerClosedError(f"group {name!r} does not exist (any more)")
            current = group.hosts[shard]
            replicas = group.replicas[shard] if group.replicas else []
            if current._actor_id != lost._actor_id:  # another worker asked first
                return current, tuple(replicas)
            try:
                ray.get(current.info.remote(), timeout=30)
                return current, tuple(replicas)  # it is alive: the caller may retry
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            emit(logger, "shard_lost", logging.WARNING, group=name, shard=shard)
            alive = _versions(replicas)
            if not alive:
                raise ShardUnavailableError(
                    f"shard {shard} of group {name!r} was lost and has no live replica "
                    f"({len(replicas)} kept: replicate=k keeps k)"
                )
            promoted = max(alive, key=lambda r: alive[r])  # the first of the highest version
            others = [r for r in alive if r is not promoted]
            new = self._take_spare(group, name)
            me = ray.get_runtime_context().current_actor
            key = group.keys[shard]
            try:
                ray.get(promoted.take_over.remote(key, others, new, group.coordinator, me))
            except Exception:
                kill_actors([new])
                raise
            group.retired += [current, *(r for r in replicas if r not in alive)]
            group.hosts[shard], group.replicas[shard] = promoted, [*others, new]
            if group.coordinator is not None:
                group.coordinator.set_hosts.remote(group.hosts)
            emit(
                logger, "replica_promoted", logging.WARNING, group=name, shard=shard,
                version=alive[promoted], replicas=len(group.replicas[shard]),
            )  # fmt: skip
            missing = group.signature.config.replicate - len(group.replicas[shard])
            for _ in range(missing):  # more were lost with it: rebuilt after this call
                me.replica_lost.remote(name, shard, None)
            return promoted, tuple(group.replicas[shard])

    def replica_lost(self, name: str, shard: int, lost: Any) -> bool:
        """A replica of shard ``shard`` was lost (``lost``; None: one is missing): a new one is
        built on the group's spare host from an export of the primary, under the primary's
        lock (see :mod:`shardopt.actor.group_replica`). Called by the primary, which dropped the
        lost one from its rounds already. Returns whether a replica was built."""
        with self._lock:
            group = self._groups.get(name)
            if group is None or not group.replicas:
                return False
            replicas = group.replicas[shard]
            if lost is not None:
                ids = [r._actor_id for r in replicas]
                if lost._actor_id not in ids:
                    return False  # already replaced (or a fail-over dropped it)
                group.retired.append(replicas.pop(ids.index(lost._actor_id)))
                kill_actors([lost])  # dropped from the rounds: stale from now on (if alive)
            if len(replicas) >= group.signature.config.replicate:
                return False
            primary, new = group.hosts[shard], self._take_spare(group, name)
            try:
                ray.get(new.info.remote())  # started: the primary's rounds wait for no process
                ray.get(primary.add_replica.remote(group.keys[shard], new))
            except Exception as err:  # the primary was lost too: its fail-over rebuilds
                logger.warning("group %r: no new replica of shard %d: %s", name, shard, err)
                group.retired.append(new)
                return False
            replicas.append(new)
            emit(
                logger, "replica_rebuilt", logging.WARNING, group=name, shard=shard,
                replicas=len(replicas),
            )  # fmt: skip
            return True

    @staticmethod
    def _take_spare(group: _Group, name: str) -> Any:
        """The group's spare host (started beforehand), replaced by a new one starting now."""
        from shardopt.actor.shard_group_host import GroupShardHost

        config = group.signature.config
        spare, group.spare = (
            group.spare,
            start_replica(ray.remote(GroupShardHost), name, -1, config, dict(config.actor_options)),
        )
        return spare

    def hosts_of(self, name: str, shard: int) -> tuple[Any, tuple[Any, ...]]:
        """Shard ``shard``'s primary and replicas now (a worker's view may be older)."""
        with self._lock:
            group = self._groups.get(name)
            if group is None:
                raise OptimizerClosedError(f"group {name!r} does not exist (any more)")
            replicas = group.replicas[shard] if group.replicas else []
            return group.hosts[shard], tuple(replicas)

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._groups

    def groups(self) -> dict[str, dict[str, Any]]:
        """Every live group: its attached ranks, owner, whether the owner has closed it, and
        (replicated) how many replicas each shard has now."""
        with self._lock:
            return {
                name: {
                    "members": sorted(g.members),
                    "owner_rank": g.owner_rank,
                    "owner_closed": g.owner_closed,
                    "held": {r: h for r, h in sorted(g.held.items())},
                    "node_ids": list(g.node_ids),
                    "world_size": g.signature.config.world_size,
                    "mode": g.signature.config.mode,
                    "elastic": g.signature.config.elastic,
                    "replicate": g.signature.config.replicate,
                    "replicas": [len(rs) for rs in g.replicas],
                }
                for name, g in self._groups.items()
            }

    def _collect(self, name: str) -> None:
        group = self._groups[name]
        if group.owner_closed and not group.members:
            self.close_group(name)

    def _watch(self) -> None:
        """Detaches the members of ended jobs (not held ones); an ended owner job counts as the
        owner closing (unless the owner is held)."""
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
                    gone = [
                        r for r, job in group.members.items() if job in dead and r not in group.held
                    ]
                    for r in gone:
                        job = group.members.pop(r)
                        emit(logger, "worker_dropped", logging.WARNING, group=name, rank=r, job=job)
                        if group.coordinator is not None:
                            group.coordinator.drop.remote(r, "its job ended")
                    if group.owner_job in dead and group.owner_rank not in group.held:
                        group.owner_closed = True
                    self._collect(name)
