"""Whether a worker may attach to a shard group: its signature against the group's.

:func:`comparable` puts a worker's hyperparameters in a form that compares by value;
:func:`signature_mismatch` names the first difference between a worker's
:class:`~shardopt.core.records.GroupSignature` (its parameters, optimizer class, hyperparameters
and group options) and the one the group was created with, in words; the registry
(:mod:`shardopt.actor.shard_group_registry`) refuses the worker with it.

Talks to: nothing (pure; the registry calls it). Actor options compare as
:func:`~shardopt.actor.placement.options_key` keys them.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from shardopt.actor.placement import options_key
from shardopt.core.records import GroupConfig, GroupSignature


def comparable(value: Any) -> Any:
    """A hyperparameter in a form that compares by value (tensors by their contents), as a
    worker's signature holds it."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), tuple(value.flatten().tolist()))
    if isinstance(value, (list, tuple)):
        return tuple(comparable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, comparable(v)) for k, v in value.items()))
    return value


def _option_mismatch(where: str, ours: tuple, theirs: tuple, name: str) -> str | None:
    mine, group = dict(ours), dict(theirs)
    for key in sorted(set(mine) | set(group)):
        if mine.get(key, "<unset>") != group.get(key, "<unset>"):
            return (
                f"{where} {key!r} is {mine.get(key, '<unset>')!r} here, "
                f"{group.get(key, '<unset>')!r} in group {name!r}"
            )
    return None


def signature_mismatch(name: str, group: GroupSignature, mine: GroupSignature) -> str | None:
    """The first difference between a worker's signature and its group's, in words."""
    if mine.optimizer_class != group.optimizer_class:
        return (
            f"optimizer class is {mine.optimizer_class} here, {group.optimizer_class} in "
            f"group {name!r}"
        )
    if mine.group_sizes != group.group_sizes:
        return (
            f"param group sizes are {list(mine.group_sizes)} here, {list(group.group_sizes)} "
            f"in group {name!r}"
        )
    if mine.group_splits != group.group_splits:
        return (
            f"split (per param group) is {list(mine.group_splits)} here, "
            f"{list(group.group_splits)} in group {name!r}"
        )
    if mine.default_dtype != group.default_dtype:
        return (
            f"the default dtype (torch.get_default_dtype()) is {mine.default_dtype} here, "
            f"{group.default_dtype} in group {name!r}"
        )
    if len(group.params) != len(mine.params):
        return (
            f"this worker has {len(mine.params)} parameters, group {name!r} has {len(group.params)}"
        )
    for i, (theirs, ours) in enumerate(zip(group.params, mine.params)):
        if theirs != ours:
            what = ("name", "shape", "dtype")
            k = next(k for k in range(3) if theirs[k] != ours[k])
            return (
                f"parameter {i} ({ours[0]!r}) has {what[k]} {ours[k]!r} here, "
                f"{theirs[k]!r} in group {name!r}"
            )
    problem = _option_mismatch("hyperparameter", mine.defaults, group.defaults, name)
    for g, (ours, theirs) in enumerate(zip(mine.group_options, group.group_options)):
        problem = problem or _option_mismatch(f"param group {g} option", ours, theirs, name)
    if problem:
        return problem
    for f in fields(GroupConfig):
        ours, theirs = getattr(mine.config, f.name), getattr(group.config, f.name)
        if f.name == "actor_options":  # Ray's scheduling strategies compare by identity
            ours, theirs = options_key(dict(ours)), options_key(dict(theirs))
        if ours != theirs:
            return f"{f.name} is {ours!r} here, {theirs!r} in group {name!r}"
    return None
