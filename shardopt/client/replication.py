"""Fault tolerance: an in-memory replica of every shard, and recovery of lost shards.

With ``ShardedOptimizer(..., replicate=True)`` every shard has a replica: the same
:class:`~shardopt.actor.shard.Shard`, on a shard host of another node where there is one, that
receives every call that changes a shard (steps with their gradients, parameter writes, loads,
new param groups) after its primary does. Ray runs one caller's calls to an actor in
order and torch's per-tensor kernels are deterministic, so the replica's parameters and state
stay bit-identical to the primary's; its lag is at most one step (the proxy collects the
replica's answers before the next step), except while a new replica's host is starting.

Steps reach the replicas only once every primary has applied them, so when a step fails on
some shards after others applied it, every shard is rolled back from its replica
(:meth:`Replicas.roll_back`) and the step is applied nowhere.

When a primary is lost (its actor died or its node went away), the proxy promotes the replica:
it resends the step in flight, which the replica answers from its exactly-once cache if it
already applied it, and a new replica is built from an export of the promoted shard. When a
primary and its replica are both lost, the shard is rebuilt from this process's copy of its
parameters (the values after the last completed step) and the optimizer state of the last
checkpoint this optimizer saved or loaded, with a warning that says how many steps of
optimizer state were lost (all of it when there is no checkpoint). Nothing is lost silently.

Memory: a replica holds a second copy of its shard's parameters, gradient buffer and optimizer
state (for AdamW, 4x the parameter bytes), on another node.

The calls that change a shard reach its replica through :class:`MirroredHandle`, a
:class:`~shardopt.client.handles.ShardHandle` that forwards them; steps are sent by the backend
(:meth:`Replicas.step`) once every primary has applied them.

Talks to: shard hosts through typed handles; the backend it replicates
(:class:`~shardopt.client.local.LocalShards`): its handles, hosts' nodes and threads, and its
copy of the parameters for a rebuild.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardopt.actor.host import NAMESPACE, ShardHost, kill_actors
from shardopt.checkpoint.integrity import Commit
from shardopt.client.handles import ShardHandle
from shardopt.client.runtime import host_name, host_pool, idle_replica_hosts, ray_get
from shardopt.core.buffers import to_numpy
from shardopt.core.events import emit
from shardopt.core.metrics import REPLICA_LAG
from shardopt.core.records import ShardSpec, StepRequest

logger = logging.getLogger(__name__)


def replica_interval(replicate: Any, refresh: Any, group: str | None, in_cluster: bool) -> int:
    """Checks ``replicate`` and ``replica_refresh``; returns how often a worker's own shards'
    replicas are refreshed (0: no replicas; 1: they run every step).

    Args:
        replicate: False, True, or a number of replicas per shard (above 1: shard groups).
        refresh: a worker's own replicas are refreshed every ``refresh`` steps.
        group: the shard group's name, if any (its options are checked by ``make_config``).
        in_cluster: whether the shards are reached in the Ray cluster with per-tensor steps
            (not a gateway session, not LBFGS).

    Raises:
        ValueError: replicas where they do not apply, a value that is not a bool or an int
            >= 0 (``replicate``) or >= 1 (``replica_refresh``), several replicas of a worker's
            own shards, a refresh interval without ``replicate=True`` or in a group.
    """
    if not isinstance(replicate, (bool, int)) or replicate < 0:
        raise ValueError(f"Invalid replicate: {replicate!r} (False, True, or replicas >= 1)")
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
        raise ValueError(f"Invalid replica_refresh: {refresh!r} (an int >= 1, in steps)")
    if replicate and not in_cluster:
        raise ValueError("replicate=True applies in the Ray cluster, not to gateways/LBFGS")
    if refresh != 1 and (group is not None or replicate is not True and replicate != 1):
        raise ValueError(
            f"replica_refresh={refresh} applies to a worker's own shards with replicate=True "
            "(a shard group's replicas follow every round)"
        )
    if group is None and replicate is not True and replicate > 1:
        raise ValueError(
            f"replicate={replicate}: a worker's own shards keep one replica each (replicate="
            f"True); several replicas per shard are for sync shard groups. To refresh the "
            f"replica every {replicate} steps instead of running each step on it, pass "
            f"replicate=True, replica_refresh={replicate}"
        )
    return refresh if replicate and group is None else 0


class Replicated(Protocol):
    """What replicas need of the backend whose shards they replicate."""

    handles: list[ShardHandle]  # the primaries (a promoted replica replaces its primary)
    host_nodes: list[str]
    threads: list[int | None]
    actor_options: dict[str, Any]

    @property
    def next_step_id(self) -> int: ...

    def spec_now(self, shard: int) -> ShardSpec:
        """A spec for ``shard`` from the client's copy of its parameters."""

    def lost_shared_memory(self, shard: int) -> None:
        """The shard's primary moved to a host that shares no memory with the client."""

    def hold(self, handle: ShardHandle) -> None:
        """A shard created on a host of the pool: dropped, and its host released, at close."""


