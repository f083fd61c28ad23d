"""Gateway sessions that outlive the gateway process: their records and hosts in the cluster.

With ``shardopt serve --session-store NAME``, the gateway keeps a :class:`SessionRecord` of
each resumable session in a detached, named Ray actor (:class:`SessionStore`, named
``gateway-sessions/NAME`` in shardopt's namespace) and starts its shard hosts as detached
actors that the store knows by name. A gateway killed and started again with the same NAME on
the same cluster finds the records there and resumes every session
(:mod:`shardopt.gateway.resume`) before it serves.

What a record holds, and what it does not: the session id, the token's principal (a SHA-256
hash of the token, :func:`~shardopt.gateway.auth.principal_of`; never the token), the
optimizer's class name and its admitted hyperparameters, the parameters' names, dtypes and
shapes, the param groups, the number of shards, and the names of the hosts and the keys of the
shards on them. Every field is written by the gateway from what it admitted and created; host
names and shard keys are made by the gateway (``host/<random>``, ``<pid>-<random>-<n>/<shard>``),
never taken from a request. Anyone in the Ray cluster can read and change them, as they can read
the shards: cluster members are trusted (``SECURITY.md``).

The store survives its own process: it is restarted by Ray (``max_restarts=-1``, its calls
retried) and writes every record, its hosts and (every :data:`SAVE_LAST_USED_S`) the sessions'
last use to the GCS's internal key-value store, as JSON (:func:`record_to_json`: data, never
pickled code), from which a restarted store reloads them. The keys are
``<store name>/record/<session id>``, ``<store name>/hosts`` and ``<store name>/last_used`` in
shardopt's namespace; the store deletes them when it ends.

Expiry without a gateway: the gateway beats (:meth:`SessionStore.beat`, every :data:`BEAT_S`)
with each session's last use. While it beats, it expires idle sessions itself. When beats stop
(the gateway died, or was never restarted), the store's own reaper closes the sessions unused
for the idle timeout (counted from their last use the gateway reported): it drops their shards
(a shard group member's rank leaves its group, at the registry) and kills the hosts that hold no
one's shards; once no record is left it kills its hosts and ends itself. So a session no gateway
ever resumes still dies, and nothing detached outlives its sessions for long.

Talks to: Ray (the store actor, host actors, the GCS's internal key-value store);
:class:`~shardopt.actor.host.ShardHost` (``drop``, ``info``) and the shard group registry
(``leave``) from the store's reaper.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from shardopt.core.default_dtype import DEFAULT_DTYPES

logger = logging.getLogger(__name__)

BEAT_S = 0.5
"""How often a gateway tells its store it is alive (and its sessions' last use)."""
STALE_S = 3.0
"""A gateway silent this long is gone: a new one may take over, the store's reaper runs."""
SAVE_LAST_USED_S = 5.0
"""How often the store writes its sessions' last use to the key-value store (at most; a store
restarted after a crash counts idle time from the last one written)."""
KV_NAMESPACE = "shardopt"
"""The GCS key-value namespace of the stores' records."""
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def store_name(name: str) -> str:
    """The store actor's name for ``--session-store NAME`` (letters, digits, ``._-``)."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid session store name {name!r}: 1-64 letters, digits, '.', '_' or '-'"
        )
    return f"gateway-sessions/{name}"


@dataclass(frozen=True)
class SessionRecord:
    """What a restarted gateway needs to resume a session (never the token itself)."""

    session_id: str
    principal: str
    """The hash of the token that opened it: only that token may use it."""
    optimizer: str
    kwargs: dict[str, Any]
    """The admitted hyperparameters, ``num_shards`` and ``default_dtype`` (plain values and
    default dtypes)."""
    groups: tuple[tuple[tuple[int, ...], dict[str, Any]], ...]
    """Each param group's parameter indices and options."""
    names: tuple[str, ...]
    specs: tuple[tuple[str, tuple[int, ...]], ...]
    """Each parameter's dtype (as ``str(torch.float32)``) and shape."""
    nbytes: int
    hosts: tuple[str, ...]
    """The names of the hosts of its shards, in shard order."""
    keys: tuple[str, ...]
    """Each shard's key on its host."""
    placed: tuple[int, ...] = ()
    """How many param groups each placement placed, in order: the groups it opened with, then
    one for each ``add_param_group`` (empty: all at once). A resume places them the same way."""
    pieces: tuple[tuple[tuple[int, int, int], ...], ...] = ()
    """Each parameter's pieces as (shard, first row, row after): the layout a resume must meet
    (empty: not checked)."""
    steps: int = 0
    """The steps the session took (counted by the gateway)."""
    lbfgs: dict[str, Any] | None = None
    """An LBFGS session's state between steps, its vectors by name (their values stay on the
    shards): see :meth:`shardopt.client.lbfgs.LBFGSShards.portable_state`."""
    stepping: bool = False
    """An LBFGS step was under way: its shards may hold part of it (a resume refuses its
    steps)."""
    group: dict[str, Any] | None = None
    """A shard group member's ``name`` (scoped by the token), ``rank``, ``world_size``,
    ``mode`` and ``first_version`` (the version it adopted when it attached: its step ``i``
    pushes for version ``first_version + i`` in sync mode). Its hosts are the registry's (the
    record's ``hosts`` and ``keys`` are empty); the registry holds its rank for this store."""


_RELOADED = "(the gateway before the store's restart)"
_DEFAULT_DTYPES = {str(d).removeprefix("torch."): d for d in DEFAULT_DTYPES}
_UPDATABLE = frozenset({"steps", "lbfgs", "stepping"})


def _encode(value: Any) -> Any:
    """A plain value as JSON, its containers tagged (so tuples stay tuples)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"t": [_encode(v) for v in value]}
    if isinstance(value, list):
        return {"l": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"d": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, torch.dtype) and value in DEFAULT_DTYPES:
        return {"dtype": [str(value).removeprefix("torch.")]}
    raise TypeError(f"a session record holds plain values only, not a {type(value).__name__}")


def _decode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((tag, items),) = value.items()
        if isinstance(items, list):
            if tag == "t":
                return tuple(_decode(v) for v in items)
            if tag == "l":
                return [_decode(v) for v in items]
            if tag == "d" and all(isinstance(kv, list) and len(kv) == 2 for kv in items):
                return {_decode(k): _decode(v) for k, v in items}
            if tag == "dtype" and len(items) == 1 and str(items[0]) in _DEFAULT_DTYPES:
                return _DEFAULT_DTYPES[items[0]]
    raise ValueError(f"not a session record's value: {value!r:.80}")


def record_to_json(record: SessionRecord) -> str:
    """A record as JSON text (its values tagged by kind)."""
    fields = dataclasses.fields(record)
    return json.dumps({f.name: _encode(getattr(record, f.name)) for f in fields})


def record_from_json(text: str | bytes) -> SessionRecord:
    """The record :func:`record_to_json` wrote.

    Raises:
        ValueError: text that is not such a record.
    """
    fields = json.loads(text)
    names = {f.name for f in dataclasses.fields(SessionRecord)}
    if not isinstance(fields, dict) or not set(fields) <= names:
        raise ValueError("not a session record")
    return SessionRecord(**{k: _decode(v) for k, v in fields.items()})


def leave_group(name: str, rank: int, holder: str) -> None:
    """Detaches a session's shard group member, rank ``rank`` of group ``name``, if ``holder``
    (the store's name and the session id) still holds it (its session expired, or is not
    resumed)."""
    import ray

    from shardopt.actor.host import NAMESPACE
    from shardopt.actor.shard_group_registry import REGISTRY_NAME

    try:
        ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE).leave.remote(name, rank, holder)
    except ValueError:  # no registry: no group
        pass


class _Saved:
    """The store's copy in the GCS's internal key-value store (under ``prefix``)."""

    def __init__(self, prefix: str) -> None:
        from ray.experimental import internal_kv

        self._kv = internal_kv
        self._prefix = prefix

    def _key(self, *parts: str) -> str:
        return "/".join((self._prefix, *parts))

    def put(self, record: SessionRecord) -> None:
        self._kv._internal_kv_put(
            self._key("record", record.session_id), record_to_json(record), namespace=KV_NAMESPACE
        )

    def drop(self, session_id: str) -> None:
        self._kv._internal_kv_del(self._key("record", session_id), namespace=KV_NAMESPACE)

    def put_json(self, name: str, value: Any) -> None:
        self._kv._internal_kv_put(self._key(name), json.dumps(value), namespace=KV_NAMESPACE)

    def load(self) -> tuple[list[SessionRecord], set[str], dict[str, float]]:
        """The records, hosts and last uses saved (a record that does not parse is dropped)."""
        records = []
        for key in self._kv._internal_kv_list(self._key("record", ""), namespace=KV_NAMESPACE):
            try:
                text = self._kv._internal_kv_get(key, namespace=KV_NAMESPACE)
                records.append(record_from_json(text))
            except (ValueError, TypeError) as err:
                logger.error("session store: dropping the unreadable record %s: %s", key, err)
                self._kv._internal_kv_del(key, namespace=KV_NAMESPACE)
        hosts = self._get_json("hosts", [])
        last_used = self._get_json("last_used", {})
        return (
            records,
            {h for h in hosts if isinstance(h, str)},
            {k: float(v) for k, v in last_used.items() if isinstance(v, (int, float))},
        )

    def _get_json(self, name: str, default: Any) -> Any:
        raw = self._kv._internal_kv_get(self._key(name), namespace=KV_NAMESPACE)
        try:
            value = json.loads(raw) if raw is not None else default
        except ValueError:
            return default
        return value if isinstance(value, type(default)) else default

    def clear(self) -> None:
        self._kv._internal_kv_del(self._prefix + "/", del_by_prefix=True, namespace=KV_NAMESPACE)


class SessionStore:
    """The records of a gateway's resumable sessions and its hosts (a detached Ray actor).

    Args:
        namespace: the Ray namespace of the hosts.
        idle_timeout_s: sessions unused this long die when no gateway beats (None: never).
        name: the store's actor name (its key-value prefix); a store restarted after its
            process died reloads what it saved there.
    """

    def __init__(self, namespace: str, idle_timeout_s: float | None, name: str) -> None:
        self._namespace = namespace
        self._idle_timeout_s = idle_timeout_s
        self._name = name  # its members' holders are "<name>/<session id>"
        self._saved = _Saved(name)
        records, self._hosts, last_used = self._saved.load()
        now = time.time()
        self._records = {r.session_id: r for r in records}
        self._last_used = {sid: last_used.get(sid, now) for sid in self._records}
        self._saved_at = now
        # restarted (something was saved): the gateway that beats within STALE_S is its own; a
        # new gateway's claim waits that long, as for a gateway that still beats
        self._gateway: str | None = _RELOADED if records or self._hosts else None
        self._beat = now
        self._lock = threading.Lock()
        if records:
            logger.info("session store: reloaded %d session record(s)", len(records))
        threading.Thread(target=self._reap_loop, name="session-store-reaper", daemon=True).start()

    # ----- the gateway's calls ---------------------------------------------------------------

    def claim(self, gateway: str, idle_timeout_s: float | None) -> float:
        """Makes ``gateway`` the store's gateway if the last one is silent; returns 0, or how
        many seconds to wait before asking again (another gateway still beats)."""
        with self._lock:
            silent = time.time() - self._beat
            if self._gateway not in (None, gateway) and silent < STALE_S:
                return STALE_S - silent
            self._gateway, self._beat = gateway, time.time()
            self._idle_timeout_s = idle_timeout_s
            return 0.0

    def beat(self, gateway: str, last_used: dict[str, float]) -> bool:
        """The gateway is alive; ``last_used`` holds its sessions' last use (wall clock).
        Returns False when another gateway has taken the store over."""
        with self._lock:
            if self._gateway == _RELOADED:  # this store was restarted: its gateway beats on
                self._gateway = gateway
            if gateway != self._gateway:
                return False
            self._beat = now = time.time()
            for session_id, when in last_used.items():
                if session_id in self._records:
                    self._last_used[session_id] = when
            if now - self._saved_at > SAVE_LAST_USED_S:
                self._saved_at = now
                self._saved.put_json("last_used", self._last_used)
            return True

    def put(self, record: SessionRecord) -> None:
        """Records a session (replacing its record), saved before it returns."""
        with self._lock:
            self._saved.put(record)
            self._records[record.session_id] = record
            self._last_used.setdefault(record.session_id, time.time())

    def update(self, session_id: str, changes: dict[str, Any]) -> bool:
        """Changes a record's ``steps``, ``lbfgs`` or ``stepping`` (saved before it returns);
        False if there is no such record."""
        if not set(changes) <= _UPDATABLE:
            raise ValueError(f"only {sorted(_UPDATABLE)} of a record change, not {sorted(changes)}")
        with self._lock:
            record = self._records.get(session_id)
            if record is None:
                return False
            record = dataclasses.replace(record, **changes)
            self._saved.put(record)
            self._records[session_id] = record
            return True

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._records.pop(session_id, None)
            self._last_used.pop(session_id, None)
            self._saved.drop(session_id)

    def records(self) -> list[tuple[SessionRecord, float]]:
        """Every record with its last use (wall clock)."""
        with self._lock:
            return [(r, self._last_used[r.session_id]) for r in self._records.values()]

    def add_host(self, name: str) -> None:
        with self._lock:
            self._hosts.add(name)
            self._saved.put_json("hosts", sorted(self._hosts))

    def hosts(self) -> list[str]:
        with self._lock:
            return sorted(self._hosts)

    # ----- expiry without a gateway ----------------------------------------------------------

    def _reap_loop(self) -> None:
        while True:
            time.sleep(BEAT_S)
            try:
                if self.reap():
                    break
            except Exception:  # keep reaping: a host that died is simply gone
                logger.exception("session store: reaping")
        import ray

        logger.info("session store: no sessions and no gateway left; ending")
        self._saved.clear()
        ray.kill(ray.get_runtime_context().current_actor)

    def reap(self) -> bool:
        """Closes idle sessions while no gateway beats; returns True when the store is empty
        and unattended (its hosts are killed then, and the store ends)."""
        now = time.time()
        with self._lock:
            if now - self._beat < STALE_S:
                return False
            timeout = self._idle_timeout_s
            expired = [
                r
                for r in self._records.values()
                if timeout is not None and now - self._last_used[r.session_id] > timeout
            ]
            for r in expired:
                del self._records[r.session_id]
                del self._last_used[r.session_id]
                self._saved.drop(r.session_id)
            live_hosts = {h for r in self._records.values() for h in r.hosts}
            empty = not self._records
        for r in expired:
            logger.info("session store: session %s expired without a gateway", r.session_id)
            if r.group is not None:
                leave_group(r.group["name"], r.group["rank"], f"{self._name}/{r.session_id}")
            for name, key in zip(r.hosts, r.keys):
                host = self._actor(name)
                if host is not None:
                    host.drop.remote(key)
        if expired or empty:
            self._kill_hosts(live_hosts)
        return empty

    def _actor(self, name: str) -> Any:
        import ray

        try:
            return ray.get_actor(name, namespace=self._namespace)
        except ValueError:  # gone
            return None

    def _kill_hosts(self, keep: set[str]) -> None:
        """Kills the hosts no remaining session uses (they hold no one's shards)."""
        import ray

        with self._lock:
            doomed = self._hosts - keep
            self._hosts -= doomed
            if doomed:
                self._saved.put_json("hosts", sorted(self._hosts))
        for name in doomed:
            host = self._actor(name)
            if host is not None:
                ray.kill(host)
