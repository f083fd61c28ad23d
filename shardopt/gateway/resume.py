"""A restarted gateway's sessions: recorded in the cluster as they open, resumed at start.

:class:`StoreLink` is the gateway's side of its :class:`~shardopt.gateway.session_store.
SessionStore`: it starts the gateway's shard hosts as detached actors the store knows, records
each resumable session (:func:`record_of`), beats with the sessions' last use, and at start
resumes every recorded session (:meth:`StoreLink.resume`) as a :class:`ResumedOptimizer`: a
:class:`~shardopt.client.optimizer.ShardedOptimizer` whose backend (:class:`ResumedShards`)
attaches to the shards that are there instead of creating new ones. The parameters are read
back from the shards; the shards' optimizer state never left them.

Resumable: sessions of a per-tensor optimizer or of LBFGS, with every param group they added
(the record says how each placement placed them, and a resume places them the same way, checked
against the recorded pieces). An LBFGS session's state between steps (its numbers, and its
vectors by name: their values stay on the shards) is recorded after each step; a step under way
is marked in the record first, so a session whose gateway died mid-step is resumed with its
steps refused (its shards may hold part of that step; it is never applied twice, nor continued
from a mix).

Shard group members (sessions that name a group) too: their member is held by the store
(:class:`HeldGroupOptimizer`, ``holder``: the store's name and the session id), so the registry
keeps its rank attached, and the group alive, when the gateway's Ray job ends
(:mod:`shardopt.actor.shard_group_registry`). A restarted gateway attaches it again to the same
group and rank (never creating the group: one that ended is not resumed) and adopts the group's
current parameters and versions. In sync mode a client's step ``i`` is the push for version
``first_version + i``: the first step after a resume, or a step whose id the shards are past, is
pushed again marked as a resend (:meth:`~shardopt.client.shard_group.ShardGroupMember.
resend_at`), so a shard that counted it or applied its round answers it once. In async mode
each step's pushes carry its id (:meth:`~shardopt.client.shard_group.ShardGroupMember.push_as`):
a shard that applied the rank's push with that id answers it again instead of applying it.

Talks to: the store actor and shard hosts (Ray); the servicer's session table and ledger.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import ray
import torch

from shardopt.actor.host import NAMESPACE, ShardHost
from shardopt.client.group_config import make_config
from shardopt.client.handles import ShardHandle
from shardopt.client.lbfgs import LBFGSShards
from shardopt.client.local import LocalShards
from shardopt.client.optimizer import ShardedOptimizer
from shardopt.client.runtime import host_pool, ray_get
from shardopt.client.shard_group import ShardGroupMember
from shardopt.core.events import emit
from shardopt.core.param_groups import group_options
from shardopt.core.plan import Piece
from shardopt.core.records import ShardSpec
from shardopt.gateway.admission import OPTIMIZERS
from shardopt.gateway.session_store import (
    BEAT_S,
    SessionRecord,
    SessionStore,
    leave_group,
    store_name,
)
from shardopt.gateway.sessions import Session

logger = logging.getLogger(__name__)


class Attachment:
    """Where a resumed session's shards are: their hosts and keys, how its param groups were
    placed (group counts, in order; empty: all at once) and the pieces that gave (empty: not
    checked)."""

    def __init__(
        self,
        hosts: list[Any],
        keys: tuple[str, ...],
        placed: tuple[int, ...] = (),
        pieces: tuple[tuple[tuple[int, int, int], ...], ...] = (),
    ) -> None:
        self.hosts = hosts
        self.keys = keys
        self.placed = placed
        self.pieces = pieces


def pieces_of(shard_map: Any) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """Each parameter's pieces in a shard map's plan, as (shard, first row, row after)."""
    return tuple(tuple((p.shard, p.start, p.stop) for p in ps) for ps in shard_map.plan.pieces)


class ResumedShards(LocalShards):
    """:class:`~shardopt.client.local.LocalShards` over shards that exist already (a resumed
    session's): each moves its buffers into shared memory with this process where it can, the
    parameters are read back, and the next step id follows the last one any shard applied."""

    def __init__(self, params: Any, num_shards: int, attachment: Attachment, **kwargs: Any) -> None:
        self._attachment = attachment
        self._last_steps: list[int] = []
        self._replayed = False  # the first placement replays the recorded ones
        super().__init__(params, num_shards, **kwargs)
        self._next_step_id = max(self._last_steps) + 1
        self.pull_params()

    def _place(
        self, new_params: list[torch.Tensor], groups: list[int], splittable: list[bool]
    ) -> list[Any]:
        """Places every parameter as the session's placements did: its first groups at once,
        then each added group on its own, each parameter in the pieces the record names (what
        the shards hold, whichever version's plan placed them); a record without pieces is
        placed again (the plan extends deterministically).

        Raises:
            ValueError: placements that do not cover the groups, recorded pieces that do not
                lay out the parameters, or a layout other than the recorded one.
        """
        if self._replayed:  # a group added since the resume
            return super()._place(new_params, groups, splittable)
        self._replayed = True
        placed = self._attachment.placed or (max(groups, default=-1) + 1,)
        if sum(placed) != max(groups, default=-1) + 1:
            raise ValueError(f"placements of {sum(placed)} param groups for {max(groups) + 1}")
        recorded = self._attachment.pieces
        if recorded and len(recorded) != len(new_params):
            raise ValueError(f"pieces of {len(recorded)} parameters for {len(new_params)}")
        blocks: list[Any] = []
        first_group = start = 0
        for count in placed:
            stop = start
            while stop < len(groups) and groups[stop] < first_group + count:
                stop += 1
            chosen = slice(start, stop)
            pieces = None
            if recorded:
                pieces = tuple(tuple(Piece(*p) for p in ps) for ps in recorded[chosen])
            blocks = super()._place(new_params[chosen], groups[chosen], splittable[chosen], pieces)
            first_group, start = first_group + count, stop
        if recorded and pieces_of(self.shard_map) != recorded:
            raise ValueError("the parameters' layout is not the one recorded")
        return blocks  # unused: the shards exist (see _open_shards)

    def _open_shards(
        self, specs: list[ShardSpec], actor_options: dict[str, Any], shared_memory: bool | None
    ) -> list[tuple[tuple[int, ...], Any]]:
        hosts, keys = self._attachment.hosts, self._attachment.keys
        self.handles = [ShardHandle(h, k, s) for s, (h, k) in enumerate(zip(hosts, keys))]
        self._drop_at_close(self.handles)
        infos = ray_get([h.info.remote() for h in hosts])
        here = ray.get_runtime_context().get_node_id()
        shared = [
            shared_memory is not False and i["node_id"] == here and i["device"] == "cpu"
            for i in infos
        ]
        self.host_nodes = [i["node_id"] for i in infos]
        self.threads = [None] * len(hosts)
        answers = ray_get(
            [h.host.reattach.remote(h.key, shared[s]) for s, h in enumerate(self.handles)]
        )
        self._last_steps = [last for _, _, last in answers]
        return [(ids, buffers) for ids, buffers, _ in answers]


class ResumedLBFGSShards(ResumedShards, LBFGSShards):
    """:class:`~shardopt.client.lbfgs.LBFGSShards` over a resumed LBFGS session's shards (its
    state between steps is adopted after: :meth:`~LBFGSShards.adopt_portable_state`)."""


class ResumedOptimizer(ShardedOptimizer):
    """A :class:`~shardopt.client.optimizer.ShardedOptimizer` over a resumed session's shards
    (``shardopt.LBFGS``'s backend for ``torch.optim.LBFGS``)."""

    def __init__(
        self, groups: list[dict], optimizer_class: type, attachment: Attachment, **kwargs: Any
    ) -> None:
        self._attachment = attachment
        if optimizer_class is torch.optim.LBFGS:
            self._local_backend = LBFGSShards  # as shardopt.LBFGS
        super().__init__(groups, optimizer_class, **kwargs)

    def _make_backend(self, source: Any, **options: Any) -> Any:
        lbfgs = self._local_backend is LBFGSShards
        return (ResumedLBFGSShards if lbfgs else ResumedShards)(
            source, options["num_shards"], self._attachment,
            actor_options=options["actor_options"], shared_memory=options["shared_memory"],
            overlap=False, share_params=False, replicate=0,
        )  # fmt: skip


_GROUP_SETTINGS = (
    "world_size", "mode", "max_staleness", "timeout", "placement", "elastic",
    "heartbeat_timeout", "shard_resources",
)  # fmt: skip


class HeldGroupOptimizer(ShardedOptimizer):
    """A gateway session's :class:`~shardopt.client.optimizer.ShardedOptimizer` in a shard
    group, its member held by the session store ``holder`` (it outlives the gateway's job);
    ``resume``: attached again to its rank of the existing group (see the module docstring)."""

    def __init__(
        self, groups: list[dict], optimizer_class: type, holder: str, resume: bool, **kwargs: Any
    ) -> None:
        self._holder, self._resume = holder, resume
        super().__init__(groups, optimizer_class, **kwargs)

    def _make_backend(self, source: Any, **options: Any) -> Any:
        config = make_config(
            num_shards=options["num_shards"], rank=options["rank"],
            actor_options=options["actor_options"], replicate=options["replicate"],
            **{k: options[k] for k in _GROUP_SETTINGS},
        )  # fmt: skip
        return ShardGroupMember(
            source, options["group"], options["rank"], config, options["shared_memory"],
            options["share_params"], holder=self._holder, resume=self._resume,
        )  # fmt: skip


def resumable(optimizer: ShardedOptimizer) -> bool:
    """Whether a session's optimizer can be resumed by a restarted gateway."""
    backend = optimizer.backend
    if isinstance(backend, ShardGroupMember):
        return backend.holder is not None
    return type(backend) in (LocalShards, ResumedShards, LBFGSShards, ResumedLBFGSShards)


def is_lbfgs(session: Session) -> bool:
    """Whether a session runs LBFGS on its shards (its record carries LBFGS's state)."""
    return isinstance(session.optimizer.backend, LBFGSShards)


def lbfgs_state(session: Session) -> dict[str, Any] | None:
    """An LBFGS session's state between steps as plain values (None: not LBFGS)."""
    backend = session.optimizer.backend
    return backend.portable_state() if isinstance(backend, LBFGSShards) else None


def repeat_from(session: Session, step_id: int) -> None:
    """Gives the session's next step the client's id: a repeat of the last one (its answer was
    lost, or the gateway restarted) is applied by no shard that applied it already.

    Raises:
        ValueError: an id before the last step (nothing is changed).
    """
    backend = session.optimizer.backend
    if isinstance(backend, ShardGroupMember):
        if backend.config.mode == "sync":  # step i pushes for version first_version + i
            version = backend.first_version + step_id
            if session.resend_next or backend.versions != [version] * backend.num_shards:
                backend.resend_at(version)
            session.resend_next = False
        else:  # an async push with the id of one the shard applied is answered, not applied
            backend.push_as(step_id)
        return
    if not isinstance(backend, LocalShards) or not backend.per_tensor:  # LBFGS
        return
    if step_id < session.steps - 1:
        raise ValueError(
            f"step {step_id} is older than this session's last step {session.steps - 1}"
        )
    backend.repeat_from(step_id)
    session.steps = step_id


def record_of(session: Session, kwargs: dict[str, Any], host_names: list[str]) -> SessionRecord:
    """A session's record (``kwargs``: what admission gave its optimizer)."""
    optimizer = session.optimizer
    index = {id(p): i for i, p in enumerate(session.params)}
    groups = tuple(
        (tuple(index[id(p)] for p in g["params"]), group_options(g)) for g in optimizer.param_groups
    )
    placed = tuple(session.placements) or (len(groups),)
    if sum(placed) != len(groups):
        raise ValueError(f"placements of {sum(placed)} param groups for {len(groups)}")
    member, group = optimizer.group, None
    if member is not None:
        group = {
            "name": member.name, "rank": member.rank, "world_size": member.config.world_size,
            "mode": member.config.mode, "first_version": member.first_version,
        }  # fmt: skip
    return SessionRecord(
        session_id=session.session_id,
        principal=session.principal,
        optimizer=optimizer.optimizer_class.__name__,
        kwargs=dict(kwargs),
        groups=groups,
        names=tuple(session.names),
        specs=tuple((str(p.dtype), tuple(p.shape)) for p in session.params),
        nbytes=session.nbytes,
        hosts=tuple(host_names),
        keys=() if member is not None else tuple(h.key for h in optimizer.backend.handles),
        placed=placed,
        pieces=pieces_of(optimizer.backend.shard_map),
        steps=session.steps,
        lbfgs=lbfgs_state(session),
        group=group,
    )


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"a session record names no dtype: {name!r}")
    return dtype


class StoreLink:
    """The gateway's side of its session store (``shardopt serve --session-store NAME``).

    Args:
        name: the store's name (``--session-store``).
        idle_timeout_s: the gateway's session idle timeout (the store applies it once no
            gateway beats).
    """

    def __init__(self, name: str, idle_timeout_s: float | None) -> None:
        self.gateway_id = uuid.uuid4().hex
        self._name = name
        self._holder = store_name(name)
        self._idle_timeout_s = idle_timeout_s
        self.store = self._store()
        self._names: dict[int, str] = {}  # id(host handle) -> its actor name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    def _store(self) -> Any:
        return (
            ray.remote(SessionStore)
            .options(
                name=store_name(self._name), namespace=NAMESPACE, lifetime="detached",
                get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=-1,
            )
            .remote(NAMESPACE, self._idle_timeout_s, store_name(self._name))
        )  # fmt: skip

    def _claim(self) -> float:
        """The store's :meth:`~SessionStore.claim`; a store that ended itself just now (empty,
        unattended) is started again."""
        try:
            return ray.get(self.store.claim.remote(self.gateway_id, self._idle_timeout_s))
        except ray.exceptions.RayActorError:
            time.sleep(BEAT_S)  # its name is free once it is gone
            self.store = self._store()
            return ray.get(self.store.claim.remote(self.gateway_id, self._idle_timeout_s))

    def holder_of(self, session_id: str) -> str:
        """What holds session ``session_id``'s shard group member (its rank in the registry):
        this store and that session, so no other session takes its rank over."""
        return f"{self._holder}/{session_id}"

    # ----- hosts ------------------------------------------------------------------------------

    def start_host(self, name: str, actor_options: dict[str, Any]) -> Any:
        """A detached shard host the store knows (the host pool's starter)."""
        host = (
            ray.remote(ShardHost)
            .options(namespace=NAMESPACE, name=name, lifetime="detached", **actor_options)
            .remote()
        )
        ray.get(self.store.add_host.remote(name))
        with self._lock:
            self._names[id(host)] = name
        return host

    def host_names(self, optimizer: ShardedOptimizer) -> list[str] | None:
        """The names of a session's hosts (None: one is not the store's)."""
        with self._lock:
            names = [self._names.get(id(h.host)) for h in optimizer.backend.handles]
        return None if None in names else names

    # ----- records ----------------------------------------------------------------------------

    def put(self, session: Session, kwargs: dict[str, Any] | None = None) -> None:
        """Records a session (if it can be resumed) before its client hears of it, or records
        it again as it is now (its param groups grew; ``kwargs``: those it was recorded with)."""
        kwargs = session.record_kwargs if kwargs is None else kwargs
        in_group = session.optimizer.group is not None  # its hosts are the registry's
        names = [] if in_group else self.host_names(session.optimizer)
        if names is None or kwargs is None or not resumable(session.optimizer):
            return
        session.placements = session.placements or [len(session.optimizer.param_groups)]
        ray.get(self.store.put.remote(record_of(session, kwargs, names)))
        session.record_kwargs = dict(kwargs)
        session.recorded = True

    def update(self, session: Session, **changes: Any) -> None:
        """Changes a recorded session's ``steps``, ``lbfgs`` or ``stepping`` (saved when it
        returns)."""
        if session.recorded:
            ray.get(self.store.update.remote(session.session_id, changes))

    def lbfgs_stepped(self, session: Session) -> None:
        """Records an LBFGS session's state after a step (or a load) as not stepping."""
        if session.recorded and (state := lbfgs_state(session)) is not None:
            self.update(session, steps=session.steps, lbfgs=state, stepping=False)

    def forget(self, session: Session) -> None:
        """Drops a session's record: a restarted gateway will not resume it."""
        if session.recorded:
            session.recorded = False
            self.drop(session.session_id)

    def drop(self, session_id: str) -> None:
        """Drops a record and waits for it (a close returns once no restart can resume it); a
        store that cannot answer now keeps the record until its reaper expires it."""
        try:
            ray.get(self.store.drop.remote(session_id))
        except ray.exceptions.RayError:
            logger.warning("session %s: dropping its record failed", session_id, exc_info=True)

    # ----- beats ------------------------------------------------------------------------------

    def start(self, sessions: Any) -> None:
        """Beats every :data:`BEAT_S` with the last use of ``sessions`` (a SessionTable)."""

        def beat() -> None:
            while not self._stop.wait(BEAT_S):
                now_wall, now = time.time(), time.monotonic()
                used = {
                    s.session_id: now_wall if s.active else now_wall - (now - s.last_used)
                    for s in sessions.snapshot()
                }
                try:
                    if not ray.get(self.store.beat.remote(self.gateway_id, used), timeout=30):
                        logger.error("another gateway took over this gateway's session store")
                except Exception:
                    logger.exception("session store: beat")

        self._beater = threading.Thread(target=beat, name="shardopt-store-beat", daemon=True)
        self._beater.start()

    def stop(self) -> None:
        self._stop.set()

    # ----- resuming ---------------------------------------------------------------------------

    def resume(self, sessions: Any, timeout_s: float = 60.0) -> list[Session]:
        """Takes the store over (waiting for a previous gateway's beats to stop) and resumes its
        sessions into ``sessions`` (a SessionTable), counting them in its ledger."""
        began = time.monotonic()
        deadline = began + timeout_s
        while (wait := self._claim()) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError("another gateway still uses this session store")
            time.sleep(min(wait, BEAT_S))
        records = ray.get(self.store.records.remote())
        hosts: dict[str, Any] = {}
        held: dict[str, list[str]] = {}
        for name in ray.get(self.store.hosts.remote()):
            try:
                host = ray.get_actor(name, namespace=NAMESPACE)
                held[name] = ray.get(host.info.remote(), timeout=60)["shards"]
            except Exception:  # gone (killed as idle, or lost with its node)
                continue
            hosts[name] = host
        resumed: list[Session] = []
        loads = dict.fromkeys(hosts, 0)
        for record, last_used in records:
            try:
                if not all(k in held.get(h, ()) for h, k in zip(record.hosts, record.keys)):
                    raise LookupError("a shard of it is gone")
                session = self._resume_one(record, [hosts[h] for h in record.hosts], last_used)
            except Exception as err:
                logger.warning("session %s cannot be resumed: %s", record.session_id, err)
                if record.group is not None:  # its rank is held for it: let go
                    holder = self.holder_of(record.session_id)
                    leave_group(record.group["name"], record.group["rank"], holder)
                ray.get(self.store.drop.remote(record.session_id))
                continue
            resumed.append(session)
            for h in record.hosts:
                loads[h] += 1
            sessions.ledger.resume_session(session.principal, session.nbytes)
            sessions.add(session)
        kept = {h.key for s in resumed for h in s.optimizer.backend.handles}
        for name, host in hosts.items():  # shards of sessions not resumed
            for key in held[name]:
                if key not in kept:
                    host.drop.remote(key)
        with self._lock:
            self._names.update({id(h): n for n, h in hosts.items()})
        host_pool.adopt(list(hosts.values()), [loads[n] for n in hosts], {})
        emit(
            logger, "sessions_resumed", sessions=len(resumed), dropped=len(records) - len(resumed),
            seconds=round(time.monotonic() - began, 3),
        )  # fmt: skip
        return resumed

    def _resume_one(self, record: SessionRecord, hosts: list[Any], last_used: float) -> Session:
        optimizer_class = OPTIMIZERS[record.optimizer]
        params = [torch.empty(shape, dtype=_dtype(dtype)) for dtype, shape in record.specs]
        groups = [{**options, "params": [params[i] for i in ids]} for ids, options in record.groups]
        kwargs = dict(record.kwargs)
        if record.group is not None:
            optimizer = self._resume_member(record, groups, optimizer_class, kwargs)
        else:
            attachment = Attachment(hosts, record.keys, record.placed, record.pieces)
            optimizer = ResumedOptimizer(groups, optimizer_class, attachment, **kwargs)
        session = Session(
            record.session_id, record.principal, optimizer, params, list(record.names),
            record.nbytes,
        )  # fmt: skip
        member = optimizer.group
        if member is not None:
            session.steps = min(member.versions) - member.first_version
            session.resend_next = True
        else:
            session.steps = optimizer.backend.next_step_id
        if isinstance(optimizer.backend, LBFGSShards):
            session.steps = record.steps
            if record.stepping:
                session.refused = (
                    f"the gateway restarted during LBFGS step {record.steps} of this session; "
                    "its shards may hold part of that step, which is not applied again nor "
                    "continued: close this session and open a new one (e.g. from a checkpoint "
                    "saved before)"
                )
            elif record.lbfgs is not None:
                optimizer.backend.adopt_portable_state(record.lbfgs)
        session.record_kwargs = kwargs
        session.placements = list(record.placed) or [len(record.groups)]
        session.recorded = True
        session.last_used = time.monotonic() - max(0.0, time.time() - last_used)
        if member is not None:
            logger.info(
                "resumed session %s (rank %d of group %r at versions %s)",
                record.session_id, member.rank, member.name, member.versions,
            )  # fmt: skip
            return session
        logger.info(
            "resumed session %s (%d shards, next step %d)",
            record.session_id, optimizer.num_shards, session.steps,
        )  # fmt: skip
        return session

    def _resume_member(
        self, record: SessionRecord, groups: list[dict], optimizer_class: type, kwargs: dict
    ) -> ShardedOptimizer:
        """A recorded group member's optimizer, attached again to its group and rank (the
        group's hosts and current parameters come from the registry and its shards).

        Raises:
            ValueError: a record whose group does not match what it was admitted with, or a
                layout other than the recorded one.
            LookupError: the group ended.
        """
        group = record.group
        if (group["name"], group["rank"]) != (kwargs.get("group"), kwargs.get("rank")):
            raise ValueError("the record's group is not the one its session was admitted to")
        holder = self.holder_of(record.session_id)
        optimizer = HeldGroupOptimizer(groups, optimizer_class, holder, True, **kwargs)
        member = optimizer.group
        member.first_version = group["first_version"]
        if record.pieces and pieces_of(member.shard_map) != record.pieces:
            optimizer.close()
            raise ValueError("the parameters' layout is not the one recorded")
        return optimizer
