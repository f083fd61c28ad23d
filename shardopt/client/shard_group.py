"""A worker's side of a shard group: attaching, pushing gradients, adopting parameters.

:class:`ShardGroupMember` is the backend of a
:class:`~shardopt.client.optimizer.ShardedOptimizer` created with ``group=...``: it presents the
worker's :class:`~shardopt.core.records.GroupSignature` to the cluster's registry
(:mod:`shardopt.actor.shard_group_registry`), then steps by pushing each shard's gradients
(tagged with the version of the parameters they were computed on) and copying the parameters
each shard answers with into the worker's tensors. With a shard on the worker's node both go
through shared memory (:mod:`shardopt.client.group_data_path`; not in elastic or replicated
groups, whose ranks and hosts change); with a (CPU) shard on another node they go over a
network lane (:mod:`shardopt.core.net_lane`: the gradient bytes in, the parameters inline in
the answer), and through Ray's object store where there is no lane or it broke. In an
elastic group the worker also sends heartbeats to the group's coordinator
(:mod:`shardopt.actor.group_membership`) from a background thread, off the step's path, and
shows the members and each round's participants
(:meth:`ShardGroupMember.members`, :attr:`ShardGroupMember.participants`). State, loads,
checkpoints and status reach the group's shard hosts through the same typed handles as a
worker's own shards (:class:`~shardopt.client.ray_shards.RayShards`). In a replicated group
(``replicate=k``) a push, pull, state read or status that finds a shard's primary lost asks the
registry to fail over and asks the new primary again (:mod:`shardopt.actor.group_replica`).
A member a gateway's session store holds (``holder``) outlives the gateway's process: a
restarted gateway attaches it again (``resume``) and, in sync mode, sends a step whose answer
was lost again as a resend (:meth:`ShardGroupMember.resend_at`).
Also the cluster-wide entry points :func:`list_groups` and :func:`close_group` (the options are
checked in :mod:`shardopt.client.group_config`).

Talks to: the group registry, the group's shard hosts (:mod:`shardopt.actor.shard_group_host`,
through :mod:`shardopt.client.group_handles`) and an elastic group's coordinator
(:mod:`shardopt.actor.group_membership`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import ray
import torch

from shardopt.actor import placement
from shardopt.actor.group_signature import comparable
from shardopt.actor.host import NAMESPACE
from shardopt.actor.shard_group_registry import REGISTRY_NAME, GroupRegistry
from shardopt.client.backend import ParamSource
from shardopt.client.group_config import (  # noqa: F401  (the group's options, re-exported)
    HEARTBEAT_TIMEOUT,
    MAX_GROUP_REPLICAS,
    MODES,
    make_config,
    timeout_seconds,
)
from shardopt.client.group_data_path import GroupDataPath
from shardopt.client.group_handles import GroupShardHandle, group_handles
from shardopt.client.group_heartbeats import LEAVE_WAIT_S, Heartbeats, leave_group
from shardopt.client.handles import ShardHandle
from shardopt.client.lanes import (
    LANE_TYPES,
    Lanes,
    answer_of,
    first_answer,
    land,
    net_lanes_enabled,
)
from shardopt.client.ray_shards import RayShards
from shardopt.client.runtime import ensure_ray, ray_get
from shardopt.client.shard_map import ShardMap
from shardopt.core.amp import AmpScaling
from shardopt.core.buffers import to_numpy
from shardopt.core.errors import ShardUnavailableError
from shardopt.core.lane import LaneBroken
from shardopt.core.metrics import GROUP_PUSH_SECONDS, GROUP_STALE_PUSHES, GROUP_STALENESS
from shardopt.core.net_lane import NetLaneClient
from shardopt.core.records import (
    GroupConfig,
    GroupMembership,
    GroupSignature,
    ParamsAt,
    PushRequest,
    PushResult,
    ShardSpec,
    ShardStatus,
)

logger = logging.getLogger(__name__)

MAX_STALE_RETRIES = 1000
"""How often ``step(closure)`` recomputes gradients rejected as too stale before giving up."""


def registry() -> Any:
    """The cluster's group registry actor (created by the first process that asks)."""
    ensure_ray()
    return (
        ray.remote(GroupRegistry)
        .options(
            name=REGISTRY_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
        )
        .remote()
    )