@dataclasses.dataclass(frozen=True)
class MirroredHandle(ShardHandle):
    """A primary's handle whose calls that change the shard reach its replica too."""

    replicas: Replicas | None = None

    def _follow(self, call: Callable[[ShardHandle], Any], changes_state: bool) -> None:
        assert self.replicas is not None
        self.replicas.follow(self.index, call, changes_state)

    def set_params(self, update: Any) -> Any:
        ref = super().set_params(update)
        self._follow(lambda r: r.set_params(update), True)
        return ref

    def add_param_group(self, options: dict[str, Any], block: Any) -> Any:
        ref = super().add_param_group(options, block)
        self._follow(lambda r: r.add_param_group(options, block), True)
        return ref

    def set_param_state(self, param_id: int, packed: Any) -> Any:
        ref = super().set_param_state(param_id, packed)
        self._follow(lambda r: r.set_param_state(param_id, packed), True)
        return ref

    def clear_param_state(self, param_id: int) -> Any:
        ref = super().clear_param_state(param_id)
        self._follow(lambda r: r.clear_param_state(param_id), True)
        return ref

    def prepare_load(self, token: str, group_options: Any, packed: Any) -> Any:
        ref = super().prepare_load(token, group_options, packed)
        self._follow(lambda r: r.prepare_load(token, group_options, packed), False)
        return ref

    def prepare_load_from_checkpoint(self, token: str, group_options: Any, commit: Any) -> Any:
        ref = super().prepare_load_from_checkpoint(token, group_options, commit)
        self._follow(lambda r: r.prepare_load_from_checkpoint(token, group_options, commit), False)
        return ref

    def commit_load(self, token: str) -> Any:
        ref = super().commit_load(token)
        self._follow(lambda r: r.commit_load(token), True)
        return ref

    def abort_load(self, token: str) -> Any:
        ref = super().abort_load(token)
        self._follow(lambda r: r.abort_load(token), False)
        return ref


