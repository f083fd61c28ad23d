"""Fault tolerance: an in-memory replica of every shard, and recovery of lost shards.

With ``ShardedOptimizer(..., replicate=True)`` every shard has a replica: the same
:class:`~shardopt.shard.Shard`, on a shard host of another node where there is one, that
receives every call that changes a shard (steps with their gradients, parameter writes, loads,
new param groups) right after its primary does. Ray runs one caller's calls to an actor in
order and torch's per-tensor kernels are deterministic, so the replica's parameters and state
stay bit-identical to the primary's; its lag is at most one step (the proxy collects the
replica's answers before the next step), except while a new replica's host is starting.

When a primary is lost (its actor died or its node went away), the proxy promotes the replica:
it resends the step in flight, which the replica answers from its exactly-once cache if it
already applied it, and a new replica is built from an export of the promoted shard. When a
primary and its replica are both lost, the shard is rebuilt from this process's copy of its
parameters (the values after the last completed step) and the optimizer state of the last
checkpoint this optimizer saved or loaded, with a warning that says how many steps of
optimizer state were lost (all of it when there is no checkpoint). Nothing is lost silently.

Memory: a replica holds a second copy of its shard's parameters, gradient buffer and optimizer
state (for AdamW, 4x the parameter bytes), on another node.

Talks to: shard hosts through Ray; the proxy (:mod:`shardopt.optimizer`) calls in.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
import warnings
from typing import TYPE_CHECKING, Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardopt.buffers import FlatLayout, to_numpy
from shardopt.groups import group_options
from shardopt.records import ParamBlock, ShardSpec, StepRequest
from shardopt.runtime import NAMESPACE, host_pool, ray_get

if TYPE_CHECKING:
    from shardopt.checkpoint_integrity import Commit
    from shardopt.optimizer import ShardedOptimizer

logger = logging.getLogger(__name__)

MIRRORED = frozenset(
    {
        "set_params",
        "add_param_group",
        "set_param_state",
        "prepare_load",
        "prepare_load_from_checkpoint",
        "commit_load",
        "abort_load",
    }
)
"""Shard methods that change a shard, sent to its replica too (steps are sent by the proxy)."""
CHANGES_STATE = frozenset({"set_params", "add_param_group", "set_param_state", "commit_load"})
"""Of those, the ones after which a replica refreshed from its primary must be refreshed again
(a prepared load changes nothing until it is committed)."""


def kill_hosts(hosts: list[Any]) -> None:
    """Kills the dedicated hosts replicas (and promoted replicas) live on."""
    if not ray.is_initialized():  # the cluster is gone, and its actors with it
        return
    for host in hosts:
        if host is not None:
            try:
                ray.kill(host)
            except Exception:  # already gone
                pass


class Replicas:
    """The replicas of one optimizer's shards, and the recovery of its lost shards."""

    def __init__(self, proxy: ShardedOptimizer, interval: int = 1) -> None:
        self._proxy = proxy
        self.interval = interval
        self._log: list[list[StepRequest]] = [[] for _ in range(proxy.num_shards)]
        self._refreshing: list[Any] = [None] * proxy.num_shards
        self._stale = [False] * proxy.num_shards  # a refresh is due
        self._changed = [False] * proxy.num_shards  # ... for a change no log holds (a load)
        n = proxy.num_shards
        self.hosts: list[Any] = [None] * n
        self.keys = [f"{k}/replica" for k in proxy._keys]
        self.nodes: list[str | None] = [None] * n
        self._pending: list[list[Any]] = [[] for _ in range(n)]
        self._building: list[Any] = [None] * n  # a replica being built: steps queue behind it
        self.recoveries = 0
        self.replayed = 0  # logged steps replayed on replicas (interval > 1)
        self.owned: list[Any] = []  # every host started here (killed when the optimizer goes)
        # the last checkpoint saved or loaded, as committed/checked then; the step id it was
        # taken before
        self.checkpoint: tuple[Commit, int] | None = None

    # ----- placement --------------------------------------------------------------------------

    def _start_host(self, shard: int, wait: bool = True) -> Any:
        """A dedicated shard host on another node than the shard's primary, where possible."""
        primary = self._proxy._host_nodes[shard]
        alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
        others = [n for n in alive if n != primary] or alive
        node = others[shard % len(others)]
        from shardopt.shard import ShardHost

        options = {
            k: v for k, v in self._proxy._actor_options.items() if k != "scheduling_strategy"
        }
        host = (
            ray.remote(ShardHost)
            .options(
                namespace=NAMESPACE,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
                **options,
            )
            .remote()
        )
        self.owned.append(host)
        self.hosts[shard] = host
        self.nodes[shard] = None
        if wait:
            self._node_of(shard)
        return host

    def _node_of(self, shard: int) -> str | None:
        """The replica host's node (asked for once, when first needed)."""
        if self.nodes[shard] is None and self.hosts[shard] is not None:
            self.nodes[shard] = ray_get(self.hosts[shard].info.remote())["node_id"]
        return self.nodes[shard]

    def start(self, specs: list[ShardSpec], threads: list[int | None]) -> None:
        """Creates every shard's replica from the same specs as the primaries."""
        hosts = [self._start_host(s, wait=False) for s in range(len(specs))]  # start together
        infos = ray_get([h.info.remote() for h in hosts])
        self.nodes = [info["node_id"] for info in infos]
        ray_get(
            [
                h.create.remote(self.keys[s], s, spec, False, threads[s])
                for s, (h, spec) in enumerate(zip(hosts, specs))
            ]
        )

    def _rebuild(self, shard: int) -> None:
        """A new replica for ``shard``, from an export of its primary (taken after the calls
        already sent to it)."""
        proxy = self._proxy
        export = proxy._hosts[shard].call.remote(proxy._keys[shard], "export")
        host = self._start_host(shard, wait=False)  # the step in flight does not wait for it
        threads = proxy._threads[shard]
        self._pending[shard] = []
        self._building[shard] = host.create_from.remote(self.keys[shard], shard, export, threads)

    def close(self) -> None:
        kill_hosts(self.owned)
        self.hosts = [None] * len(self.hosts)

    # ----- keeping replicas current -----------------------------------------------------------

    def mirror(self, shard: int, method: str, args: tuple) -> None:
        host = self.hosts[shard]
        if host is None or method not in MIRRORED:
            return
        if self.interval == 1:
            self._pending[shard].append(host.call.remote(self.keys[shard], method, *args))
        elif method in CHANGES_STATE:
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
        host = self.hosts[shard]
        if host is None:
            return
        if self.interval == 1:
            self._pending[shard].append(host.call.remote(self.keys[shard], "step", request))
            return
        copy = dataclasses.replace(request, grads=request.grads.copy())  # buffers are reused
        self._log[shard].append(copy)
        if (request.step_id + 1) % self.interval == 0:
            self._stale[shard] = True

    def _refresh(self, shard: int) -> None:
        """Copies the primary's current parameters, state and step history to the replica."""
        proxy = self._proxy
        export = proxy._hosts[shard].call.remote(proxy._keys[shard], "export")
        host = self.hosts[shard]
        # the export holds at least every step before the one last started (the log is trimmed
        # to that; a replay goes by what the replica reports it has applied)
        self._refreshing[shard] = (
            host.call.remote(self.keys[shard], "restore", export),
            proxy._next_step_id - 1,
            self._changed[shard],
        )
        self._stale[shard] = False

    def settle(self) -> None:
        """Waits for the replicas' answers so far; replaces a replica that was lost.

        A replica still being built (its host starting) is not waited for: the calls sent to
        it queue up and run once it exists, so the lag of one step holds again soon after.
        """
        for s in range(len(self._pending)):
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
            if self._stale[s] and self._refreshing[s] is None and self.hosts[s] is not None:
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
                    logger.warning(
                        "the replica of shard %d was lost (%s); making a new one", s, err
                    )
                    self.hosts[s] = None
                    self._rebuild(s)

    # ----- recovery ---------------------------------------------------------------------------

    def _usable(self, shard: int) -> bool:
        """Whether the replica's host is alive and holds the shard (it may have failed to
        build from a primary that was lost at the same time)."""
        host = self.hosts[shard]
        if host is None:
            return False
        building = [self._building[shard]] if self._building[shard] is not None else []
        try:
            ray.get(building + self._pending[shard], timeout=120)
        except Exception as err:  # judged by what the host holds, below
            logger.debug("replica of shard %d: %s", shard, err)
        try:
            return self.keys[shard] in ray.get(host.info.remote(), timeout=30)["shards"]
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
        proxy = self._proxy
        self.recoveries += 1
        if request.grads is None:
            request = dataclasses.replace(request, grads=to_numpy(flat))
        request = dataclasses.replace(request, return_params=True)
        old_host = proxy._hosts[shard]
        host_pool.forget(old_host)
        if self._usable(shard) and self._catch_up(shard):
            logger.warning("shard %d was lost; its replica takes over", shard)
            proxy._hosts[shard], proxy._keys[shard] = self.hosts[shard], self.keys[shard]
            proxy._host_nodes[shard] = self._node_of(shard)
            self.hosts[shard] = None
            self.keys[shard] = f"{proxy._keys[shard]}/r{self.recoveries}"
            proxy._map_shared(shard, None)
            ref = proxy._hosts[shard].call.remote(proxy._keys[shard], "step", request)
            self._pending[shard], self._building[shard] = [], None
            self._rebuild(shard)
            return ref
        return self._from_checkpoint(shard, request)

    def _catch_up(self, shard: int) -> bool:
        """Replays on the replica the logged steps it has not applied (interval > 1).

        Returns:
            Whether the replica is current up to the step in flight.
        """
        log, self._log[shard] = self._log[shard], []
        if self.interval == 1:
            return True
        host, key = self.hosts[shard], self.keys[shard]
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
            applied = ray_get(host.call.remote(key, "status")).last_step_id
            proxy_step = self._proxy._next_step_id - 1  # the step in flight
            replay = [r for r in log if applied < r.step_id < proxy_step]
            if replay and replay[0].step_id != applied + 1:
                return False  # a gap: the steps in between are in no log
            ray_get([host.call.remote(key, "step", r) for r in replay])
            self.replayed += len(replay)
            return True
        except Exception as err:
            logger.warning("the replica of shard %d could not catch up: %s", shard, err)
            return False

    def _from_checkpoint(self, shard: int, request: StepRequest) -> Any:
        """Rebuilds a shard whose primary and replica are both lost (see the module docstring)."""
        proxy = self._proxy
        (host,), (info,) = host_pool.acquire(1, proxy._actor_options)
        key = f"{host_pool.new_owner_key()}/{shard}"
        params = proxy._flat_params()
        tensors = [params[pid].detach().cpu() for pid in proxy._shard_params[shard]]
        layout = FlatLayout.for_tensors(tensors)
        groups = tuple(g for g, group in enumerate(proxy.param_groups) for _ in group["params"])
        block = ParamBlock(
            param_ids=tuple(proxy._shard_params[shard]),
            group_indices=tuple(groups[pid] for pid in proxy._shard_params[shard]),
            layout=layout,
            values=to_numpy(layout.pack(tensors)),
        )
        options = tuple(group_options(g) for g in proxy.param_groups)
        spec = ShardSpec(proxy.optimizer_class, proxy._shard_defaults, options, block)
        ray_get(host.create.remote(key, shard, spec, False, proxy._threads[shard]))
        lost_steps = request.step_id
        source = "no checkpoint was saved or loaded: all of its optimizer state is lost"
        if self.checkpoint is not None:
            commit, taken_before = self.checkpoint
            token = uuid.uuid4().hex
            error, _ = ray_get(
                host.call.remote(key, "prepare_load_from_checkpoint", token, options, commit)
            )
            if error is not None:
                raise error
            ray_get(host.call.remote(key, "commit_load", token))
            lost_steps = request.step_id - taken_before
            source = f"its optimizer state comes from checkpoint {commit.where!r}"
        message = (
            f"shard {shard} and its replica were both lost; its parameters were restored from "
            f"this process's copy (after the last completed step) and {source}: {lost_steps} "
            f"step(s) of optimizer state lost for parameters {proxy._shard_params[shard]}"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        logger.error(message)
        proxy._hosts[shard], proxy._keys[shard] = host, key
        proxy._host_nodes[shard] = info["node_id"]
        proxy._map_shared(shard, None)
        self.keys[shard] = f"{key}/replica"
        ref = host.call.remote(key, "step", request)
        self._pending[shard], self._building[shard] = [], None
        self._rebuild(shard)
        return ref
