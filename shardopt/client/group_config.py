"""A shard group worker's options, checked: :func:`make_config` builds the group's
:class:`~shardopt.core.records.GroupConfig` (mode, world size and rank, staleness bound, timeout,
placement, elasticity, replicas) or raises a ``ValueError`` that names the option to change;
:func:`group_request` gives them as a gateway's ``GroupOptions`` fields.

Talks to: :mod:`shardopt.actor.placement` (the placement strategies and resource bundles it
checks); nothing else (no Ray calls).
"""

from __future__ import annotations

import datetime
from typing import Any

from shardopt.actor.placement import normalize_resources, normalize_strategy
from shardopt.core.records import GroupConfig

MODES = ("sync", "async")
HEARTBEAT_TIMEOUT = datetime.timedelta(seconds=10)
"""An elastic group drops a member whose heartbeats stop for this long (by default)."""
MAX_GROUP_REPLICAS = 8
"""The most replicas (``replicate=k``) a group shard may have."""


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
    elastic: bool = False,
    heartbeat_timeout: datetime.timedelta | float = HEARTBEAT_TIMEOUT,
    replicate: int = 0,
    overlap: bool = False,
) -> GroupConfig:
    """Checks a worker's group options.

    Raises:
        ValueError: a missing or out-of-range ``world_size``/``rank``, an unknown ``mode``,
            ``max_staleness`` without async mode or negative, a bad placement, ``elastic``
            with async mode, ``replicate`` with async mode or above :data:`MAX_GROUP_REPLICAS`,
            ``overlap`` (a member has no gradients in flight before ``step()``).
    """
    if overlap:
        raise ValueError(
            "overlap=True applies to an optimizer's own shards: a shard group's member hands "
            "its gradients over at step() (into its slots, or in its push), so drop overlap"
        )
    if replicate and mode != "sync":
        raise ValueError(
            f"Invalid replicate: {replicate!r} for a shard group in {mode!r} mode: replicas of "
            "group shards follow every round of sync groups (replicate=True, or k replicas)"
        )
    if not isinstance(replicate, int) or not 0 <= replicate <= MAX_GROUP_REPLICAS:
        raise ValueError(
            f"Invalid replicate: {replicate!r} for a shard group (True, or the number of "
            f"replicas of each shard, 1 to {MAX_GROUP_REPLICAS})"
        )
    if not isinstance(elastic, bool):
        raise ValueError(f"Invalid elastic: {elastic!r} (True or False)")
    if mode not in MODES:
        raise ValueError(f"Invalid mode: {mode!r} (use 'sync' or 'async')")
    if elastic:
        if mode != "sync":
            raise ValueError("elastic=True applies to sync groups (async mode waits for nobody)")
        if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
            raise ValueError(f"Invalid world_size: {world_size!r} (None or an int >= 1)")
        if rank is not None and (
            not isinstance(rank, int) or rank < 0 or (world_size and rank >= world_size)
        ):
            raise ValueError(f"Invalid rank: {rank!r} (None, or an int >= 0 below world_size)")
    else:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"Invalid world_size: {world_size!r} (a group needs an int >= 1)")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"Invalid rank: {rank!r} (must be an int in [0, {world_size}))")
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
        elastic=elastic,
        heartbeat_timeout_s=timeout_seconds(heartbeat_timeout) if elastic else 10.0,
        replicate=int(replicate),
    )


def group_request(
    name: str | None, rank: int | None, config: GroupConfig | None
) -> dict[str, Any] | None:
    """A shard group's options as the gateway's ``GroupOptions`` fields (None: no group).

    Placement is not among them: the gateway's operator decides it.
    """
    if name is None or config is None:
        return None
    options: dict[str, Any] = {
        "name": name,
        "world_size": config.world_size,
        "rank": rank,
        "mode": config.mode,
        "timeout_seconds": config.timeout_s,
    }
    if config.max_staleness is not None:
        options["max_staleness"] = config.max_staleness
    return options