def close_group(name: str) -> bool:
    """Tears down shard group ``name`` (its shards and their state are gone).

    Returns:
        Whether the group existed.
    """
    return ray.get(registry().close_group.remote(name))


def list_groups() -> dict[str, dict[str, Any]]:
    """The cluster's live shard groups, by name."""
    return ray.get(registry().groups.remote())


class ShardGroupMember(RayShards):
    """One worker's membership of a shard group and its push/pull data path.

    Args:
        params: the worker's parameters.
        name: the group's name.
        rank: this worker's rank (None in an elastic group: the registry assigns one).
        config: the group's options (checked by :func:`make_config`).
        shared_memory: exchange gradients (and in sync mode parameters) with the group's shards
            on this node through shared memory, and with those on other nodes over network
            lanes; by default wherever possible. ``False`` forces the object store.
        share_params: (sync mode) re-point this worker's CPU parameters into the shared
            parameter buffers of the shards on its node: a round copies no parameters back.
            Every worker there then holds the very same memory, so a parameter written in
            place on one worker is written for all of them.
        holder: what holds this member beyond this process's Ray job (a gateway's session
            store, ``gateway-sessions/NAME``; see the registry's lifetime rules), or None.
        resume: attach again to rank ``rank`` of an existing group under ``holder`` (a
            restarted gateway resuming a session): never creates the group.
    """

    kind = "group"

    def __init__(
        self,
        params: ParamSource,
        name: str,
        rank: int | None,
        config: GroupConfig,
        shared_memory: bool | None = None,
        share_params: bool = False,
        holder: str | None = None,
        resume: bool = False,
    ) -> None:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"Invalid group name: {name!r} (a non-empty string without '/')")
        self._params = params
        self.name = name
        self.rank = rank
        self.config = config
        self._shared_memory = shared_memory is not False
        self.membership: GroupMembership | None = None
        self.versions: list[int] = [0] * config.num_shards
        self.last_push: list[PushResult] = []
        self.holder = holder
        self._resend = False  # the next push repeats one whose answer was lost (resend_at)
        self._push_id: int | None = None  # (async) the next push's id (push_as)
        self.first_version = 0  # the version this member adopted when it attached
        self._heartbeats: Heartbeats | None = None
        self.shard_map = ShardMap(config.num_shards)
        self.data_path = GroupDataPath(self.shard_map, share_params=share_params)
        self.lanes = Lanes()  # to shards on this node answering in shared memory, and on others
        blocks = self.shard_map.place(params.flat(), params.group_indices(), params.splittable())
        options = params.options()
        self._join([params.spec(blocks[s], options) for s in range(config.num_shards)], resume)

    def signature(self) -> GroupSignature:
        params = []
        for g in self._params.groups:
            names = g.get("param_names") or [None] * len(g["params"])
            for p, n in zip(g["params"], names):
                label = n if n is not None else f"params[{len(params)}]"
                params.append((label, tuple(p.shape), str(p.dtype).removeprefix("torch.")))
        cls = self._params.optimizer_class
        return GroupSignature(
            optimizer_class=f"{cls.__module__}.{cls.__qualname__}",
            defaults=comparable(self._params.full_defaults),
            group_options=tuple(comparable(o) for o in self._params.options()),
            group_sizes=tuple(len(g["params"]) for g in self._params.groups),
            params=tuple(params),
            config=self.config,
            group_splits=tuple(
                g < len(self._params.group_splits) and self._params.group_splits[g]
                for g in range(len(self._params.groups))
            ),
            default_dtype=str(self._params.default_dtype).removeprefix("torch."),
        )

    def _join(self, specs: list[ShardSpec], resume: bool = False) -> GroupMembership:
        """Attaches to (or creates, unless ``resume``) the group and adopts its current
        parameters."""
        reg = registry()
        context = ray.get_runtime_context()
        job_id, actor_id = context.get_job_id(), context.get_actor_id()
        signature = self.signature()

        nodes = placement.worker_nodes()  # where a group it creates puts its shards

        def join(spec_refs: list[Any]) -> GroupMembership:
            args = (self.name, signature, self.rank, job_id, spec_refs, actor_id, self.holder)
            return ray_get(reg.join.remote(*args, nodes=nodes))

        # Only a worker that may create the group ships its initial parameters.
        creates = not resume and not ray.get(reg.exists.remote(self.name))
        try:
            membership = join([ray.put(s) for s in specs] if creates else [])
        except LookupError:  # the group ended between the two calls: create it after all
            if resume:
                raise
            membership = join([ray.put(s) for s in specs])
        self.membership = membership
        self.rank = membership.rank
        if membership.coordinator is not None:
            self._heartbeats = Heartbeats(
                membership.coordinator, self.rank, self.config.heartbeat_timeout_s
            )
        self.handles: list[GroupShardHandle] = group_handles(membership, reg)
        self._finalizer = weakref.finalize(
            self, leave_group, reg, self.name, self.rank, self._heartbeats
        )
        if not membership.created:
            logger.info("rank %d attached to existing group %r", self.rank, self.name)
        try:
            self._map_shared()
            self.pull_params(at_least=membership.first_round)
            # which parameters have state (the others' steps', or a constructor's): a push's
            # answer then tells what changed since
            news = ray_get([h.state_news() for h in self.handles])
            self.shard_map.learn_state(dict(enumerate(news)))
        except BaseException:
            self._finalizer()
            raise
        self.first_version = min(self.versions, default=0)
        return membership

    def _map_shared(self) -> None:
        """Maps this rank's shared buffers on the group's shards on this node and opens its
        lanes: a Unix lane to each of those, a network lane to each shard on another node."""
        if not self._shared_memory:
            return
        here = ray.get_runtime_context().get_node_id()
        local = [s for s, node in enumerate(self.membership.node_ids) if node == here]
        own_copy = self.data_path.shares_params  # async: its parameters must not change under it
        answers = ray_get([self.handles[s].attach_shared(self.rank, here, own_copy) for s in local])
        params = self._params.flat()
        for s, buffers in zip(local, answers):
            self.data_path.map_rank(s, buffers, params)
        laned = [s for s in local if self.data_path.group_params(s) is not None]
        calls = [self.handles[s].open_push_lane(self.rank) for s in laned]
        if net_lanes_enabled():  # gradients and parameters over TCP to the shards elsewhere
            remote = [s for s, node in enumerate(self.membership.node_ids) if node != here]
            laned += remote
            calls += [self.handles[s].open_net_lane(self.rank) for s in remote]
        for s, address in zip(laned, ray_get(calls)):
            self.lanes.open(s, self.handles[s], address)

    @property
    def uses_shared_memory(self) -> list[bool]:
        """Per shard: whether this worker's gradients reach it through shared memory."""
        return [self.data_path.in_slot(s) for s in range(self.num_shards)]

    def shard_nodes(self) -> list[str | None]:
        return list(self.membership.node_ids) if self.membership else super().shard_nodes()

    # ----- parameters -------------------------------------------------------------------------

    @torch.no_grad()
    def pull_params(self, at_least: int = 0) -> None:
        """Copies the shards' parameters into the worker's tensors (once at ``at_least``)."""
        shards = self.shard_map.live_shards()
        refs = [self.handles[s].pull(self.rank, at_least) for s in shards]
        params = self._params.flat()
        for s, ref in zip(shards, refs):
            current = self._failing_over(s, ref, lambda h: h.pull(self.rank, at_least))
            self._adopt(s, current, params)

    @property
    def replicated(self) -> bool:
        """Whether the group's shards have replicas (a lost primary fails over)."""
        return bool(self.membership and self.membership.replicas)

    def _failing_over(self, shard: int, ref: Any, again: Callable[[ShardHandle], Any]) -> Any:
        """The answer of ``ref`` (a read of ``shard``); when the shard's primary was lost (in a
        replicated group), the answer of ``again`` asked of the replica that took over."""
        try:
            return ray_get(ref)
        except ShardUnavailableError:
            if not self.replicated:
                raise
        self._fail_over(shard)
        return ray_get(again(self.handles[shard]))

    def _receive_state(
        self, shard: int, request: Any, param_ids: tuple[int, ...] | None
    ) -> dict[int, Any]:
        try:
            return self.data_path.receive_state(request)
        except ShardUnavailableError:
            if not self.replicated:
                raise
        self._fail_over(shard)
        return self.data_path.receive_state(
            self.data_path.request_state(self.handles[shard], param_ids)
        )

    def status(self) -> list[ShardStatus]:
        refs = [h.status() for h in self.handles]
        return [self._failing_over(s, r, lambda h: h.status()) for s, r in enumerate(refs)]

    def _adopt(
        self, shard: int, current: ParamsAt, params: list[torch.Tensor], inline: Any = None
    ) -> None:
        """Copies a shard's answered parameters into the worker's tensors: ``inline`` (received
        over a network lane), else from the object store or the shard's shared buffer (async:
        under its read gate, at the version the gate says, which may be newer than the
        answer's)."""
        values, views, gate = current.params, None, None
        if inline is not None:
            values = inline
        elif values is None:
            values = self.data_path.group_params(shard)
            views = self.data_path.views(shard, values)  # the same buffer every step
            gate = self.data_path.read_gate(shard)
        else:
            values = ray_get(values)
        with gate.reading() if gate else contextlib.nullcontext(current.version) as version:
            self.shard_map.copy_back(shard, values, params, views=views)
        self.versions[shard] = version

    def push_params(self) -> None:
        params = self._params.flat()
        self.shard_map.forget_versions()
        updates = {s: self.data_path.changed_params(s, params) for s in range(self.num_shards)}
        ray_get([self.handles[s].set_params(u) for s, u in updates.items() if u is not None])

    def add_param_group(self, group_index: int) -> None:
        raise ValueError(
            f"the param groups of shard group {self.name!r} were fixed when it was "
            "created; create the optimizer with all of them"
        )

    # ----- stepping ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None, scaling: AmpScaling | None) -> Any:
        """Pushes this worker's gradients to every shard and adopts what they answer.

        In async mode with ``max_staleness``, a shard that rejects gradients as too stale
        answers with its current parameters; with a closure the gradients are computed again
        on them and pushed again to the shards that rejected, without one the step ends (see
        ``last_push``: ``applied_version`` None). The scale of a GradScaler is applied here,
        as GradScaler applies it to an optimizer that does not take it.
        """
        try:
            return self._step(closure, scaling)
        finally:
            self._push_id = None  # an id names one step's pushes (push_as)

    def _step(self, closure: Callable[[], Any] | None, scaling: AmpScaling | None) -> Any:
        loss = None
        shards = self.shard_map.live_shards()
        results: dict[int, PushResult] = {}
        for _ in range(MAX_STALE_RETRIES):
            loss = self._params.evaluate(closure)
            if scaling is not None:
                if not self._params.unscale_here(scaling):  # an inf: scaler.step skips
                    if self.config.mode != "sync":
                        return loss
                    self._push(shards, results, skip=True)  # the round waits for this vote
                    break
                self.data_path.forget_shipped()
            rejected = self._push(shards, results)
            if not rejected or closure is None:
                break
            shards = rejected
        else:
            raise RuntimeError(
                f"group {self.name!r}: gradients were rejected as too stale "
                f"{MAX_STALE_RETRIES} times in a row; raise max_staleness"
            )
        self.last_push = [results[s] for s in sorted(results)]
        self.shard_map.learn_state({r.shard_index: r.state_news for r in self.last_push})
        if self._heartbeats is not None and self.rank not in self.participants:
            self._readmit()
        return loss

    # ----- elastic groups ---------------------------------------------------------------------

    @property
    def participants(self) -> tuple[int, ...]:
        """The ranks whose gradients this worker's last sync step averaged (every shard of a
        round averages over the same ranks)."""
        return self.last_push[0].participants if self.last_push else ()

    def members(self) -> dict[str, Any]:
        """An elastic group's membership, from its coordinator: ``members`` (rank -> the round
        it joined at), ``round`` (the next round to decide), ``participants`` (round -> ranks,
        for the last rounds), ``dropped`` (rank -> why).

        Raises:
            ValueError: the group is not elastic.
        """
        if self.membership is None or self.membership.coordinator is None:
            raise ValueError(f"group {self.name!r} is not elastic: its members are its ranks")
        return ray_get(self.membership.coordinator.view.remote())

    def _readmit(self) -> None:
        """This worker was dropped (its heartbeats were late) though it is alive: its last
        gradients were left out. It is admitted again under a new rank, at a round boundary."""
        assert self._heartbeats is not None and self.membership is not None
        old = self.rank
        context = ray.get_runtime_context()
        admission = ray_get(
            self.membership.coordinator.admit.remote(
                None, context.get_actor_id(), context.get_job_id()
            )
        )
        self.rank = self._heartbeats.rank = admission.rank
        message = (
            f"group {self.name!r}: rank {old} was dropped from the group (no heartbeat within "
            f"{self.config.heartbeat_timeout_s:g} s), so its last gradients were not applied; "
            f"it rejoined as rank {self.rank} at round {admission.first_round}"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        self.pull_params(at_least=admission.first_round)

    def _push(
        self, shards: list[int], results: dict[int, PushResult], skip: bool = False
    ) -> list[int]:
        """One push to ``shards``; returns the shards that rejected it as too stale.

        Each push goes out as soon as its shard's gradients are packed (the shard's work then
        overlaps the packing of the next), through the shard's lane where it has one. ``skip``:
        votes through Ray.
        """
        params = self._params.flat()
        options = self._params.options()
        pending: dict[Any, int] = {}
        requests: dict[int, PushRequest] = {}
        rejected = []
        try:
            for s in shards:
                if skip:
                    none = (False,) * len(self.shard_map.slots(s))
                    requests[s] = PushRequest(
                        self.rank, self.versions[s], options, None, none, {}, self._resend, None,
                        True, self.shard_map.state_seen(s),
                    )  # fmt: skip
                    pending[self.handles[s].push(requests[s])] = s
                    continue
                flat, has_grad, sparse, touched = self.data_path.pack_grads(s, params)
                if not touched and self.config.mode == "async":
                    continue  # nothing to apply; sync still pushes: the round needs every rank
                in_slot = self.data_path.in_slot(s)
                grads = None if in_slot else to_numpy(flat)
                requests[s] = PushRequest(
                    self.rank, self.versions[s], options, grads, has_grad, sparse, self._resend,
                    self._push_id, state_seen=self.shard_map.state_seen(s),
                )  # fmt: skip
                if in_slot:
                    lane = self.lanes.send(s, self.handles[s], requests[s])
                elif self.lanes.is_net(s) and flat.device.type == "cpu":  # the gradients go inline
                    request = dataclasses.replace(requests[s], grads=None)
                    lane = self.lanes.send(s, self.handles[s], request, flat)
                else:
                    lane = None
                pending[lane if lane is not None else self.handles[s].push(requests[s])] = s
            self.data_path.forget_shipped()
            self._resend = False
            sent_at, mode = time.perf_counter(), self.config.mode
            while pending:  # adopt each shard's parameters as soon as it answers
                answer, s = first_answer(pending)
                try:
                    result: PushResult = answer_of(answer)
                except LaneBroken as err:  # through Ray: it knows whether the shard is gone
                    logger.debug("shard %d: %s; the push goes through Ray", s, err)
                    self.lanes.close(s)
                    pending[self.handles[s].push(requests[s])] = s
                    continue
                except ShardUnavailableError:
                    if not self.replicated:
                        raise
                    self._fail_over(s)  # the replica takes over; the push goes to it again
                    pending[self.handles[s].push(requests[s])] = s
                    continue
                GROUP_PUSH_SECONDS.labels(mode).observe(time.perf_counter() - sent_at)
                if result.staleness is not None:
                    GROUP_STALENESS.labels(mode).observe(result.staleness)
                else:
                    GROUP_STALE_PUSHES.inc()
                inline = answer.params if isinstance(answer, NetLaneClient) else None
                self._adopt(s, result.current, params, inline)
                results[s] = result
                if result.applied_version is None:
                    rejected.append(s)
        except BaseException:  # (Ctrl-C) an async push sent is applied all the same
            if self.config.mode == "async":  # (a sync one waits for its round: see below)
                self._let_land(pending, params)
            raise
        finally:  # a lane whose answer was not read would hand it to the next push
            for answer, s in pending.items():
                if isinstance(answer, LANE_TYPES):
                    self.lanes.close(s)
            if pending and self.config.mode == "sync":  # unanswered: their rounds may be done
                self._resend = True  # so the next push repeats this version (see resend_at)
        return sorted(rejected)

    def _let_land(self, pending: dict[Any, int], params: list[torch.Tensor]) -> None:
        """(async) A push stopped part-way: waits at most ``LAND_S`` for the shards it reached,
        which apply it all the same, and adopts their parameters. Else a late request would
        meet the next push: the lane opened again for it drops what it finds unread, or the
        shard reads this push's gradients from the rank's slot after the next one wrote its own.
        A shard that does not answer in time keeps its lane closed (``_push``'s finally)."""

        def adopt(answer: Any, s: int) -> None:
            result: PushResult = answer_of(answer)
            inline = answer.params if isinstance(answer, NetLaneClient) else None
            self._adopt(s, result.current, params, inline)

        land(pending, adopt, "a push")

    def _fail_over(self, shard: int) -> None:
        """Replaces a lost primary by a replica (the registry does it once for the group)."""
        assert self.membership is not None
        lost = self.handles[shard].host
        host, replicas = ray_get(registry().fail_over.remote(self.name, shard, lost))
        hosts, all_replicas = list(self.membership.hosts), list(self.membership.replicas)
        hosts[shard], all_replicas[shard] = host, tuple(replicas)
        self.membership = dataclasses.replace(
            self.membership, hosts=tuple(hosts), replicas=tuple(all_replicas)
        )
        self.handles = group_handles(self.membership, registry())
        logger.warning("group %r: shard %d failed over to a replica", self.name, shard)

    def resend_at(self, version: int) -> None:
        """(Sync) makes the next push one for ``version`` that may repeat a push whose answer
        was lost (a gateway restarted mid-step): a shard that counted it, or applied its round,
        answers it once (``PushRequest.resend``). The shards are at ``version`` or one past it.

        Raises:
            ValueError: async mode, or a shard at another version (nothing is changed).
        """
        if self.config.mode != "sync" or not set(self.versions) <= {version, version + 1}:
            raise ValueError(
                f"group {self.name!r}: a push for version {version} cannot be sent again (the "
                f"shards are at versions {self.versions}, {self.config.mode} mode)"
            )
        self.versions = [version] * self.num_shards
        self._resend = True

    def push_as(self, push_id: int) -> None:
        """(Async) gives the next step's pushes an id (a gateway session's step id): a shard
        that applied this rank's push with that id answers it again without applying it (its
        answer was lost and the step is sent again, ``PushRequest.push_id``). Sync rounds are
        made idempotent by version instead (:meth:`resend_at`)."""
        if self.config.mode != "async":
            raise ValueError(f"group {self.name!r}: push ids are for async mode")
        self._push_id = push_id

    def detach(self) -> None:
        """Lets go of the group without leaving it: a held member (``holder``) stays attached
        for a restarted gateway to resume."""
        self.lanes.close_all()
        self._finalizer.detach()
        self.data_path.close()

    def close(self) -> None:
        self.lanes.close_all()
        leaving = self._finalizer.detach()  # close() waits for the registry; collecting does not
        if leaving is not None:
            _, leave, args, _ = leaving
            leave(*args, wait_s=LEAVE_WAIT_S)
        self.data_path.close()
