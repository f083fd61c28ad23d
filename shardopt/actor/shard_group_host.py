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
  naming it (their pushes are withdrawn: the shard is unchanged).
- ``async``: each push is applied as it arrives (Downpour), one version per push. With
  ``max_staleness=s``, gradients computed on parameters more than ``s`` versions old are not
  applied: the worker gets the current parameters instead and computes again.

Every other call of a shard (state, loads, checkpoints: :class:`~shardopt.actor.host.ShardCalls`)
runs under the same lock, so a worker's proxy reaches a group's shards through the same typed
handles as its own.

Workers on the shard's node exchange gradients (and, in sync mode, parameters) through shared
memory (:mod:`shardopt.actor.group_buffers`); the others through Ray's object store, where the
parameters of a version are put once for all of them.

Talks to: workers' backends (:mod:`shardopt.client.shard_group`) and the registry
(:mod:`shardopt.actor.shard_group_registry`); its shared buffers
(:mod:`shardopt.actor.group_buffers`); Ray's metrics (:mod:`shardopt.actor.metrics`).
"""

from __future__ import annotations

import contextlib
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
from shardopt.actor.host import ShardCalls, actor_device, observe_step
from shardopt.actor.metrics import observe
from shardopt.actor.shard import Shard
from shardopt.core.errors import GroupTimeoutError
from shardopt.core.events import emit
from shardopt.core.records import (
    GroupConfig,
    ParamsAt,
    PushRequest,
    PushResult,
    RankBuffers,
    ShardSpec,
    StepRequest,
    StepResult,
)

logger = logging.getLogger(__name__)


class GroupShardHost(ShardCalls):
    """The Ray actor holding one shard of a group. Made remote by the registry with
    ``max_concurrency`` above the world size, so that a sync round's pushes wait together."""

    def __init__(self, group: str, config: GroupConfig) -> None:
        self.group = group
        self.config = config
        self.device = actor_device()
        self._cond = threading.Condition()
        self._key: str | None = None
        self._shard: Shard | None = None
        self._version = 0
        self._round: dict[int, PushRequest] = {}
        self._round_seq = 0  # counts rounds applied or failed: a waiter waits for its own
        self._outcome: tuple[int, PushResult | BaseException] | None = None
        self._params: ParamsAt | None = None
        self._slots: RankSlots | None = None
        self._sum: RoundSum | None = None  # the sync round's gradients, summed as they arrive

    def create(
        self, key: str, shard_index: int, spec: ShardSpec, num_threads: int | None
    ) -> tuple[int, ...]:
        """Creates the shard; returns the ids its optimizer's constructor gave state to."""
        if num_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(num_threads)
        with self._cond:
            self._shard = Shard(shard_index, spec, self.device, shared_memory=True)
            self._slots = RankSlots(self._shard, self.config.mode, self.config.world_size)
            self._sum = RoundSum(self._slots, self._shard)
            # its files go with the host (close() runs first when the registry kills it)
            weakref.finalize(self, self._slots.close)
            weakref.finalize(self, self._shard.close)
            self._key = key
            return self._shard.initial_state_ids()

    def attach_shared(self, key: str, rank: int, node_id: str) -> RankBuffers | None:
        """Shared buffers for ``rank``, a worker on node ``node_id`` (None: not this node, or
        no shared memory here: it pushes and pulls through the object store)."""
        with self._cond:
            self._checked(key)
            if node_id != ray.get_runtime_context().get_node_id() or self._slots is None:
                return None
            return self._slots.attach(rank)

    def close(self) -> None:
        """Removes this host's shared-memory files (run before the registry kills it)."""
        with self._cond:
            if self._slots is not None:
                self._slots.close()
            if self._shard is not None:
                self._shard.close()

    def _checked(self, key: str) -> Shard:
        if self._shard is None or key != self._key:
            raise KeyError(f"group {self.group!r} holds no shard {key!r}")
        return self._shard

    @contextlib.contextmanager
    def _using(self, key: str) -> Iterator[Shard]:
        """The shard, between pushes (state, loads, checkpoints run under the group's lock)."""
        with self._cond:
            yield self._checked(key)

    def step(self, key: str, request: StepRequest) -> StepResult:
        raise TypeError("a shard group's shard steps on its workers' pushes (push), not step()")

    def pull(self, key: str, rank: int | None = None) -> ParamsAt:
        """The shard's current parameters and their version (for ``rank``: None where it reads
        them in shared memory)."""
        with self._cond:
            return self._current(self._checked(key), rank)

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
        try:
            result = self._push(key, request)
        finally:
            observe("round_wait", time.perf_counter() - start, mode=mode)
        if result.applied_version is not None:
            observe("staleness", result.applied_version - result.read_version, mode=mode)
        return result

    def _push(self, key: str, request: PushRequest) -> PushResult:
        with self._cond:
            shard = self._checked(key)
            if request.read_version > self._version:
                raise ValueError(
                    f"rank {request.rank} pushed gradients for version {request.read_version} "
                    f"of shard {shard.shard_index}, which is only at version {self._version}"
                )
            if self.config.mode == "sync":
                return self._push_sync(shard, request)
            return self._push_async(shard, request)

    # ----- the two modes ----------------------------------------------------------------------

    def _push_async(self, shard: Shard, request: PushRequest) -> PushResult:
        version = self._version
        limit = self.config.max_staleness
        if limit is not None and version - request.read_version > limit:
            return PushResult(
                shard.shard_index, request.rank, request.read_version, None,
                self._current(shard), (),
            )  # fmt: skip
        grads = request.grads
        if grads is None:  # in the rank's slot: copied into the shard's gradient buffer
            grads = self._slots.grads(request).numpy()
        step = StepRequest(
            step_id=version,
            group_options=request.group_options,
            grads=grads,
            has_grad=request.has_grad,
            sparse_grads=request.sparse_grads,
        )
        new_state = self._step(shard, step)
        self._version = version + 1
        return PushResult(
            shard.shard_index, request.rank, request.read_version, version,
            self._current(shard), new_state,
        )  # fmt: skip

    def _push_sync(self, shard: Shard, request: PushRequest) -> PushResult:
        version = self._version
        if request.read_version != version:
            raise ValueError(
                f"rank {request.rank} pushed gradients computed on version "
                f"{request.read_version} of shard {shard.shard_index}, which is at version "
                f"{version}: in sync mode every rank steps on the current parameters "
                f"(pull_params() first)"
            )
        if request.rank in self._round:
            raise ValueError(f"rank {request.rank} pushed twice for version {version}")
        self._round[request.rank] = request
        my_round = self._round_seq
        self._sum.take(self._round, range(self.config.world_size))
        if len(self._round) == self.config.world_size:
            self._apply_round(shard, version)
        else:
            deadline = time.monotonic() + self.config.timeout_s
            while self._round_seq == my_round:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._round.pop(request.rank, None)
                    self._sum.reset()
                    missing = sorted(set(range(self.config.world_size)) - set(self._round))
                    missing.remove(request.rank)
                    observe("round_timeouts", 1, mode="sync")
                    emit(
                        logger, "round_timeout", logging.WARNING, group=self.group,
                        shard=shard.shard_index, version=version, rank=request.rank,
                        missing=missing, timeout_s=self.config.timeout_s,
                    )  # fmt: skip
                    raise GroupTimeoutError(
                        f"group {self.group!r}: rank {request.rank} waited "
                        f"{self.config.timeout_s:g} s at version {version} of shard "
                        f"{shard.shard_index} for rank(s) {missing} of world size "
                        f"{self.config.world_size}; a worker died or is stuck. Its gradients "
                        f"were withdrawn: the shard is unchanged"
                    )
                self._cond.wait(left)
        assert self._outcome is not None and self._outcome[0] == my_round
        outcome = self._outcome[1]
        if isinstance(outcome, BaseException):
            raise outcome
        return PushResult(
            shard.shard_index, request.rank, version, version,
            self._current(shard, request.rank), outcome.new_state_ids,
        )  # fmt: skip

    @staticmethod
    def _step(shard: Shard, step: StepRequest) -> tuple[int, ...]:
        start = time.perf_counter()
        new_state = shard.step(step).new_state_ids
        observe_step(shard, time.perf_counter() - start)
        return new_state

    def _apply_round(self, shard: Shard, version: int) -> None:
        """Averages the round's gradients into the shard's gradient buffer and steps once."""
        requests = [self._round[r] for r in sorted(self._round)]
        self._round = {}
        try:
            has_grad, sparse = self._sum.finish(requests, self.config.world_size)
            step = StepRequest(
                step_id=version,
                group_options=requests[0].group_options,
                grads=None,
                has_grad=has_grad,
                sparse_grads=sparse,
            )
            new_state = self._step(shard, step)
            self._version = version + 1
            outcome: PushResult | BaseException = PushResult(
                shard.shard_index, -1, version, version, ParamsAt(self._version, None), new_state
            )  # each rank's parameters are answered by _current
        except Exception as exc:  # every rank of the round gets the shard's error
            outcome = exc
        self._outcome = (self._round_seq, outcome)
        self._round_seq += 1
        self._cond.notify_all()

    def _current(self, shard: Shard, rank: int | None = None) -> ParamsAt:
        """The parameters at the current version: for a rank that reads them in shared memory,
        nothing; else put in the object store once per version, for every rank."""
        if rank is not None and self._slots is not None and self._slots.reads_shared_params(rank):
            return ParamsAt(self._version, None)
        if self._params is None or self._params.version != self._version:
            self._params = ParamsAt(self._version, ray.put(shard.param_values()))
        return self._params

    def info(self) -> dict[str, Any]:
        """The host's device, node, the GPUs Ray gave it, and process id."""
        return {
            "device": str(self.device),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "pid": os.getpid(),
            "shards": [self._key] if self._key else [],
        }
