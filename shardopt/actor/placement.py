"""Where shard actors go: Ray placement groups for one shard per node or per GPU, and the
nodes of a group's workers for a group without them.

A shard group (or an optimizer) may ask for its shards to be placed with one of Ray's placement
strategies (``STRICT_SPREAD``: one shard per node; ``SPREAD``: across nodes where possible;
``PACK``/``STRICT_PACK``: together), each shard reserving ``shard_resources`` (by default one
CPU; ``{"GPU": 1}`` for one shard per GPU). What the cluster cannot satisfy is refused at once,
from the nodes' total resources, with a message saying what to change; what it could satisfy
but whose resources are in use fails after ``timeout_s`` with the same kind of message.

A group without a placement goes where its workers are (:func:`worker_nodes`,
:func:`beside_workers`): spread over the nodes of the placement group the creating worker runs
in (Ray Train's workers each have a bundle of one), else on that worker's node.

Talks to: Ray (``ray.nodes()``, placement groups).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardopt.core.errors import PlacementError

logger = logging.getLogger(__name__)

STRATEGIES = ("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")
"""Ray's placement strategies, accepted in any case."""

DEFAULT_SHARD_RESOURCES: dict[str, float] = {"CPU": 1.0}


def _by_value(value: Any) -> Any:
    """``json.dumps``'s fallback for an option's value: an object with attributes (a Ray
    scheduling strategy, a placement group) as its type and attributes, anything else (an id)
    as its ``repr``. Ray's strategies have no ``__eq__`` and a ``repr`` with their address, so
    two equal ones made apart would otherwise be two keys."""
    if isinstance(value, PlacementGroup):  # its id (its bundle cache fills in later)
        return {"__type__": "PlacementGroup", "id": value.id.hex()}
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict):
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        return {"__type__": kind, **{str(k): v for k, v in attributes.items()}}
    return repr(value)


def options_key(actor_options: dict[str, Any]) -> str:
    """Ray actor options as a key that equal options share (pools of idle shard hosts reuse a
    host only for the very options it was started with; a shard group's workers must ask for
    the same ones). Equal options made apart (a ``NodeAffinitySchedulingStrategy`` for the same
    node, say) give the same key."""
    try:
        return json.dumps(dict(actor_options), sort_keys=True, default=_by_value)
    except ValueError:  # a circular structure: by repr, as before
        return json.dumps(dict(actor_options), sort_keys=True, default=repr)


def normalize_strategy(placement: str | None) -> str | None:
    """``placement`` in Ray's spelling, or None.

    Raises:
        ValueError: not one of :data:`STRATEGIES`.
    """
    if placement is None:
        return None
    if not isinstance(placement, str) or placement.upper() not in STRATEGIES:
        raise ValueError(
            f"Invalid placement: {placement!r} (use one of {', '.join(STRATEGIES)}, or None)"
        )
    return placement.upper()


def normalize_resources(resources: dict[str, float] | None) -> dict[str, float]:
    """A shard's resource bundle, checked (positive numbers) and defaulted to one CPU."""
    bundle = dict(DEFAULT_SHARD_RESOURCES if resources is None else resources)
    for key, value in bundle.items():
        if not isinstance(key, str) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"Invalid shard_resources entry {key!r}: {value!r}")
    if not any(bundle.values()):
        raise ValueError(f"shard_resources must reserve something, got {bundle}")
    return {k: float(v) for k, v in bundle.items() if v}


