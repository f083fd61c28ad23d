"""Ray for shardopt: joining or starting a cluster, and the pool of reusable shard hosts.

Starting a Ray actor costs seconds (a worker process that imports torch), so shard hosts are
pooled per process and per set of actor options: an optimizer borrows the least-loaded hosts,
creates its shards on them, and drops its shards when it is closed or collected; the hosts stay
for the next optimizer. A host can hold shards of several live optimizers (Ray runs one call at a
time per actor, so they take turns). The pool never holds more hosts per set of options than the
largest optimizer alive or past asked for; :meth:`HostPool.set_max_idle` bounds the hosts it keeps
idle (a gateway does: a closed session's extra hosts are killed, their processes end).

Also :func:`ray_get`, which turns a shard's failure into the shard's own exception (or a
:class:`~shardopt.core.errors.ShardUnavailableError` for a lost actor), and :func:`settle`,
which waits for calls whose outcome no longer matters to end.

Talks to: Ray (``ray.init``, actor creation); :class:`~shardopt.actor.host.ShardHost` remotely.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

import ray

from shardopt.actor.host import NAMESPACE, ShardHost, kill_actors
from shardopt.actor.placement import options_key
from shardopt.core.errors import ShardUnavailableError
from shardopt.core.idle_pool import IdlePool

logger = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Connects to the Ray cluster in reach, or starts a local one in-process.

    Inside a Ray cluster (a driver started by ``ray job submit``, ``RAY_ADDRESS`` set, or a
    task/actor) this joins it; otherwise it starts an embedded local Ray, even when other Ray
    instances run on this machine (set ``RAY_ADDRESS=auto`` to join one started with
    ``ray start``).
    """
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "address": os.environ.get("RAY_ADDRESS") or "local",
        "ignore_reinit_error": True,
        "log_to_driver": True,
    }
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False
    logger.info("starting/joining Ray (%s)", os.environ.get("RAY_ADDRESS") or "embedded local Ray")
    ray.init(**kwargs)


