"""A worker's side of a shard group: attaching, pushing gradients, adopting parameters.

:class:`GroupClient` is what a :class:`~shardopt.optimizer.ShardedOptimizer` created with
``group=...`` uses instead of its own shards: it presents the worker's
:class:`~shardopt.records.GroupSignature` to the registry (:mod:`shardopt.group`), then steps
by pushing each shard's gradients (tagged with the version of the parameters they were computed
on) and copying the parameters each shard answers with into the worker's tensors. The rest of
the proxy (``state_dict``, loads, checkpoints, the state view) talks to the group's shard hosts
through the same ``call`` interface as to its own shards.

Talks to: the group registry and the group's shard hosts (:mod:`shardopt.group_shard`).
"""

from __future__ import annotations

import datetime
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray
import torch

from shardopt.buffers import readonly_tensor, to_numpy
from shardopt.groups import group_options
from shardopt.placement import normalize_resources, normalize_strategy
from shardopt.records import (
    GroupConfig,
    GroupMembership,
    GroupSignature,
    ParamsAt,
    PushRequest,
    PushResult,
    ShardSpec,
)
from shardopt.runtime import ray_get

if TYPE_CHECKING:
    from shardopt.optimizer import ShardedOptimizer

logger = logging.getLogger(__name__)

MODES = ("sync", "async")
MAX_STALE_RETRIES = 1000
"""How often ``step(closure)`` recomputes gradients rejected as too stale before giving up."""


def _plain(value: Any) -> Any:
    """A hyperparameter in a form that compares by value (tensors by their contents)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), tuple(value.flatten().tolist()))
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _plain(v)) for k, v in value.items()))
    return value


def timeout_seconds(timeout: datetime.timedelta | float) -> float:
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
    if not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ValueError(f"Invalid timeout: {timeout!r} (must be positive)")
    return float(seconds)


def make_config(
    *,
    world_size: int | None,
    rank: int | None,
    mode: str,
    max_staleness: int | None,
    timeout: datetime.timedelta | float,
    num_shards: int,
    placement: str | None,
    shard_resources: dict[str, float] | None,
    actor_options: dict[str, Any],
) -> GroupConfig:
    """Checks a worker's group options.

    Raises:
        ValueError: a missing or out-of-range ``world_size``/``rank``, an unknown ``mode``,
            ``max_staleness`` without async mode or negative, a bad placement.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size!r} (a group needs an int >= 1)")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"Invalid rank: {rank!r} (must be an int in [0, {world_size}))")
    if mode not in MODES:
        raise ValueError(f"Invalid mode: {mode!r} (use 'sync' or 'async')")
    if max_staleness is not None:
        if mode != "async":
            raise ValueError("max_staleness bounds async mode; sync mode is never stale")
        if not isinstance(max_staleness, int) or max_staleness < 0:
            raise ValueError(f"Invalid max_staleness: {max_staleness!r} (must be an int >= 0)")
    strategy = normalize_strategy(placement)
    resources = normalize_resources(shard_resources) if strategy else {}
    if shard_resources is not None and strategy is None:
        raise ValueError("shard_resources needs a placement strategy (e.g. placement='SPREAD')")
    return GroupConfig(
        world_size=world_size,
        mode=mode,
        max_staleness=max_staleness,
        timeout_s=timeout_seconds(timeout),
        num_shards=num_shards,
        placement=strategy,
        shard_resources=tuple(sorted(resources.items())),
        actor_options=tuple(sorted(actor_options.items())),
    )


def _leave(registry: Any, name: str, rank: int) -> None:
    """Detaches a worker (run by close() or when its optimizer is collected)."""
    if not ray.is_initialized():
        return
    try:
        registry.leave.remote(name, rank)
    except Exception:  # the cluster is going away
        pass