class Replicas:
    """The replicas of one backend's shards, and the recovery of its lost shards."""

    def __init__(self, shards: Replicated, interval: int = 1) -> None:
        self._shards = shards
        self.interval = interval
        n = len(shards.handles)
        self._log: list[list[StepRequest]] = [[] for _ in range(n)]
        self._refreshing: list[Any] = [None] * n
        self._stale = [False] * n  # a refresh is due
        self._changed = [False] * n  # ... for a change no log holds (a load)
        self.handles: list[ShardHandle | None] = [None] * n
        self.nodes: list[str | None] = [None] * n
        self._pending: list[list[Any]] = [[] for _ in range(n)]
        self._building: list[Any] = [None] * n  # a replica being built: steps queue behind it
        self.recoveries = 0
        self.replayed = 0  # logged steps replayed on replicas (interval > 1)
        self.owned: list[Any] = []  # every host started here (killed when the optimizer goes)
        # the last checkpoint saved or loaded, as committed/checked then; the step id it was
        # taken before
        self.checkpoint: tuple[Commit, int] | None = None

    def mirrored(self, shard: int) -> MirroredHandle:
        """The primary's handle, with the calls that change the shard forwarded here."""
        primary = self._shards.handles[shard]
        return MirroredHandle(primary.host, primary.key, primary.index, self)

    def _replica_key(self, shard: int) -> str:
        return f"{self._shards.handles[shard].key}/replica{self.recoveries or ''}"

    # ----- placement --------------------------------------------------------------------------

    def _start_host(self, shard: int) -> Any:
        """A dedicated shard host on another node than the shard's primary, where possible."""
        primary = self._shards.host_nodes[shard]
        alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
        others = [n for n in alive if n != primary] or alive
        node = others[shard % len(others)]
        options = self._host_options()
        host = idle_replica_hosts.take(options, primary if len(alive) > 1 else None)
        if host is None:  # none left by a closed optimizer of this process
            host = (
                ray.remote(ShardHost)
                .options(
                    namespace=NAMESPACE,
                    name=host_name("replica"),
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
                    **options,
                )
                .remote()
            )
        self.owned.append(host)
        self.nodes[shard] = None
        return host

    def _node_of(self, shard: int) -> str | None:
        """The replica host's node (asked for once, when first needed)."""
        handle = self.handles[shard]
        if self.nodes[shard] is None and handle is not None:
            self.nodes[shard] = ray_get(handle.host.info.remote())["node_id"]
        return self.nodes[shard]

    def start(self, specs: list[ShardSpec]) -> None:
        """Creates every shard's replica from the same specs as the primaries."""
        hosts = [self._start_host(s) for s in range(len(specs))]  # start together
        infos = ray_get([h.info.remote() for h in hosts])
        self.nodes = [info["node_id"] for info in infos]
        self.handles = [ShardHandle(h, self._replica_key(s), s) for s, h in enumerate(hosts)]
        threads = self._shards.threads
        ray_get(
            [
                h.host.create.remote(h.key, s, spec, False, threads[s])
                for s, (h, spec) in enumerate(zip(self.handles, specs))
            ]
        )

    def _rebuild(self, shard: int) -> None:
        """A new replica for ``shard``, from an export of its primary (taken after the calls
        already sent to it)."""
        export = self._shards.handles[shard].export()
        host = self._start_host(shard)  # the step in flight does not wait for it
        emit(logger, "replica_rebuilt", shard=shard, recoveries=self.recoveries)
        handle = self.handles[shard] = ShardHandle(host, self._replica_key(shard), shard)
        threads = self._shards.threads[shard]
        self._pending[shard] = []
        self._building[shard] = host.create_from.remote(handle.key, shard, export, threads)

    def _host_options(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in self._shards.actor_options.items()
            if k not in ("scheduling_strategy", "name")
        }

    def close(self) -> None:
        """Empties the dedicated hosts of replicas and promoted replicas, and leaves them to
        the next replicated optimizer of this process (or kills them, see
        :class:`~shardopt.client.runtime.IdleReplicaHosts`)."""
        owner = self._shards.handles[0].key.rsplit("/", 1)[0] if self._shards.handles else ""
        options = self._host_options()
        for host in self.owned:
            if owner:
                idle_replica_hosts.give(host, options, owner)
            else:
                kill_actors([host])
        self.owned = []
        self.handles = [None] * len(self.handles)

    # ----- keeping replicas current -----------------------------------------------------------

    def follow(self, shard: int, call: Callable[[ShardHandle], Any], changes_state: bool) -> None:
        """Makes the replica follow a call its primary got (see :class:`MirroredHandle`).

        With ``interval`` 1 the replica gets the same call; with a longer one, a change no log
        holds refreshes the replica from its primary at once (a prepared load changes nothing
        until it is committed).
        """
        handle = self.handles[shard]
        if handle is None:
            return
        if self.interval == 1:
            self._pending[shard].append(call(handle))
        elif changes_state:
            # No log holds this change: the replica is refreshed from the primary right after
            # it, before the caller goes on (so a loss right after the change loses nothing).
            self._changed[shard] = True
            self._refresh(shard)
            ref, _, _ = self._refreshing[shard]
            self._refreshing[shard] = None
            try:
                ray.get(ref)
                self._changed[shard] = False
            except Exception as err:  # the primary failed the change or was lost: see recover
                logger.warning("refreshing the replica of shard %d failed: %s", shard, err)

    def step(self, shard: int, request: StepRequest) -> None:
        """Sends a step to the replica (interval 1), or logs it until the next refresh."""
        handle = self.handles[shard]
        if handle is None:
            return
        if self.interval == 1:
            self._pending[shard].append(handle.step(request))
            return
        copy = dataclasses.replace(request, grads=request.grads.copy())  # buffers are reused
        self._log[shard].append(copy)
        if (request.step_id + 1) % self.interval == 0:
            self._stale[shard] = True

    def _refresh(self, shard: int) -> None:
        """Copies the primary's current parameters, state and step history to the replica."""
        export = self._shards.handles[shard].export()
        # the export holds at least every step before the one last started (the log is trimmed
        # to that; a replay goes by what the replica reports it has applied)
        self._refreshing[shard] = (
            self.handles[shard].restore(export),
            self._shards.next_step_id - 1,
            self._changed[shard],
        )
        self._stale[shard] = False

    def settle(self) -> None:
        """Waits for the replicas' answers so far; replaces a replica that was lost.

        A replica still being built (its host starting) is not waited for: the calls sent to
        it queue up and run once it exists, so the lag of one step holds again soon after.
        """
        for s in range(len(self._pending)):
            if self.handles[s] is not None:  # what the replica has not applied yet
                lag = len(self._log[s]) if self.interval > 1 else len(self._pending[s])
                REPLICA_LAG.observe(lag)
            refreshing = self._refreshing[s]
            if refreshing is not None and ray.wait([refreshing[0]], timeout=0)[0]:
                self._refreshing[s] = None
                try:
                    ray.get(refreshing[0])
                    # the replica now holds every step before `refreshing[1]`
                    self._log[s] = [r for r in self._log[s] if r.step_id >= refreshing[1]]
                    if refreshing[2]:
                        self._changed[s] = False
                except Exception as err:
                    logger.warning("refreshing the replica of shard %d failed: %s", s, err)
                    self._stale[s] = True
            if self._stale[s] and self._refreshing[s] is None and self.handles[s] is not None:
                self._refresh(s)
        for s, pending in enumerate(self._pending):
            building = self._building[s]
            if building is not None:
                if not ray.wait([building], timeout=0)[0]:
                    continue
                self._building[s] = None
                pending = [building, *pending]
            if not pending:
                continue
            self._pending[s] = []
            try:
                ray.get(pending)
            except Exception as err:  # a task error the primary got too, or a lost replica
                if not self._usable(s):
                    emit(logger, "replica_lost", logging.WARNING, shard=s, error=err)
                    self.handles[s] = None
                    self._rebuild(s)

    # ----- recovery ---------------------------------------------------------------------------

    def _usable(self, shard: int) -> bool:
        """Whether the replica's host is alive and holds the shard (it may have failed to
        build from a primary that was lost at the same time)."""
        handle = self.handles[shard]
        if handle is None:
            return False
        building = [self._building[shard]] if self._building[shard] is not None else []
        try:
            ray.get(building + self._pending[shard], timeout=120)
        except Exception as err:  # judged by what the host holds, below
            logger.debug("replica of shard %d: %s", shard, err)
        try:
            return handle.key in ray.get(handle.host.info.remote(), timeout=30)["shards"]
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    def recover(self, shard: int, request: StepRequest, flat: Any) -> Any:
        """Replaces the lost primary of ``shard`` and resends ``request`` to it.

        Args:
            request: the step in flight (``grads`` None when they were in shared memory).
            flat: the shard's gradient buffer of this step (for a request without grads).

        Returns:
            The ref of the resent step.
        """
        shards = self._shards
        self.recoveries += 1
        if request.grads is None:
            request = dataclasses.replace(request, grads=to_numpy(flat))
        request = dataclasses.replace(request, return_params=True)
        host_pool.forget(shards.handles[shard].host)
        replica = self.handles[shard]
        emit(logger, "shard_lost", logging.WARNING, shard=shard, step=request.step_id)
        if replica is not None and self._usable(shard) and self._catch_up(shard):
            shards.handles[shard] = replica
            shards.host_nodes[shard] = self._node_of(shard)
            emit(
                logger, "replica_promoted", logging.WARNING, shard=shard,
                node=shards.host_nodes[shard], step=request.step_id, recoveries=self.recoveries,
            )  # fmt: skip
            self.handles[shard] = None
            shards.lost_shared_memory(shard)
            ref = replica.step(request)
            self._pending[shard], self._building[shard] = [], None
            self._rebuild(shard)
            return ref
        return self._from_checkpoint(shard, request)

    def roll_back(self, shards: list[int]) -> list[int]:
        """Restores the primaries of ``shards`` from their replicas, which have not seen the step
        in flight (the backend sends it to them only once every primary has applied it).

        Returns:
            The shards that could not be rolled back (no usable replica, or one that cannot be
            brought up to the step before).
        """
        stuck, restores = [], []
        for s in shards:
            replica = self.handles[s]
            if replica is None or not (self._usable(s) and self._catch_up(s)):
                stuck.append(s)
                continue
            restores.append(self._shards.handles[s].restore(replica.export()))
        ray_get(restores)
        if restores:
            emit(
                logger, "step_rolled_back", logging.WARNING,
                shards=sorted(set(shards) - set(stuck)), stuck=stuck,
            )  # fmt: skip
        return stuck

    def _catch_up(self, shard: int) -> bool:
        """Replays on the replica the logged steps it has not applied (interval > 1).

        Returns:
            Whether the replica is current up to the step in flight.
        """
        log, self._log[shard] = self._log[shard], []
        if self.interval == 1:
            return True
        replica = self.handles[shard]
        assert replica is not None
        try:
            refreshing = self._refreshing[shard]
            if refreshing is not None:  # a refresh in flight: let it land (or fail) first
                self._refreshing[shard] = None
                try:
                    ray.get(refreshing[0], timeout=120)
                    if refreshing[2]:
                        self._changed[shard] = False
                except Exception as err:  # from an older export then; the log covers steps
                    logger.debug("refresh of shard %d's replica: %s", shard, err)
            if self._changed[shard]:
                return False  # a load or parameter write that reached no replica
            applied = ray_get(replica.status()).last_step_id
            in_flight = self._shards.next_step_id - 1
            replay = [r for r in log if applied < r.step_id < in_flight]
            if replay and replay[0].step_id != applied + 1:
                return False  # a gap: the steps in between are in no log
            ray_get([replica.step(r) for r in replay])
            self.replayed += len(replay)
            return True
        except Exception as err:
            logger.warning("the replica of shard %d could not catch up: %s", shard, err)
            return False

    def _from_checkpoint(self, shard: int, request: StepRequest) -> Any:
        """Rebuilds a shard whose primary and replica are both lost (see the module docstring)."""
        shards = self._shards
        (host,), (info,) = host_pool.acquire(1, shards.actor_options)
        handle = ShardHandle(host, f"{host_pool.new_owner_key()}/{shard}", shard)
        shards.hold(handle)  # released with the others (their finalizer's list)
        spec = shards.spec_now(shard)
        ray_get(host.create.remote(handle.key, shard, spec, False, shards.threads[shard]))
        lost_steps = request.step_id
        source = "no checkpoint was saved or loaded: all of its optimizer state is lost"
        if self.checkpoint is not None:
            commit, taken_before = self.checkpoint
            token = uuid.uuid4().hex
            error, _ = ray_get(
                handle.prepare_load_from_checkpoint(token, spec.group_options, commit)
            )
            if error is not None:
                raise error
            ray_get(handle.commit_load(token))
            lost_steps = request.step_id - taken_before
            source = f"its optimizer state comes from checkpoint {commit.where!r}"
        message = (
            f"shard {shard} and its replica were both lost; its parameters were restored from "
            f"this process's copy (after the last completed step) and {source}: {lost_steps} "
            f"step(s) of optimizer state lost for parameters {list(spec.params.param_ids)}"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=5)
        emit(
            logger, "shard_restored", logging.ERROR, shard=shard, node=info["node_id"],
            lost_steps=lost_steps, checkpoint=self.checkpoint is not None, detail=message,
        )  # fmt: skip
        shards.handles[shard] = handle
        shards.host_nodes[shard] = info["node_id"]
        shards.lost_shared_memory(shard)
        ref = handle.step(request)
        self._pending[shard], self._building[shard] = [], None
        self._rebuild(shard)
        return ref
