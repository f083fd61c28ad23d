"""Who is in each round of an elastic shard group, and when a round may be applied.

An elastic sync group (``ShardedOptimizer(..., group=name, elastic=True)``) has one
:class:`GroupMembers` actor (detached, named ``group/<name>/members``, started by the registry
with the group's shard hosts). It owns the group's membership and decides every round:

- **Members.** A worker is admitted (:meth:`GroupMembers.admit`) into the first round not yet
  decided, and adopts the parameters of that version. It stays a member until it leaves
  (``close()``), or is dropped: its Ray actor died, its job ended (the registry's watchdog), or
  no heartbeat came for ``heartbeat_timeout`` (a background thread of the worker's backend sends
  them, off the step's path). Ranks are never reused.
- **Rounds.** A shard that holds pushes for round ``v`` from every member of ``v`` it knows of
  asks :meth:`GroupMembers.commit` (one call per shard and round). Round ``v`` is decided once
  every shard of the group has reported the pushes of every member of ``v`` still alive: its
  participants are those members, and every shard averages exactly their gradients, dividing
  by their number. A member dropped mid-round therefore counts on no shard, even where its
  gradients already arrived; a decision is kept, so a shard asking again (a replica that took
  over) gets the same answer.
- **Changes** (admissions, drops) reach the shard hosts at once (:meth:`ElasticRounds.update`,
  pushed by this actor), so that a shard waiting for a dead member's push goes on.

:class:`ElasticRounds` is the shard host's side: the members it knows of (with the round each
joined at), the ranks a round waits for, and the call to the coordinator.

Talks to: the group's shard hosts (:mod:`shardopt.actor.shard_group_host`, both ways); Ray's
actor and job tables; workers' backends (:mod:`shardopt.client.shard_group`) and the registry
(:mod:`shardopt.actor.shard_group_registry`) call in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ray

from shardopt.core.events import emit

logger = logging.getLogger(__name__)

DECISIONS_KEPT = 64
"""How many past rounds' participants the coordinator remembers (for shards asking again)."""


@dataclass(frozen=True)
class MembersView:
    """The members of an elastic group: rank -> the round it joined at; ``epoch`` counts
    changes, so that a shard keeps the newest view it was told of."""

    epoch: int
    joined: tuple[tuple[int, int], ...]

    def expected(self, version: int) -> frozenset[int]:
        """The ranks round ``version`` waits for."""
        return frozenset(r for r, first in self.joined if first <= version)


@dataclass(frozen=True)
class RoundDecision:
    """Round ``version``'s participants (sorted ranks) and the members after it."""

    version: int
    participants: tuple[int, ...]
    view: MembersView


@dataclass(frozen=True)
class Admission:
    """A worker's rank and the first round it pushes for (the version it adopts)."""

    rank: int
    first_round: int


@dataclass
class _Member:
    first_round: int
    last_beat: float
    actor_id: str | None
    job_id: str | None


@dataclass
class _Round:
    version: int
    reports: dict[int, frozenset[int]] = field(default_factory=dict)  # shard -> ranks present


