"""Param groups: the hyperparameters a group carries, and torch's checks of loaded groups.

Talks to nothing; the proxy sends :func:`group_options` to its shards with every step.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch

_NOT_OPTIONS = ("params", "param_names")


def group_options(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's hyperparameters: everything but the tensors and their names."""
    return {k: v for k, v in group.items() if k not in _NOT_OPTIONS}


def copy_param_groups(params: list[Any]) -> list[Any]:
    """Copies the user's groups so that validating with a throwaway optimizer consumes nothing.

    A group's ``params`` may be a generator (``model.parameters()``): it becomes a list in the
    user's dict, as ``torch.optim`` itself does, before the copy is made.
    """
    copies = []
    for group in params:
        if isinstance(group, dict):
            if not isinstance(group.get("params"), (torch.Tensor, set, type(None))):
                group["params"] = list(group["params"])
            group = dict(group)
        copies.append(group)
    return copies


def check_param_groups(groups: list[dict[str, Any]], saved: list[dict[str, Any]]) -> list[dict]:
    """torch's checks of a loaded state dict's groups; returns a deep copy of them.

    Raises:
        ValueError: another number of groups, or a group of another size, than ``groups``.
    """
    saved_groups = deepcopy(saved)
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        raise ValueError(
            "loaded state dict contains a parameter group "
            "that doesn't match the size of optimizer's group"
        )
    return saved_groups
