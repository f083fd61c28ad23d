"""One shard of a shard group: many workers' gradients, one optimizer, versioned parameters.

A :class:`GroupShardHost` is the Ray actor (threaded, detached, named) that holds one
:class:`~shardopt.actor.shard.Shard` of a group created by the registry
(:mod:`shardopt.actor.shard_group_registry`). Workers push their gradients for the shard's
parameters, tagged with the version of the parameters they computed them on, and get back the
parameters after the push:

- ``sync``: the shard waits until every rank has pushed for the current version, averages the
  gradients in rank order (a parameter's gradient is the sum over the ranks that have one,
  divided by the world size, as DistributedDataParallel does), runs one optimizer step and
  moves to the next version; every rank gets the same new parameters. A rank that does not
  arrive within the group's timeout makes the others fail with :class:`GroupTimeoutError`
  naming it (their pushes are withdrawn: the shard is unchanged). A push marked ``resend`` (a
  restarted gateway repeating a step whose answer was lost) takes the place of the rank's push
  waiting in the round, or, for the round the shard applied last, is answered from it
  (:func:`~shardopt.actor.group_replica.repeat_answer`): never applied twice.
- ``sync`` with ``elastic=True``: the ranks a round waits for are the group's members, decided
  by its coordinator (:mod:`shardopt.actor.group_membership`) the same way for every shard;
  a member that dies is dropped and the round completes without it, and the gradient is the
  sum over the round's participants divided by their number.
- ``async``: each push is applied as it arrives (Downpour), one version per push. With
  ``max_staleness=s``, gradients computed on parameters more than ``s`` versions old are not
  applied: the worker gets the current parameters instead and computes again. A push that
  carries the id (``push_id``: a gateway session's step id) of the rank's last applied push is
  that push sent again after its answer was lost: it is answered, not applied again.

Every other call of a shard (state, loads, checkpoints: :class:`~shardopt.actor.host.ShardCalls`)
runs under the same lock, so a worker's proxy reaches a group's shards through the same typed
handles as its own.

Workers on the shard's node exchange gradients and parameters through shared memory (async:
copied under a read gate; :mod:`shardopt.actor.group_buffers`), those on other nodes over
network lanes (gradients in, parameters inline: :mod:`shardopt.actor.group_lanes`); a push
through Ray gets the parameters in the object store, put once per version. Elastic and
replicated groups' hosts make no shared-memory files and open no lanes (all through the store).

With ``replicate=k`` a primary sends every round to its ``k`` replicas before answering, and
a replica takes over when its primary is lost (:mod:`shardopt.actor.group_replica`).

Talks to: workers' backends (:mod:`shardopt.client.shard_group`) and the registry
(:mod:`shardopt.actor.shard_group_registry`); its replicas (other hosts of this class, through
:mod:`shardopt.actor.group_replica`); its shared buffers
(:mod:`shardopt.actor.group_buffers`); its push lanes (:mod:`shardopt.actor.group_lanes`);
Ray's metrics (:mod:`shardopt.actor.metrics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import ray
import torch

from shardopt.actor.group_buffers import RankSlots, RoundSum
from shardopt.actor.group_lanes import HostLanes
from shardopt.actor.group_membership import ElasticRounds, MembersView, RoundDecision
from shardopt.actor.group_replica import AppliedRound, ReplicaRole, repeat_answer
from shardopt.actor.host import ShardCalls, actor_device, observe_step
from shardopt.actor.metrics import observe
from shardopt.actor.shard import Shard
from shardopt.actor.threads import usable_cpus
from shardopt.core.errors import GroupTimeoutError
from shardopt.core.events import emit
from shardopt.core.lane import LaneAddress
from shardopt.core.net_lane import NetLaneAddress
from shardopt.core.records import (
    GroupConfig,
    ParamsAt,
    PushRequest,
    PushResult,
    RankBuffers,
    ShardExport,
    ShardSpec,
    StepRequest,
    StepResult,
)

logger = logging.getLogger(__name__)

OUTCOMES_KEPT = 8
"""Rounds whose outcome a slow waiter (a dropped member's push) can still read."""
COMMIT_WAIT_S = 5.0
"""How long one report to an elastic group's coordinator waits before it is made again."""


@dataclasses.dataclass(frozen=True)
class _AppliedPush:
    """(async) a rank's last applied push that carried an id, and its answer (kept without its
    parameters, which a repeat answers at the current version: no old object stays pinned)."""

    push_id: int
    result: PushResult


class GroupShardHost(ReplicaRole, ShardCalls):
    """The Ray actor holding one shard of a group. Made remote by the registry with
    ``max_concurrency`` above the world size, so that a sync round's pushes wait together."""

    def __init__(self, group: str, config: GroupConfig, members: Any = None) -> None:
        """Args: ``members``: an elastic group's coordinator
        (:class:`~shardopt.actor.group_membership.GroupMembers`)."""
        self.device = actor_device()
        self._cond = threading.Condition()
        self._active = 0  # pushes in progress (a host is recycled only without any)
        self._finalizers: list[weakref.finalize] = []
        self._lanes = HostLanes()  # rank -> its push lane (see open_lane, open_net_lane)
        self._start(group, config, members)

    def _start(self, group: str, config: GroupConfig, members: Any) -> None:
        """The state of a host that holds no shard yet, for group ``group``."""
        self.group = group
        self._members = members
        self._elastic: ElasticRounds | None = None
        self.config = config
        self._key: str | None = None
        self._shard: Shard | None = None
        self._version = 0
        self._round: dict[int, PushRequest] = {}
        self._round_seq = 0  # counts rounds applied or failed: a waiter waits for its own
        self._outcomes: dict[int, PushResult | BaseException] = {}  # the last rounds' by seq
        self._params: ParamsAt | None = None
        self._slots: RankSlots | None = None
        self._sum: RoundSum | None = None  # the sync round's gradients, summed as they arrive
        self._replicas = None  # replicate=k: ReplicaLinks, see group_replica
        self._last_round: AppliedRound | None = None
        self._last_async: dict[int, _AppliedPush] = {}  # rank -> its last applied push with an id

    def recycle(self) -> bool:
        """Drops this host's shard, files and lanes, so that the registry's pool
        (:mod:`shardopt.actor.group_host_pool`) can give it to another group. False (and
        nothing dropped) while a push is in progress: the registry kills it instead."""
        with self._cond:
            if self._active:
                return False
            self.close()
            self._start(self.group, self.config, None)
            return True

    def reuse(self, group: str, config: GroupConfig) -> None:
        """Serves group ``group`` now (a pooled host, recycled: it holds no shard)."""
        with self._cond:
            if self._shard is not None:
                raise RuntimeError(f"this host still holds shard {self._key!r}: recycle it first")
            self._start(group, config, None)

    def create(
        self, key: str, shard_index: int, spec: ShardSpec, num_threads: int | None
    ) -> tuple[int, ...]:
        """Creates the shard; returns the ids its optimizer's constructor gave state to.

        Its buffers are in shared memory (for the workers on its node) only in a group whose
        ranks and hosts are fixed: an elastic or replicated group's workers go through the
        object store (:meth:`attach_shared`), so its hosts make no files a kill would leave.
        """
        if num_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(num_threads)
        config = self.config
        shared = not (config.elastic or config.replicate)
        with self._cond:
            if self._shard is not None:  # (a replica made again from an export) its old files
                self._shard.close()
            self._shard = Shard(shard_index, spec, self.device, shared_memory=shared)
            self._slots = RankSlots(self._shard, config.mode, config.world_size, self._version)
            self._sum = RoundSum(self._slots, self._shard)
            if shared:  # its files go with the host (close() runs first when it is killed)
                self._finalizers += [
                    weakref.finalize(self, self._slots.close),
                    weakref.finalize(self, self._shard.close),
                ]
            self._key = key
            if self._members is not None:
                self._elastic = ElasticRounds(self._members, shard_index)
            return self._shard.initial_state_ids()

    def attach_shared(
        self, key: str, rank: int, node_id: str, own_copy: bool = False
    ) -> RankBuffers | None:
        """Shared buffers for ``rank``, a worker on node ``node_id`` (None: not here, or no shared
        memory: it goes through the object store; ``own_copy``: :meth:`RankSlots.attach`)."""
        with self._cond:
            self._checked(key)
            if node_id != ray.get_runtime_context().get_node_id() or self._slots is None:
                return None
            if self._elastic is not None or self.config.replicate:
                return None  # ranks come and go, hosts fail over: through the object store
            self._withdraw(rank)  # its push waiting in the round had its gradients in the old slot
            return self._slots.attach(rank, own_copy=own_copy, version=self._version)

    def open_lane(self, key: str, rank: int) -> LaneAddress | None:
        """Opens a push lane (:mod:`shardopt.core.lane`) for ``rank``, a worker on this node
        that reads its answers' parameters in shared memory (so no answer carries an object
        ref); None for any other: its pushes go through Ray. Not in elastic or replicated
        groups (they have no shared memory). A lane pushes for its own rank only."""
        with self._cond:
            self._checked(key)
            if self._slots is None or self._elastic is not None or self.config.replicate:
                return None
            if not self._slots.reads_shared_params(rank):
                return None
            name = f"shardopt-lane-{self.group}-{rank}"
            return self._lanes.open_unix(rank, lambda r: self.push(key, r), name)

    def open_net_lane(self, key: str, rank: int) -> NetLaneAddress | None:
        """Opens a network lane (:mod:`shardopt.actor.group_lanes`) for ``rank``, a worker on
        another node: its gradients come over TCP and its answers carry the parameters inline.
        None (its pushes go through Ray) in elastic or replicated groups, or for a GPU shard."""
        with self._cond:
            shard = self._checked(key)
            if self._slots is None or self._elastic is not None or self.config.replicate:
                return None
            if shard.param_buffer().device.type != "cpu":
                return None
            slots, name = self._slots, f"shardopt-net-lane-{self.group}-{rank}"
            slots.attach_remote(rank)
            return self._lanes.open_net(
                rank, ray.util.get_node_ip_address(), shard.layout.nbytes,
                lambda r: self.push(key, r), lambda: slots.inline_params(rank), name,
            )  # fmt: skip

    def close(self) -> None:
        """Removes this host's shared-memory files (run before the registry kills it)."""
        with self._cond:
            self._lanes.close_all()
            for finalizer in self._finalizers:  # lets go of the shard's memory, too
                finalizer()
            self._finalizers.clear()
            if self._slots is not None:
                self._slots.close()
            if self._shard is not None:
                self._shard.close()

    def create_from(
        self,
        key: str,
        shard_index: int,
        export: ShardExport,
        last_round: AppliedRound | None = None,
    ) -> None:
        """Creates the shard from an export of another (a new replica), at its version, with
        its record of the last round applied (to answer a push resent after a fail-over)."""
        with self._cond:  # (a reentrant lock) no call sees the shard half made
            self.create(key, shard_index, export.spec, None)
            assert self._shard is not None
            self._shard.restore(export)
            self._version = export.last_step_id + 1
            self._round, self._params, self._last_round = {}, None, last_round

    def _step_round(
        self, shard: Shard, step: StepRequest, participants: tuple[int, ...], skipped: bool
    ) -> None:
        """Steps the shard for a round; with replicas, they get the round first (all step in
        parallel) and have applied it before this returns (a lost one is dropped)."""
        links = self._replicas
        refs = links.send(step, shard.grad_buffer(), participants) if links else []
        self._step(shard, step)
        if links:
            links.wait(refs, step.step_id, self.config.timeout_s)
        self._last_round = AppliedRound(step.step_id, participants, skipped)

    def _checked(self, key: str) -> Shard:
        if self._shard is None or key != self._key:
            raise KeyError(f"group {self.group!r} holds no shard {key!r}")
        return self._shard

    @contextlib.contextmanager
    def _using(self, key: str) -> Iterator[Shard]:
        """The shard, between pushes (state, loads, checkpoints: under the lock, no one reading)."""
        with self._cond, self._writing():
            yield self._checked(key)

    def _writing(self) -> contextlib.AbstractContextManager[None]:
        """(Under the lock.) A block that may change the shard's parameters: the async workers
        copying them wait for it (:meth:`RankSlots.writing`)."""
        if self._slots is None:
            return contextlib.nullcontext()
        return self._slots.writing(self.group, self.config.timeout_s, lambda: self._version)

    def step(self, key: str, request: StepRequest) -> StepResult:
        raise TypeError("a shard group's shard steps on its workers' pushes (push), not step()")

    def pull(self, key: str, rank: int | None = None, at_least: int = 0) -> ParamsAt:
        """The shard's current parameters and their version, once it is ``at_least`` (a worker
        joining an elastic group adopts the version of the round it was admitted to); for
        ``rank``, None where it reads them in shared memory."""
        with self._cond:
            shard = self._checked(key)
            if not self._cond.wait_for(lambda: self._version >= at_least, self.config.timeout_s):
                raise GroupTimeoutError(
                    f"group {self.group!r}: shard {shard.shard_index} did not reach version "
                    f"{at_least} within {self.config.timeout_s:g} s (it is at {self._version})"
                )
            return self._current(shard, rank)

    def version(self) -> int:
        with self._cond:
            return self._version

    def push(self, key: str, request: PushRequest) -> PushResult:
        """Takes one worker's gradients (see the module docstring for the two modes).

        Raises:
            ValueError: a push for a version the shard is not at (sync), from a future
                version, or a second push of one rank for one version.
            GroupTimeoutError: (sync) not every rank pushed within the group's timeout.
        """
        start = time.perf_counter()
        mode = self.config.mode
        with self._cond:
            self._active += 1
        try:
            result = self._push(key, request)
        finally:
            with self._cond:
                self._active -= 1
            observe("round_wait", time.perf_counter() - start, mode=mode)
        if result.applied_version is not None:
            observe("staleness", result.applied_version - result.read_version, mode=mode)
        return result

    def _push(self, key: str, request: PushRequest) -> PushResult:
        """The mode's answer, with what the rank must learn of the shard's state (whoever
        changed it since the rank last heard)."""
        with self._cond:
            shard = self._checked(key)
            result = self._push_in_mode(shard, request)
            news = shard.state_ledger.news(request.state_seen)
            return dataclasses.replace(result, state_news=news)

    def _push_in_mode(self, shard: Shard, request: PushRequest) -> PushResult:
        """(Under the lock.)"""
        if request.read_version > self._version:
            raise ValueError(
                f"rank {request.rank} pushed gradients for version {request.read_version} "
                f"of shard {shard.shard_index}, which is only at version {self._version}"
            )
        if self.config.mode == "sync":
            last = self._last_round if self.config.replicate or request.resend else None
            if last is not None and request.read_version == last.version == self._version - 1:
                repeat = repeat_answer(  # (a lane's answer carries no object ref)
                    last, request.rank, self._elastic is not None,
                    self._current(shard, request.rank), shard.shard_index,
                )  # fmt: skip
                if repeat is not None:
                    return repeat  # a push resent after a fail-over: the round was applied
            return self._push_sync(shard, request)
        return self._push_async(shard, request)

    # ----- the two modes ----------------------------------------------------------------------

    def _push_async(self, shard: Shard, request: PushRequest) -> PushResult:
        if request.skip:
            raise ValueError("a vote to skip a round is for sync mode: an async rank skips alone")
        version = self._version
        limit = self.config.max_staleness
        if limit is not None and version - request.read_version > limit:
            return PushResult(
                shard.shard_index, request.rank, request.read_version, None,
                self._current(shard, request.rank),
            )  # fmt: skip
        last = self._last_async.get(request.rank)
        if request.push_id is not None and last is not None and last.push_id == request.push_id:
            current = self._current(shard, request.rank)  # sent again: applied once already
            return dataclasses.replace(last.result, current=current)
        assert self._slots is not None  # made with the shard
        in_place = self._slots.grad_tensors(request)  # the rank's slot, read where it is
        step = StepRequest(
            step_id=version,
            group_options=request.group_options,
            grads=request.grads,
            has_grad=request.has_grad,
            sparse_grads=request.sparse_grads,
        )
        with self._writing():
            self._step(shard, step, in_place)
            self._version = version + 1
        result = PushResult(
            shard.shard_index, request.rank, request.read_version, version,
            self._current(shard, request.rank),
        )  # fmt: skip
        if request.push_id is not None:
            kept = dataclasses.replace(result, current=ParamsAt(self._version, None))
            self._last_async[request.rank] = _AppliedPush(request.push_id, kept)
        return result

    def _push_sync(self, shard: Shard, request: PushRequest) -> PushResult:
        version = self._version
        if request.read_version != version:
            raise ValueError(
                f"rank {request.rank} pushed gradients computed on version "
                f"{request.read_version} of shard {shard.shard_index}, which is at version "
                f"{version}: in sync mode every rank steps on the current parameters "
                f"(pull_params() first)"
            )
        if request.resend:  # its first push may wait in the round: this one takes its place
            self._withdraw(request.rank)
        if request.rank in self._round:
            raise ValueError(f"rank {request.rank} pushed twice for version {version}")
        self._round[request.rank] = request
        my_round = self._round_seq
        if self._elastic is not None:
            self._drive(shard, version)
        else:
            self._sum.take(self._round, range(self.config.world_size))
        if self._elastic is None and len(self._round) == self.config.world_size:
            self._apply_round(shard, version)
        deadline = time.monotonic() + self.config.timeout_s
        while self._round_seq == my_round:
            left = deadline - time.monotonic()
            if left <= 0:
                self._timed_out(shard, version, request)
            self._cond.wait(left)
        outcome = self._outcomes[my_round]
        if isinstance(outcome, BaseException):
            raise outcome
        return PushResult(
            shard.shard_index, request.rank, version, version, self._current(shard, request.rank),
            participants=outcome.participants, skipped=outcome.skipped,
        )  # fmt: skip

    def _withdraw(self, rank: int) -> None:
        """(Sync, not elastic) takes ``rank``'s push out of the round waiting here (it is pushed
        again); the round's sum starts over. Its first push's call still waits, and is answered
        with the round's outcome (its caller is gone)."""
        if self._elastic is None and self._round.pop(rank, None) is not None:
            self._sum.reset()

    def _timed_out(self, shard: Shard, version: int, request: PushRequest) -> None:
        """Raises GroupTimeoutError for a push that waited too long for its round."""
        rank = request.rank
        observe("round_timeouts", 1, mode="sync")
        if self._elastic is not None:
            # the coordinator decides the round: the push stays in it (withdrawing it here
            # could leave it counted on other shards and not on this one)
            waiting = sorted(self._elastic.view.expected(version) - set(self._round))
            raise GroupTimeoutError(
                f"elastic group {self.group!r}: rank {rank} waited {self.config.timeout_s:g} s "
                f"at version {version} of shard {shard.shard_index} (waiting for rank(s) "
                f"{waiting}, alive by their heartbeats, or for the group's coordinator); "
                f"its push stays in the round"
            )
        if self._round.get(rank) is request:  # not taken over by a resent push
            self._round.pop(rank)
            self._sum.reset()
        missing = sorted(set(range(self.config.world_size)) - set(self._round) - {rank})
        emit(
            logger, "round_timeout", logging.WARNING, group=self.group,
            shard=shard.shard_index, version=version, rank=rank,
            missing=missing, timeout_s=self.config.timeout_s,
        )  # fmt: skip
        raise GroupTimeoutError(
            f"group {self.group!r}: rank {rank} waited "
            f"{self.config.timeout_s:g} s at version {version} of shard "
            f"{shard.shard_index} for rank(s) {missing} of world size "
            f"{self.config.world_size}; a worker died or is stuck. Its gradients "
            f"were withdrawn: the shard is unchanged"
        )

    # ----- elastic rounds (see shardopt.actor.group_membership) -------------------------------

    def members_changed(self, view: MembersView) -> None:
        """The coordinator's new view of the members: a round waiting for a dropped member
        may now be complete here."""
        with self._cond:
            if self._elastic is not None and self._shard is not None:
                if self._elastic.update(view) and self._round:
                    self._drive(self._shard, self._version)

    def _drive(self, shard: Shard, version: int) -> None:
        """(Under the lock) asks the coordinator for round ``version``'s decision while this
        shard holds the pushes of every member it knows of; applies the round once decided.
        The lock is released while asking, so that pushes go on arriving."""
        elastic = self._elastic
        assert elastic is not None
        while self._version == version:
            decided = elastic.decision
            if decided is not None and decided.version == version:
                if set(decided.participants) <= set(self._round):
                    self._apply_round(shard, version, decided.participants)
                return  # (a new primary) the decided participants' pushes are coming
            if not elastic.ready(version, self._round):
                return
            elastic.driving = True
            ref = elastic.commit(version, self._round, COMMIT_WAIT_S)
            self._cond.release()
            try:
                answer: RoundDecision | MembersView | BaseException = ray.get(ref)
            except Exception as exc:  # the coordinator is unreachable: waiters time out
                answer = exc
            finally:
                self._cond.acquire()
                elastic.driving = False
            if isinstance(answer, BaseException):
                logger.warning("group %r: round %d not decided: %s", self.group, version, answer)
                return
            if isinstance(answer, MembersView):
                elastic.update(answer)
            else:
                elastic.update(answer.view)
                elastic.decision = answer

    @staticmethod
    def _step(
        shard: Shard, step: StepRequest, grad_tensors: list[torch.Tensor] | None = None
    ) -> None:
        start = time.perf_counter()
        shard.step(step, grad_tensors)
        observe_step(shard, time.perf_counter() - start)

    def _apply_round(
        self, shard: Shard, version: int, participants: tuple[int, ...] | None = None
    ) -> None:
        """Averages the round's gradients into the shard's gradient buffer and steps once.

        Args:
            participants: (elastic) the ranks the coordinator decided the round averages over;
                the pushes of others (members dropped mid-round) are left out.
        """
        if participants is None:
            participants = tuple(sorted(self._round))
            divisor = self.config.world_size
        else:
            divisor = len(participants)
        round_, self._round = self._round, {}
        try:
            if not participants or not set(participants) <= set(round_):
                raise RuntimeError(
                    f"group {self.group!r}: round {version} of shard {shard.shard_index} was "
                    f"decided for ranks {list(participants)}, this shard holds the pushes of "
                    f"{sorted(round_)}"
                )
            requests = [round_[r] for r in participants]
            skipped = any(r.skip for r in requests)
            if skipped:  # a rank's GradScaler found an inf: a step without gradients changes
                self._sum.reset()  # nothing (the shard and its replicas still count it)
                has_grad, sparse = (False,) * len(shard.layout), {}
            else:
                has_grad, sparse = self._sum.finish(requests, divisor)
            step = StepRequest(
                step_id=version,
                group_options=requests[0].group_options,
                grads=None,
                has_grad=has_grad,
                sparse_grads=sparse,
            )
            self._step_round(shard, step, participants, skipped)
            self._version = version + 1
            outcome: PushResult | BaseException = PushResult(
                shard.shard_index,
                -1,
                version,
                version,
                ParamsAt(self._version, None),  # each rank's parameters are answered by _current
                participants=participants,
                skipped=skipped,
            )
        except Exception as exc:  # every rank of the round gets the shard's error
            outcome = exc
        self._outcomes[self._round_seq] = outcome
        self._outcomes.pop(self._round_seq - OUTCOMES_KEPT, None)
        self._round_seq += 1
        self._cond.notify_all()

    def _current(self, shard: Shard, rank: int | None = None) -> ParamsAt:
        """The parameters at the current version: for a rank that reads them in shared memory
        or is answered over its network lane, nothing; else put in the object store once per
        version, for every rank."""
        slots = self._slots
        if (
            rank is not None
            and slots is not None
            and (slots.reads_shared_params(rank) or self._lanes.answers_inline(rank))
        ):
            slots.publish(rank)
            return ParamsAt(self._version, None)
        if self._params is None or self._params.version != self._version:
            self._params = ParamsAt(self._version, ray.put(shard.param_values()))
        return self._params

    def info(self) -> dict[str, Any]:
        """The host's device, node, the GPUs Ray gave it, process id, the CPUs it can run on,
        and the shared-memory files its shard holds (its buffers, its read gate)."""
        return {
            "device": str(self.device),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "pid": os.getpid(),
            "cpus": usable_cpus(),
            "shards": [self._key] if self._key else [],
            "shm_files": list(self._slots.shared_paths()) if self._slots is not None else [],
        }
