"""Replicas of a shard group's shards (``replicate=True`` on a sync group).

Each shard host of a replicated group has a replica: a second
:class:`~shardopt.actor.shard_group_host.GroupShardHost` holding the same shard (started by the
registry, on another node where Ray finds one). The primary sends every round it applies to its
replica (:class:`ReplicaLink`): the round's averaged gradients, as one step request with the
round's version as its step id, sent before the primary steps (the two step in parallel) and
waited for before any worker gets the round's answer. So whatever a worker has seen, the replica
holds; torch's per-tensor kernels are deterministic, so the replica stays bit-identical.

When a primary dies, the first worker whose push finds it lost asks the registry to fail over
(:meth:`~shardopt.actor.shard_group_registry.GroupRegistry.fail_over`): the replica becomes the
primary and builds its own new replica from an export of itself, under its lock (no round
between the export and the link), on a spare host the registry started beforehand (so that the
fail-over waits for no new process; a new spare is started after it). Every worker resends
its push of the round in flight to the new primary, which applies the round once: if the old
primary had already sent it the round, the new one answers each participant's repeated push
from its record of that round (:func:`repeat_answer`), otherwise the round is applied there
from the resent pushes. The
calls of a worker that change a shard (parameter writes, loads) reach the replica through
:class:`~shardopt.client.replication.MirroredHandle`, as for a worker's own shards.

Talks to: the replica's shard host (a Ray actor); the shard host
(:mod:`shardopt.actor.shard_group_host`) and the registry
(:mod:`shardopt.actor.shard_group_registry`) call in.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Any

import ray

from shardopt.actor.host import NAMESPACE
from shardopt.core.buffers import to_numpy
from shardopt.core.records import ParamsAt, PushResult, StepRequest

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AppliedRound:
    """The last round a shard applied: its version, participants and new state ids."""

    version: int
    participants: tuple[int, ...]
    new_state_ids: tuple[int, ...]


class ReplicaLink:
    """A primary's link to its replica: sends each round, waits for it.

    Args:
        replica: the replica's shard host (an actor handle).
        key: the shard's key.
    """

    def __init__(self, replica: Any, key: str) -> None:
        self.replica = replica
        self.key = key

    def send(self, step: StepRequest, gradient: Any, participants: tuple[int, ...]) -> Any:
        """Sends a round (``gradient``: the averaged gradient buffer, when the step's own
        grads are None) to the replica; returns the ref to wait for."""
        if step.grads is None:
            step = dataclasses.replace(step, grads=to_numpy(gradient))
        return self.replica.follow_round.remote(self.key, step, participants)

    @staticmethod
    def wait(ref: Any) -> bool:
        """Waits for the replica to apply a round. Returns False when it was lost (the shard
        goes on without a replica; the registry's fail-over cannot use it then)."""
        try:
            ray.get(ref)
            return True
        except Exception as err:
            logger.warning("a group shard's replica was lost: %s", err)
            return False


def repeat_answer(
    last: AppliedRound, rank: int, elastic: bool, current: ParamsAt, index: int
) -> PushResult | None:
    """The answer to a push for the round a shard last applied (a worker resending its push
    after a fail-over), or None when ``rank`` took no part in it."""
    if elastic and rank not in last.participants:
        return None
    v = last.version
    return PushResult(index, rank, v, v, current, last.new_state_ids, last.participants)


def start_replica(
    remote_host: Any, name: str, shard: int, config: Any, options: dict[str, Any]
) -> Any:
    """A replica host for shard ``shard`` of group ``name`` (-1: a spare), detached and named,
    spread away from the group's other actors where Ray can."""
    options = {k: v for k, v in options.items() if k not in ("scheduling_strategy", "name")}
    return remote_host.options(
        name=f"group/{name}/shard/{shard}/replica/{uuid.uuid4().hex[:8]}",
        namespace=NAMESPACE,
        lifetime="detached",
        max_concurrency=(config.world_size or 64) + 8,
        scheduling_strategy="SPREAD",
        **options,
    ).remote(name, config)