class GroupClient:
    """One worker's membership of a shard group and its push/pull data path."""

    def __init__(self, name: str, rank: int, config: GroupConfig) -> None:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"Invalid group name: {name!r} (a non-empty string without '/')")
        self.name = name
        self.rank = rank
        self.config = config
        self.membership: GroupMembership | None = None
        self.versions: list[int] = [0] * config.num_shards
        self.last_push: list[PushResult] = []

    def signature(self, proxy: ShardedOptimizer) -> GroupSignature:
        params = []
        for g in proxy.param_groups:
            names = g.get("param_names") or [None] * len(g["params"])
            for p, n in zip(g["params"], names):
                label = n if n is not None else f"params[{len(params)}]"
                params.append((label, tuple(p.shape), str(p.dtype).removeprefix("torch.")))
        cls = proxy.optimizer_class
        return GroupSignature(
            optimizer_class=f"{cls.__module__}.{cls.__qualname__}",
            defaults=_plain(proxy.defaults),
            group_options=tuple(_plain(group_options(g)) for g in proxy.param_groups),
            group_sizes=tuple(len(g["params"]) for g in proxy.param_groups),
            params=tuple(params),
            config=self.config,
        )

    def join(self, proxy: ShardedOptimizer, specs: list[ShardSpec]) -> GroupMembership:
        """Attaches to (or creates) the group and adopts its current parameters."""
        from shardopt.group import registry

        reg = registry()
        job_id = ray.get_runtime_context().get_job_id()
        signature = self.signature(proxy)
        # Only a worker that may create the group ships its initial parameters.
        spec_refs = [] if ray.get(reg.exists.remote(self.name)) else [ray.put(s) for s in specs]
        try:
            membership = ray_get(
                reg.join.remote(self.name, signature, self.rank, job_id, spec_refs)
            )
        except LookupError:  # the group ended between the two calls: create it after all
            spec_refs = [ray.put(s) for s in specs]
            membership = ray_get(
                reg.join.remote(self.name, signature, self.rank, job_id, spec_refs)
            )
        self.membership = membership
        proxy._hosts, proxy._keys = list(membership.hosts), list(membership.keys)
        proxy._finalizer = weakref.finalize(proxy, _leave, reg, self.name, self.rank)
        if not membership.created:
            logger.info("rank %d attached to existing group %r", self.rank, self.name)
        try:
            self.pull(proxy)
        except BaseException:
            proxy._finalizer()
            raise
        return membership

    # ----- parameters -------------------------------------------------------------------------

    @torch.no_grad()
    def pull(self, proxy: ShardedOptimizer) -> None:
        """Copies every shard's current parameters into the worker's tensors."""
        shards = [s for s in range(self.config.num_shards) if proxy._shard_params[s]]
        answers = ray_get([proxy._hosts[s].pull.remote(proxy._keys[s]) for s in shards])
        params = proxy._flat_params()
        for s, current in zip(shards, answers):
            self._adopt(proxy, s, current, params)

    def _adopt(
        self, proxy: ShardedOptimizer, shard: int, current: ParamsAt, params: list[torch.Tensor]
    ) -> None:
        values = readonly_tensor(ray_get(current.params))
        layout = proxy._layouts[shard]
        for j, pid in enumerate(proxy._shard_params[shard]):
            params[pid].copy_(layout.view(values, j))
            proxy._record_version(pid, params[pid])
        self.versions[shard] = current.version

    # ----- stepping ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, proxy: ShardedOptimizer, closure: Callable[[], Any] | None) -> Any:
        """Pushes this worker's gradients to every shard and adopts what they answer.

        In async mode with ``max_staleness``, a shard that rejects gradients as too stale
        answers with its current parameters; with a closure the gradients are computed again
        on them and pushed again to the shards that rejected, without one the step ends (see
        ``last_push``: ``applied_version`` None).
        """
        loss = None
        shards = [s for s in range(self.config.num_shards) if proxy._shard_params[s]]
        results: dict[int, PushResult] = {}
        for _ in range(MAX_STALE_RETRIES):
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            rejected = self._push(proxy, shards, results)
            if not rejected or closure is None:
                break
            shards = rejected
        else:
            raise RuntimeError(
                f"group {self.name!r}: gradients were rejected as too stale "
                f"{MAX_STALE_RETRIES} times in a row; raise max_staleness"
            )
        self.last_push = [results[s] for s in sorted(results)]
        proxy._note_state(i for r in self.last_push for i in r.new_state_ids)
        return loss

    def _push(
        self, proxy: ShardedOptimizer, shards: list[int], results: dict[int, PushResult]
    ) -> list[int]:
        """One push to ``shards``; returns the shards that rejected it as too stale."""
        params = proxy._flat_params()
        options = tuple(group_options(g) for g in proxy.param_groups)
        pending: dict[Any, int] = {}
        for s in shards:
            flat, has_grad, sparse, touched = proxy._pack_grads(s, params)
            if not touched and self.config.mode == "async":
                continue  # nothing to apply; sync still pushes: the round needs every rank
            request = PushRequest(
                self.rank, self.versions[s], options, to_numpy(flat), has_grad, sparse
            )
            pending[proxy._hosts[s].push.remote(proxy._keys[s], request)] = s
        proxy._shipped.clear()
        rejected = []
        waiting = list(pending)
        while waiting:  # adopt each shard's parameters as soon as it answers
            done, waiting = ray.wait(waiting, num_returns=1)
            result: PushResult = ray_get(done[0])
            s = pending[done[0]]
            self._adopt(proxy, s, result.current, params)
            results[s] = result
            if result.applied_version is None:
                rejected.append(s)
        return sorted(rejected)