def _fits(bundle: dict[str, float], resources: dict[str, float]) -> int:
    """How many copies of ``bundle`` fit into ``resources``."""
    return int(min(resources.get(k, 0.0) // v for k, v in bundle.items()))


def check_feasible(num_shards: int, strategy: str, bundle: dict[str, float]) -> None:
    """Refuses a placement that the cluster's nodes could never satisfy, saying what to change.

    Raises:
        PlacementError: too few nodes (or resources) for ``num_shards`` bundles under ``strategy``.
    """
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    per_node = [_fits(bundle, res) for res in nodes]
    what = f"{num_shards} shards with {strategy} placement and {bundle} per shard"
    missing = sorted(k for k in bundle if not any(res.get(k) for res in nodes))
    if missing:
        raise PlacementError(
            f"cannot place {what}: no node of the cluster has {missing}. Add nodes with "
            f"those resources, or pass shard_resources without them"
        )
    if strategy == "STRICT_SPREAD":
        able = sum(1 for k in per_node if k >= 1)
        if able < num_shards:
            raise PlacementError(
                f"cannot place {what}: STRICT_SPREAD puts one shard per node and only {able} of "
                f"the cluster's {len(nodes)} alive nodes can hold one. Use num_shards<={able}, "
                f"placement='SPREAD' (several shards per node), smaller shard_resources, or "
                f"add nodes"
            )
    elif strategy == "STRICT_PACK":
        best = max(per_node, default=0)
        if best < num_shards:
            raise PlacementError(
                f"cannot place {what}: STRICT_PACK puts all shards on one node and the largest "
                f"holds {best}. Use num_shards<={best}, placement='PACK', or smaller "
                f"shard_resources"
            )
    elif sum(per_node) < num_shards:
        raise PlacementError(
            f"cannot place {what}: the whole cluster holds {sum(per_node)} such bundles. "
            f"Use num_shards<={sum(per_node)}, smaller shard_resources, or add nodes"
        )


def reserve(
    num_shards: int, strategy: str, bundle: dict[str, float], name: str, timeout_s: float
) -> tuple[PlacementGroup, list[dict[str, Any]]]:
    """Creates a detached placement group of one bundle per shard and waits until it is ready.

    Returns:
        The placement group and, per shard, the actor options that put it in its bundle.

    Raises:
        PlacementError: infeasible (at once) or not ready within ``timeout_s``.
    """
    check_feasible(num_shards, strategy, bundle)
    pg = placement_group(
        [dict(bundle) for _ in range(num_shards)], strategy=strategy, name=name, lifetime="detached"
    )
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise PlacementError(
            f"the {num_shards} shards ({strategy}, {bundle} each) could not be placed within "
            f"{timeout_s:g} s: the cluster has the resources but they are in use. Free them "
            f"(other placement groups, actors), lower shard_resources or num_shards"
        ) from None
    return pg, [bundle_options(pg, i, bundle) for i in range(num_shards)]


def bundle_options(pg: PlacementGroup, index: int, bundle: dict[str, float]) -> dict[str, Any]:
    """Actor options that place an actor in bundle ``index`` and reserve all of it."""
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
    options: dict[str, Any] = {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=index
        ),
        "num_cpus": bundle.get("CPU", 0.0),
        "num_gpus": bundle.get("GPU", 0.0),
    }
    if "memory" in bundle:
        options["memory"] = bundle["memory"]
    if custom:
        options["resources"] = custom
    return options


def worker_nodes() -> tuple[str, ...]:
    """The nodes this process's training job is laid out on, as far as Ray knows it here: those
    of the bundles of the placement group this actor runs in, in bundle order (one per bundle),
    else this process's node alone."""
    here = ray.get_runtime_context().get_node_id()
    try:
        pg = get_current_placement_group()
        if pg is None:
            return (here,)
        bundles = placement_group_table(pg).get("bundles_to_node_id") or {}
        nodes = tuple(bundles[i] for i in sorted(bundles) if bundles[i])
    except Exception as err:  # a Ray without the table: this node
        logger.debug("placement group of this worker not read: %s", err)
        return (here,)
    return nodes or (here,)


def beside_workers(num_shards: int, nodes: tuple[str, ...]) -> list[str | None]:
    """Per shard, the node of the workers' ``nodes`` it goes to: spread over them in order
    (shard ``s`` to ``nodes[s * len(nodes) // num_shards]``), or None without nodes."""
    if not nodes:
        return [None] * num_shards
    return [nodes[s * len(nodes) // num_shards] for s in range(num_shards)]


def release(pg: PlacementGroup | None) -> None:
    """Removes a placement group (ignoring one already gone)."""
    if pg is None:
        return
    try:
        remove_placement_group(pg)
    except Exception as err:  # the cluster is going away
        logger.debug("placement group not removed: %s", err)