class GroupMembers:
    """An elastic group's membership and its rounds' decisions (a plain class, made a Ray
    actor by the registry).

    Args:
        group: the group's name.
        num_shards: how many shards report each round.
        heartbeat_timeout_s: a member with no heartbeat for this long is dropped.
        max_workers: how many members at once (None: no bound).
    """

    def __init__(
        self,
        group: str,
        num_shards: int,
        heartbeat_timeout_s: float,
        max_workers: int | None = None,
    ) -> None:
        self.group = group
        self.num_shards = num_shards
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_workers = max_workers
        self._cond = threading.Condition()
        self._members: dict[int, _Member] = {}
        self._next_rank = 0
        self._epoch = 0
        self._round = _Round(0)
        self._decided: dict[int, tuple[int, ...]] = {}
        self._hosts: list[Any] = []
        self._dropped: dict[int, str] = {}  # rank -> why (for the view)
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, daemon=True)
        self._watchdog.start()

    def set_hosts(self, hosts: list[Any]) -> None:
        """The shard hosts to tell of membership changes."""
        with self._cond:
            self._hosts = list(hosts)

    # ----- membership -------------------------------------------------------------------------

    def admit(self, rank: int | None, actor_id: str | None, job_id: str | None) -> Admission:
        """Admits a worker into the first round not yet decided.

        Args:
            rank: the rank the worker asks for, or None for the next unused one.

        Raises:
            ValueError: the rank is taken or was used before, or the group is full.
        """
        with self._cond:
            if rank is None:
                rank = self._next_rank
            elif rank in self._members or rank in self._dropped:
                raise ValueError(
                    f"rank {rank} is already taken in elastic group {self.group!r} (members: "
                    f"{sorted(self._members)}); ranks are not reused: pass rank=None"
                )
            if self.max_workers is not None and len(self._members) >= self.max_workers:
                raise ValueError(
                    f"elastic group {self.group!r} already has {len(self._members)} members "
                    f"(world_size {self.max_workers})"
                )
            self._next_rank = max(self._next_rank, rank + 1)
            first = self._round.version
            self._members[rank] = _Member(first, time.monotonic(), actor_id, job_id)
            self._changed("worker_admitted", rank=rank, round=first)
            return Admission(rank, first)

    def heartbeat(self, rank: int) -> bool:
        """A member is alive. Returns whether ``rank`` is (still) a member."""
        with self._cond:
            member = self._members.get(rank)
            if member is not None:
                member.last_beat = time.monotonic()
            return member is not None

    def leave(self, rank: int) -> None:
        """A member leaves (its optimizer closed): rounds no longer wait for it."""
        self.drop(rank, "left")

    def drop(self, rank: int, reason: str) -> bool:
        """Drops a member; the round in flight completes without it. Returns whether it was one."""
        with self._cond:
            if self._members.pop(rank, None) is None:
                return False
            self._dropped[rank] = reason
            level = logging.INFO if reason == "left" else logging.WARNING
            self._changed("member_dropped", level, rank=rank, reason=reason)
            return True

    def _view(self) -> MembersView:
        joined = tuple(sorted((r, m.first_round) for r, m in self._members.items()))
        return MembersView(self._epoch, joined)

    def _changed(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        """(Under the lock) a new view: wakes waiting commits and tells every shard host."""
        self._epoch += 1
        view = self._view()
        emit(logger, event, level, group=self.group, epoch=self._epoch, **fields)
        for host in self._hosts:
            host.members_changed.remote(view)  # not waited for: the host may be busy
        self._cond.notify_all()

    def view(self) -> dict[str, Any]:
        """The members (rank -> first round), the next round, the last rounds' participants,
        and the ranks dropped (rank -> why)."""
        with self._cond:
            return {
                "members": {r: m.first_round for r, m in sorted(self._members.items())},
                "round": self._round.version,
                "participants": dict(self._decided),
                "dropped": dict(self._dropped),
                "epoch": self._epoch,
            }

    # ----- rounds -----------------------------------------------------------------------------

    def commit(
        self, version: int, shard: int, present: Iterable[int], wait_s: float
    ) -> RoundDecision | MembersView:
        """Reports that ``shard`` holds round ``version``'s pushes of ``present``; waits (up to
        ``wait_s``) for the round's decision.

        Returns:
            The decision; or the current view when it names a member whose push ``shard`` has
            not got (a new member, or ``wait_s`` passed): the shard waits for more pushes and
            reports again.
        """
        present = frozenset(present)
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                decided = self._decided.get(version)
                if decided is not None:
                    return RoundDecision(version, decided, self._view())
                if version != self._round.version:
                    raise ValueError(
                        f"elastic group {self.group!r}: shard {shard} reports round {version}, "
                        f"but round {self._round.version} is the one being decided"
                    )
                expected = self._expected(version)
                if not expected <= present:
                    self._round.reports.pop(shard, None)
                    return self._view()
                self._round.reports[shard] = present
                if expected and self._complete(expected):  # (no members: nothing to decide)
                    return self._decide(expected)
                left = deadline - time.monotonic()
                if left <= 0:
                    return self._view()
                self._cond.wait(left)

    def _expected(self, version: int) -> frozenset[int]:
        return frozenset(r for r, m in self._members.items() if m.first_round <= version)

    def _complete(self, expected: frozenset[int]) -> bool:
        reports = self._round.reports
        return len(reports) == self.num_shards and all(expected <= q for q in reports.values())

    def _decide(self, expected: frozenset[int]) -> RoundDecision:
        version = self._round.version
        participants = tuple(sorted(expected))
        self._decided[version] = participants
        self._decided.pop(version - DECISIONS_KEPT, None)
        self._round = _Round(version + 1)
        self._cond.notify_all()
        return RoundDecision(version, participants, self._view())

    # ----- liveness ---------------------------------------------------------------------------

    def _watch(self) -> None:
        """Drops members whose actor died or whose heartbeats stopped."""
        interval = min(1.0, self.heartbeat_timeout_s / 4)
        while not self._stop.wait(interval):
            with self._cond:
                members = dict(self._members)
            now = time.monotonic()
            for rank, m in members.items():
                if now - m.last_beat > self.heartbeat_timeout_s:
                    self.drop(rank, f"no heartbeat for {self.heartbeat_timeout_s:g} s")
                elif m.actor_id is not None and not _actor_alive(m.actor_id):
                    self.drop(rank, "its actor died")

    def shutdown(self) -> None:
        self._stop.set()


def _actor_alive(actor_id: str) -> bool:
    """Whether Ray's actor table says the actor is not dead (alive when unknown)."""
    try:
        info = ray._private.state.actors(actor_id=actor_id)
    except Exception as err:  # GCS briefly unreachable: the heartbeat decides
        logger.debug("actor table unavailable: %s", err)
        return True
    return not info or info.get("State") != "DEAD"


class ElasticRounds:
    """A shard host's side of an elastic group: the members it knows of and its reports.

    Args:
        coordinator: the group's :class:`GroupMembers` actor.
        shard_index: the shard's index.
    """

    def __init__(self, coordinator: Any, shard_index: int) -> None:
        self.coordinator = coordinator
        self.shard_index = shard_index
        self.view = MembersView(-1, ())
        self.driving = False  # a thread of the host is asking the coordinator
        self.decision: RoundDecision | None = None  # the last decision received

    def update(self, view: MembersView) -> bool:
        """Keeps ``view`` if it is newer than the one held; returns whether it was."""
        if view.epoch <= self.view.epoch:
            return False
        self.view = view
        return True

    def ready(self, version: int, present: Iterable[int]) -> bool:
        """Whether the host holds the pushes of every member of round ``version`` it knows of
        (and no thread is asking already)."""
        return not self.driving and bool(present) and self.view.expected(version) <= set(present)

    def commit(self, version: int, present: Iterable[int], wait_s: float) -> Any:
        """One report to the coordinator (a ref to its answer: see :meth:`GroupMembers.commit`)."""
        return self.coordinator.commit.remote(
            version, self.shard_index, tuple(sorted(present)), wait_s
        )
