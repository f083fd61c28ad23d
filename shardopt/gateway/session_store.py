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

Expiry without a gateway: the gateway beats (:meth:`SessionStore.beat`, every
:data:`BEAT_S`) with each session's last use. While it beats, it expires idle sessions itself.
When beats stop (the gateway died, or was never restarted), the store's own reaper closes the
sessions unused for the idle timeout (counted from their last use the gateway reported): it
drops their shards and kills the hosts that hold no one's shards; once no record is left it
kills its hosts and ends itself. So a session no gateway ever resumes still dies, and nothing
detached outlives its sessions for long.

Talks to: Ray (the store actor, host actors); :class:`~shardopt.actor.host.ShardHost`
(``drop``, ``info``) from the store's reaper.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

BEAT_S = 0.5
"""How often a gateway tells its store it is alive (and its sessions' last use)."""
STALE_S = 3.0
"""A gateway silent this long is gone: a new one may take over, the store's reaper runs."""
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
    """The admitted hyperparameters and ``num_shards`` (plain values)."""
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


class SessionStore:
    """The records of a gateway's resumable sessions and its hosts (a detached Ray actor).

    Args:
        namespace: the Ray namespace of the hosts.
        idle_timeout_s: sessions unused this long die when no gateway beats (None: never).
    """

    def __init__(self, namespace: str, idle_timeout_s: float | None) -> None:
        self._namespace = namespace
        self._idle_timeout_s = idle_timeout_s
        self._records: dict[str, SessionRecord] = {}
        self._last_used: dict[str, float] = {}
        self._hosts: set[str] = set()
        self._gateway: str | None = None
        self._beat = time.time()
        self._lock = threading.Lock()
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
            if gateway != self._gateway:
                return False
            self._beat = time.time()
            for session_id, when in last_used.items():
                if session_id in self._records:
                    self._last_used[session_id] = when
            return True

    def put(self, record: SessionRecord) -> None:
        with self._lock:
            self._records[record.session_id] = record
            self._last_used[record.session_id] = time.time()

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._records.pop(session_id, None)
            self._last_used.pop(session_id, None)

    def records(self) -> list[tuple[SessionRecord, float]]:
        """Every record with its last use (wall clock)."""
        with self._lock:
            return [(r, self._last_used[r.session_id]) for r in self._records.values()]

    def add_host(self, name: str) -> None:
        with self._lock:
            self._hosts.add(name)

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
            live_hosts = {h for r in self._records.values() for h in r.hosts}
            empty = not self._records
        for r in expired:
            logger.info("session store: session %s expired without a gateway", r.session_id)
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
        for name in doomed:
            host = self._actor(name)
            if host is not None:
                ray.kill(host)
