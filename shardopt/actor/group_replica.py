"""Replicas of a shard group's shards (``replicate=k`` on a sync group; ``True`` is 1).

Each shard host of a replicated group has ``k`` replicas: other
:class:`~shardopt.actor.shard_group_host.GroupShardHost` actors holding the same shard (started by
the registry, spread over other nodes where Ray finds them). The primary sends every round it
applies to all of them (:class:`ReplicaLinks`): the round's averaged gradients, put in the
object store once, as one step request with the round's version as its step id, sent before the
primary steps (they all step in parallel) and waited for before any worker gets the round's
answer. So whatever a worker has seen, every live replica holds; torch's per-tensor kernels are
deterministic, so the replicas stay bit-identical.

A replica that fails a round (its host died) or does not answer within the group's ``timeout``
(hung) is dropped from the primary's links at once (the round completes without it;
``event=replica_lost``; the registry kills it), and the primary tells the registry, which
builds a new one on its spare host from an export of the primary, taken under the primary's lock
(no round between the export and the link): :meth:`~shardopt.actor.shard_group_registry.
GroupRegistry.replica_lost`. The group is back at ``k`` replicas once that is done.

When a primary dies, the first worker whose push (or pull, or state call) finds it lost asks the
registry to fail over (:meth:`~shardopt.actor.shard_group_registry.GroupRegistry.fail_over`): of
the shard's replicas still alive, the one at the highest version becomes the primary
(:meth:`~shardopt.actor.shard_group_host.GroupShardHost.take_over`); the others stay linked to it
as they are when they hold the same version (no export; one that missed the round the old
primary was sending when it died gets an export), and a new replica is built from an export on
the spare host the registry started beforehand (so that the fail-over waits for no new
process; a new spare is started after it). Losing the primary and up to ``k - 1`` replicas at
once loses nothing. Every worker resends its push of the round in flight to the new primary,
which applies the round once: if the old primary had already sent it the round, the new one
answers each participant's repeated push from its record of that round (:func:`repeat_answer`),
otherwise the round is applied there from the resent pushes. The calls of a worker that change
a shard (parameter writes, loads) reach the replicas through
:class:`~shardopt.client.replication.MirroredHandle`, as for a worker's own shards.
:class:`ReplicaRole` holds a group shard host's calls for all of this (mixed into the host).
The same record of a shard's last round answers a push that a restarted gateway resends for a
round already applied (``PushRequest.resend``), in any sync group.

Talks to: the replicas' shard hosts and the registry (Ray actors); the shard host
(:mod:`shardopt.actor.shard_group_host`) and the registry
(:mod:`shardopt.actor.shard_group_registry`) call in.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from typing import Any

import ray

from shardopt.actor.group_membership import ElasticRounds
from shardopt.actor.host import NAMESPACE
from shardopt.core.buffers import to_numpy
from shardopt.core.events import emit
from shardopt.core.records import ParamsAt, PushResult, StepRequest

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AppliedRound:
    """The last round a shard applied: its version and participants, and whether a rank's
    vote skipped it."""

    version: int
    participants: tuple[int, ...]
    skipped: bool = False


class ReplicaLinks:
    """A primary's links to its replicas: sends each round to all of them, waits for them,
    drops (and reports) the ones that were lost.

    Args:
        group: the group's name.
        key: the shard's key.
        shard: the shard's index.
        replicas: the replicas' shard hosts (actor handles), each holding the shard as the
            primary holds it now.
        registry: the group registry (told of a lost replica), or None.
    """

    def __init__(
        self, group: str, key: str, shard: int, replicas: list[Any], registry: Any = None
    ) -> None:
        self.group = group
        self.key = key
        self.shard = shard
        self.replicas = list(replicas)
        self.registry = registry

    def __len__(self) -> int:
        return len(self.replicas)

    def add(self, replica: Any) -> None:
        self.replicas.append(replica)

    def send(self, step: StepRequest, gradient: Any, participants: tuple[int, ...]) -> list[Any]:
        """Sends a round (``gradient``: the averaged gradient buffer, when the step's own grads
        are None) to every replica; returns the refs to wait for (:meth:`wait`)."""
        if not self.replicas:
            return []
        if step.grads is None:
            step = dataclasses.replace(step, grads=to_numpy(gradient))
        shared = ray.put(step)  # once, for every replica
        return [r.follow_round.remote(self.key, shared, participants) for r in self.replicas]

    def wait(self, refs: list[Any], version: int, timeout_s: float) -> None:
        """Waits for every replica to apply round ``version``; drops the ones that failed it
        (their hosts died) or did not answer within ``timeout_s`` (hung), and reports them to
        the registry, which replaces them."""
        lost = []
        deadline = time.monotonic() + timeout_s
        for replica, ref in zip(list(self.replicas), refs):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except Exception as err:
                lost.append(replica)
                emit(
                    logger, "replica_lost", logging.WARNING, group=self.group, shard=self.shard,
                    version=version, left=len(self.replicas) - len(lost), error=type(err).__name__,
                )  # fmt: skip
        for replica in lost:
            self.replicas.remove(replica)
            if self.registry is not None:
                try:
                    self.registry.replica_lost.remote(self.group, self.shard, replica)
                except Exception as err:  # the cluster is going away
                    logger.debug("registry not told of a lost replica: %s", err)


def repeat_answer(
    last: AppliedRound, rank: int, elastic: bool, current: ParamsAt, index: int
) -> PushResult | None:
    """The answer to a push for the round a shard last applied (a worker resending its push
    after a fail-over), or None when ``rank`` took no part in it."""
    if elastic and rank not in last.participants:
        return None
    v = last.version
    return PushResult(
        index, rank, v, v, current, participants=last.participants, skipped=last.skipped
    )


def relink(
    group: str,
    key: str,
    shard: Any,
    version: int,
    last_round: AppliedRound | None,
    others: list[Any],
    new: Any,
) -> list[Any]:
    """(A replica taking over, under its lock) the replicas it links: ``others`` (the shard's
    other live replicas) as they are where they hold ``version``, from an export of ``shard``
    where they do not, and ``new`` (a started host, or None) built from an export."""
    linked, export = [], None
    versions = [r.version.remote() for r in others]
    for replica, ref in zip(others, versions):
        try:
            same = ray.get(ref, timeout=30) == version
        except Exception as err:  # lost too: the registry finds it again
            logger.warning("group %r: a replica was lost: %s", group, err)
            continue
        if not same:
            export = export or shard.export()
            ray.get(replica.create_from.remote(key, shard.shard_index, export, last_round))
        linked.append(replica)
    if new is not None:
        export = export or shard.export()
        ray.get(new.create_from.remote(key, shard.shard_index, export, last_round))
        linked.append(new)
    return linked


class ReplicaRole:
    """The calls of a group shard host (:class:`~shardopt.actor.shard_group_host.GroupShardHost`,
    which mixes this in) that link a primary to its replicas, make a replica follow its rounds,
    build a new one and promote one: each runs under the host's lock, on its shard."""

    _replicas: ReplicaLinks | None
    _last_round: AppliedRound | None

    def set_replicas(self, key: str, replicas: list[Any], registry: Any = None) -> None:
        """Links this primary to its replicas (which hold the shard as it is now); the
        ``registry`` is told of a replica that is lost."""
        with self._cond:
            shard = self._checked(key)
            self._replicas = ReplicaLinks(self.group, key, shard.shard_index, replicas, registry)

    def replica_count(self) -> int:
        """How many replicas this primary sends its rounds to now."""
        with self._cond:
            return len(self._replicas) if self._replicas is not None else 0

    def follow_round(self, key: str, step: StepRequest, participants: tuple[int, ...]) -> None:
        """(A replica) applies a round its primary applied, once (by version)."""
        with self._cond:
            shard = self._checked(key)
            if step.step_id < self._version:
                return
            if step.step_id != self._version:
                raise ValueError(
                    f"replica of shard {shard.shard_index} of group {self.group!r} is at version "
                    f"{self._version}, its primary sent round {step.step_id}"
                )
            self._step(shard, step)
            self._version += 1
            skipped = not any(step.has_grad) and not step.sparse_grads  # (as its primary's)
            self._last_round = AppliedRound(step.step_id, participants, skipped)

    def add_replica(self, key: str, replica: Any) -> None:
        """Builds a new replica on ``replica`` (a started host) from an export of this primary
        and links it, under the lock: no round falls between the export and the link."""
        with self._cond:
            shard = self._checked(key)
            if self._replicas is None:
                raise RuntimeError(f"shard {shard.shard_index} of {self.group!r} is not a primary")
            ray.get(
                replica.create_from.remote(key, shard.shard_index, shard.export(), self._last_round)
            )
            self._replicas.add(replica)

    def take_over(
        self, key: str, others: list[Any], new: Any, members: Any, registry: Any = None
    ) -> int:
        """(A replica) becomes its shard's primary, under the lock (no round falls in between):
        links the shard's other live replicas ``others`` as they are where they hold its
        version (an export to those that do not), and builds ``new`` (a started host, or None)
        from an export. Returns how many replicas it links."""
        with self._cond:
            shard = self._checked(key)
            if members is not None and self._elastic is None:
                self._members = members
                self._elastic = ElasticRounds(members, shard.shard_index)
            linked = relink(self.group, key, shard, self._version, self._last_round, others, new)
            self._replicas = ReplicaLinks(self.group, key, shard.shard_index, linked, registry)
            return len(linked)


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
