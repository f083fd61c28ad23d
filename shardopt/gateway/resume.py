"""A restarted gateway's sessions: recorded in the cluster as they open, resumed at start.

:class:`StoreLink` is the gateway's side of its :class:`~shardopt.gateway.session_store.
SessionStore`: it starts the gateway's shard hosts as detached actors the store knows, records
each resumable session (:func:`record_of`), beats with the sessions' last use, and at start
resumes every recorded session (:meth:`StoreLink.resume`) as a :class:`ResumedOptimizer`: a
:class:`~shardopt.client.optimizer.ShardedOptimizer` whose backend (:class:`ResumedShards`)
attaches to the shards that are there instead of creating new ones. The parameters are read
back from the shards; the shards' optimizer state never left them.

Resumable: sessions of a per-tensor optimizer outside shard groups. LBFGS sessions (whose step is
a conversation with the client) and shard group members are not recorded, nor is a session once
it added a param group: a restart closes those as before.

Talks to: the store actor and shard hosts (Ray); the servicer's session table and ledger.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from typing import Any

import ray
import torch

from shardopt.actor.host import NAMESPACE, ShardHost
from shardopt.client.handles import ShardHandle
from shardopt.client.local import LocalShards
from shardopt.client.optimizer import ShardedOptimizer
from shardopt.client.runtime import drop_shards, host_pool, ray_get
from shardopt.core.events import emit
from shardopt.core.param_groups import group_options
from shardopt.core.records import ShardSpec
from shardopt.gateway.admission import OPTIMIZERS
from shardopt.gateway.session_store import BEAT_S, SessionRecord, SessionStore, store_name
from shardopt.gateway.sessions import Session

logger = logging.getLogger(__name__)


class Attachment:
    """Where a resumed session's shards are: their hosts and keys."""

    def __init__(self, hosts: list[Any], keys: tuple[str, ...]) -> None:
        self.hosts = hosts
        self.keys = keys


class ResumedShards(LocalShards):
    """:class:`~shardopt.client.local.LocalShards` over shards that exist already (a resumed
    session's): each moves its buffers into shared memory with this process where it can, the
    parameters are read back, and the next step id follows the last one any shard applied."""

    def __init__(self, params: Any, num_shards: int, attachment: Attachment, **kwargs: Any) -> None:
        self._attachment = attachment
        self._last_steps: list[int] = []
        super().__init__(params, num_shards, **kwargs)
        self._next_step_id = max(self._last_steps) + 1
        self.pull_params()

    def _open_shards(
        self, specs: list[ShardSpec], actor_options: dict[str, Any], shared_memory: bool | None
    ) -> list[tuple[tuple[int, ...], Any]]:
        hosts, keys = self._attachment.hosts, self._attachment.keys
        self.handles = [ShardHandle(h, k, s) for s, (h, k) in enumerate(zip(hosts, keys))]
        self._finalizer = weakref.finalize(self, drop_shards, hosts, list(keys))
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


class ResumedOptimizer(ShardedOptimizer):
    """A :class:`~shardopt.client.optimizer.ShardedOptimizer` over a resumed session's shards."""

    def __init__(
        self, groups: list[dict], optimizer_class: type, attachment: Attachment, **kwargs: Any
    ) -> None:
        self._attachment = attachment
        super().__init__(groups, optimizer_class, **kwargs)

    def _make_backend(self, source: Any, **options: Any) -> Any:
        return ResumedShards(
            source, options["num_shards"], self._attachment,
            actor_options=options["actor_options"], shared_memory=options["shared_memory"],
            overlap=False, share_params=False, replicate=0,
        )  # fmt: skip


def resumable(optimizer: ShardedOptimizer) -> bool:
    """Whether a session's optimizer can be resumed by a restarted gateway."""
    return type(optimizer.backend) in (LocalShards, ResumedShards)


def repeat_from(session: Session, step_id: int) -> None:
    """Gives the session's next step the client's id: a repeat of the last one (its answer was
    lost, or the gateway restarted) is applied by no shard that applied it already.

    Raises:
        ValueError: an id before the last step (nothing is changed).
    """
    backend = session.optimizer.backend
    if not isinstance(backend, LocalShards) or not backend.per_tensor:  # groups, LBFGS
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
        keys=tuple(h.key for h in optimizer.backend.handles),
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
                get_if_exists=True, num_cpus=0,
            )
            .remote(NAMESPACE, self._idle_timeout_s)
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

    def put(self, session: Session, kwargs: dict[str, Any]) -> None:
        """Records a session (if it can be resumed) before its client hears of it."""
        names = self.host_names(session.optimizer)
        if names is None or not resumable(session.optimizer):
            return
        ray.get(self.store.put.remote(record_of(session, kwargs, names)))
        session.recorded = True

    def forget(self, session: Session) -> None:
        """Drops a session's record: a restarted gateway will not resume it (its param groups
        grew: the shards' placement is no longer the plan a resume makes)."""
        if session.recorded:
            session.recorded = False
            self.drop(session.session_id)

    def drop(self, session_id: str) -> None:
        self.store.drop.remote(session_id)

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
        optimizer = ResumedOptimizer(
            groups, optimizer_class, Attachment(hosts, record.keys), **kwargs
        )
        session = Session(
            record.session_id, record.principal, optimizer, params, list(record.names),
            record.nbytes,
        )  # fmt: skip
        session.steps = optimizer.backend.next_step_id
        session.recorded = True
        session.last_used = time.monotonic() - max(0.0, time.time() - last_used)
        logger.info(
            "resumed session %s (%d shards, next step %d)",
            record.session_id, optimizer.num_shards, session.steps,
        )  # fmt: skip
        return session