def default_num_shards() -> int:
    """One shard per GPU where the cluster has GPUs, else one per alive node."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return gpus if gpus >= 1 else max(1, sum(1 for node in ray.nodes() if node.get("Alive")))


def _cluster_id() -> str:
    ctx = ray.get_runtime_context()
    return f"{ctx.gcs_address}/{ctx.get_job_id()}"


class HostPool:
    """The shard hosts this process has started, per actor options, with their current load."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cluster: str | None = None
        self._hosts: dict[str, list[Any]] = {}
        self._load: dict[int, int] = {}
        self._keys = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]  # keys stay unique on hosts that outlive a process
        self._max_idle: int | None = None
        self._starter: Callable[[str, dict[str, Any]], Any] = _start_host
        self._started_by: dict[int, Any] = {}  # id(host) -> the starter it came from

    def set_starter(self, starter: Callable[[str, dict[str, Any]], Any] | None) -> None:
        """Starts new hosts with ``starter(name, actor_options)`` (None: a plain Ray actor of
        this process). A gateway whose sessions outlive it starts detached hosts it records
        (:mod:`shardopt.gateway.session_store`)."""
        with self._lock:
            self._starter = starter or _start_host

    def adopt(self, hosts: list[Any], loads: list[int], actor_options: dict[str, Any]) -> None:
        """Takes hosts started by another process into the pool (a restarted gateway's), each
        holding ``loads[i]`` live optimizers' shards; idle ones beyond the bound are killed."""
        ensure_ray()
        key = options_key(actor_options)
        with self._lock:
            self._reset_if_new_cluster()
            pooled = self._hosts.setdefault(key, [])
            for host, load in zip(hosts, loads):
                pooled.append(host)
                self._load[id(host)] = load
                self._started_by[id(host)] = self._starter
        self._trim()

    def set_max_idle(self, count: int | None) -> int | None:
        """Keeps at most ``count`` idle hosts in all (None: every one); the others are killed as
        they become idle. Returns the previous bound."""
        if count is not None and count < 0:
            raise ValueError(f"max idle hosts must be >= 0, got {count}")
        with self._lock:
            previous, self._max_idle = self._max_idle, count
        self._trim()
        return previous

    def hosts(self) -> list[Any]:
        """Every pooled host, over every set of actor options."""
        with self._lock:
            return [h for hosts in self._hosts.values() for h in hosts]

    def idle_hosts(self) -> int:
        """Hosts that hold no live optimizer's shards, over every set of actor options."""
        with self._lock:
            return sum(
                1 for hosts in self._hosts.values() for h in hosts if not self._load.get(id(h))
            )

    def _trim(self) -> None:
        """Kills the idle hosts beyond the bound (the last started of each set of options
        first, and those of another starter than the current one, which it would not use,
        before its own)."""
        doomed = []
        with self._lock:
            if self._max_idle is None:
                return
            idle = [(h, hosts) for hosts in self._hosts.values() for h in hosts
                    if not self._load.get(id(h))]  # fmt: skip
            idle.sort(key=lambda pair: self._started_by.get(id(pair[0])) is not self._starter)
            for h, hosts in idle[self._max_idle :]:
                hosts.remove(h)
                self._load.pop(id(h), None)
                self._started_by.pop(id(h), None)
                doomed.append(h)
        kill_actors(doomed)
        if doomed:
            logger.info("stopped %d idle shard host(s)", len(doomed))

    def _reset_if_new_cluster(self) -> None:
        cluster = _cluster_id()
        if cluster != self._cluster:
            self._cluster, self._hosts, self._load = cluster, {}, {}
            self._started_by = {}

    def acquire(
        self, count: int, actor_options: dict[str, Any] | None = None
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """``count`` distinct live hosts with the given options, least loaded first.

        New hosts are started where the pool has too few; hosts found dead (killed, or lost
        with their node) leave the pool and are replaced.

        Returns:
            The hosts and each one's ``info()`` (device, node, pid).

        Raises:
            ShardUnavailableError: hosts keep dying as they are started.
        """
        ensure_ray()
        options = dict(actor_options or {})
        key = options_key(options)
        for _ in range(3):
            chosen = self._choose(count, options, key)
            answers = [h.info.remote() for h in chosen]
            infos, dead = [], []
            for host, answer in zip(chosen, answers):
                try:
                    infos.append(ray.get(answer))
                except ray.exceptions.RayActorError:
                    dead.append(host)
            if not dead:
                return chosen, infos
            logger.warning("replacing %d dead shard host(s)", len(dead))
            self.release(chosen)
            with self._lock:
                self._hosts[key] = [h for h in self._hosts[key] if all(h is not d for d in dead)]
                for d in dead:
                    self._started_by.pop(id(d), None)
        raise ShardUnavailableError("shard hosts died as they were started; see Ray's logs")

    def _choose(self, count: int, options: dict[str, Any], key: str) -> list[Any]:
        with self._lock:
            self._reset_if_new_cluster()
            hosts = self._hosts.setdefault(key, [])
            # only the current starter's hosts: a gateway's session store can resume sessions
            # on the hosts it started, not on those this process had started before
            ours = [h for h in hosts if self._started_by.get(id(h)) is self._starter]
            while len(ours) < count:  # named: found by `shardopt status`
                host = self._starter(host_name(), options)
                self._started_by[id(host)] = self._starter
                hosts.append(host)
                ours.append(host)
            chosen = sorted(ours, key=lambda h: (self._load.get(id(h), 0), hosts.index(h)))[:count]
            chosen.sort(key=hosts.index)
            for h in chosen:
                self._load[id(h)] = self._load.get(id(h), 0) + 1
            return chosen

    def release(self, hosts: list[Any]) -> None:
        with self._lock:
            for h in hosts:
                if self._load.get(id(h), 0) > 0:
                    self._load[id(h)] -= 1
        self._trim()

    def forget(self, host: Any) -> None:
        """Drops a host found dead from the pool (the next acquire starts a replacement)."""
        with self._lock:
            for hosts in self._hosts.values():
                if any(h is host for h in hosts):
                    hosts[:] = [h for h in hosts if h is not host]
            self._load.pop(id(host), None)
            self._started_by.pop(id(host), None)

    def new_owner_key(self) -> str:
        return f"{os.getpid()}-{self._prefix}-{next(self._keys)}"


def _start_host(name: str, actor_options: dict[str, Any]) -> Any:
    """A new shard host actor of this process, named ``name`` in shardopt's namespace.

    ``enable_tensor_transport`` (Ray Direct Transport, :mod:`shardopt.client.transport`) is an
    option of the actor class in Ray, not of ``.options()``: it makes the class.
    """
    options = dict(actor_options)
    rdt = bool(options.pop("enable_tensor_transport", False))
    cls = ray.remote(enable_tensor_transport=True)(ShardHost) if rdt else ray.remote(ShardHost)
    return cls.options(namespace=NAMESPACE, name=name, **options).remote()


def host_name(kind: str = "host") -> str:
    """A unique name for a shard host actor (namespace ``shardopt``): ``host/<id>``, or
    ``replica/<id>`` for a replica's; ``shardopt status`` finds the hosts by these names."""
    return f"{kind}/{uuid.uuid4().hex[:16]}"


host_pool = HostPool()
"""The process-wide pool used by every optimizer of this process."""


class IdleReplicaHosts:
    """The dedicated replica hosts of this process's closed optimizers, emptied, kept for the
    next optimizer's replicas (starting one costs seconds). At most ``max_idle`` (the oldest
    is killed beyond); a replicated optimizer takes one only on another node than its shard's
    primary, where there is one."""

    def __init__(self, max_idle: int = 8) -> None:
        self._lock = threading.Lock()
        self._idle = IdlePool(max_idle)  # items: hosts; node: the node each runs on
        self._cluster: str | None = None  # the Ray session they belong to

    def _reset_if_new_cluster(self) -> None:
        cluster = _cluster_id()
        if cluster != self._cluster:
            self._cluster = cluster
            self._idle.clear()  # another cluster's actors: not ours to kill

    def take(self, actor_options: dict[str, Any], avoid_node: str | None) -> Any | None:
        """An idle host started with ``actor_options`` and not on ``avoid_node`` that still
        answers (None: start one)."""
        key = options_key(actor_options)
        while True:
            with self._lock:
                self._reset_if_new_cluster()
                taken = self._idle.take(key, accept=lambda idle: idle.node != avoid_node)
            if not taken:
                return None
            try:
                info = ray.get(taken[0].info.remote(), timeout=30)
            except Exception as err:  # died while idle
                logger.debug("idle replica host unusable: %s", err)
                continue
            if not info["shards"]:
                return taken[0]
            kill_actors(taken)

    def give(self, host: Any, actor_options: dict[str, Any], owner: str) -> None:
        """Drops owner ``owner``'s shards from ``host`` and keeps it, or kills it (it does not
        answer or holds other shards); kills the oldest idle host beyond ``max_idle``."""
        key = options_key(actor_options)
        try:
            keys = ray.get(host.info.remote(), timeout=30)["shards"]
            ray.get([host.drop.remote(k) for k in keys if k.startswith(f"{owner}/")], timeout=30)
            info = ray.get(host.info.remote(), timeout=30)
        except Exception as err:
            logger.debug("replica host not kept: %s", err)
            kill_actors([host])
            return
        if info["shards"]:
            kill_actors([host])
            return
        with self._lock:
            self._reset_if_new_cluster()
            dropped = self._idle.give(host, key, info["node_id"])
        kill_actors(dropped)


idle_replica_hosts = IdleReplicaHosts()
"""The idle replica hosts of this process (see :class:`IdleReplicaHosts`)."""


def ray_get(refs: Any) -> Any:
    """``ray.get`` that re-raises a shard's own exception and names a lost shard."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    except ray.exceptions.RayActorError as err:
        raise ShardUnavailableError(f"a shard actor is unavailable: {err}") from err


def settle(refs: list[Any], timeout_s: float = 120.0) -> None:
    """Waits until every ref has a value or an error (both ignored), at most ``timeout_s``."""
    if refs:
        try:
            ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        except Exception:  # a cluster going away: nothing left to wait for
            pass


def drop_shards(hosts: list[Any], keys: list[str]) -> None:
    """Releases an optimizer's shards (run by close() or when the optimizer is collected)."""
    if ray.is_initialized():
        for host, key in zip(hosts, keys):
            try:
                host.drop.remote(key)
            except Exception:  # the cluster is going away
                pass
    host_pool.release(hosts)
