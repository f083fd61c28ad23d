"""Param groups: the hyperparameters a group carries, torch's checks of loaded groups, and the
options a shard runs a group with (torch's fused kernel where the user chose no path).

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


def adopt_saved_groups(
    groups: list[dict[str, Any]], saved_groups: list[dict[str, Any]], defaults: dict[str, Any]
) -> list[dict[str, Any]]:
    """A loaded state dict's groups with ``groups``' tensors (and names, where the saved ones
    have none), every default filled in: torch's ``update_group``."""
    new_groups = []
    for group, saved in zip(groups, saved_groups):
        saved["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            saved["param_names"] = group["param_names"]
        for name, default in defaults.items():
            saved.setdefault(name, default)
        new_groups.append(saved)
    return new_groups


FUSED_BY_DEFAULT: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW)
"""Classes whose shards run torch's fused kernel when the user chose neither fused nor foreach.

torch's fused Adam/AdamW is several times faster than foreach on CPU and GPU and agrees with it
to rounding (torch's own tests compare them with default tolerances). With ``fused=False``
(torch's default path) or ``foreach=True`` the shards run exactly what torch runs with it.
"""


def fuses_by_default(
    optimizer_class: type, options: dict[str, Any], default_dtype: torch.dtype = torch.float32
) -> bool:
    """Whether a shard runs a group with these options fused although the user did not ask:
    not under a float64 default dtype, where torch's own path keeps ``step`` in float64 and
    the fused kernel in float32."""
    return (
        optimizer_class in FUSED_BY_DEFAULT
        and default_dtype != torch.float64
        and options.get("fused") is None
        and options.get("foreach") is None
        and not options.get("differentiable")
        and not options.get("capturable")
    )


def is_fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused kernels take these tensors (floating point, on CPU or CUDA)."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def unfused_groups(params: list[torch.Tensor], groups: list[int]) -> tuple[int, ...]:
    """The param groups (``groups[i]``: parameter ``i``'s) holding a tensor that torch's fused
    kernels do not take: torch refuses ``fused=True`` for such a group as a whole."""
    return tuple(sorted({g for p, g in zip(params, groups, strict=True) if not is_fusable([p])}))


SPLITS_BY_DEFAULT: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adadelta,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.ASGD,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Rprop,
    torch.optim.SparseAdam,
)
"""torch's element-wise algorithms: every element's update depends on that element alone (and on
per-tensor scalars that follow from the step count), so a tensor's rows can live on different
shards with the same numbers. Adafactor and Muon work on whole matrices; a user's class keeps
whole tensors unless it opts in (``split=True``)."""


def sparse_step_keeps_other_rows(optimizer_class: type, group: dict[str, Any]) -> bool:
    """Whether a step with a sparse gradient changes only the parameter rows it touches (and
    their state): SparseAdam and Adagrad do, and SGD without momentum or weight decay; SGD
    with either changes the rows of earlier steps too (its momentum buffer is dense)."""
    if optimizer_class in (torch.optim.SparseAdam, torch.optim.Adagrad):
        return True
    if optimizer_class is torch.optim.SGD:
        return not group.get("momentum") and not group.get("weight_decay")
    return False


def split_choice(optimizer_class: type, asked: bool | None, where: str) -> bool:
    """Whether ``optimizer_class``'s tensors may be split into row ranges across shards.

    Raises:
        ValueError: ``split=True`` for one of torch's whole-matrix algorithms.
    """
    if asked is not None and not isinstance(asked, bool):
        raise ValueError(f"Invalid split {where}: {asked!r} (True, False or None)")
    by_default = optimizer_class in SPLITS_BY_DEFAULT
    if asked and not by_default and optimizer_class.__module__.startswith("torch.optim"):
        raise ValueError(
            f"{optimizer_class.__name__} updates whole matrices: its tensors cannot be split "
            f"across shards (split=True {where})"
        )
    return by_default if asked is None else asked


def run_options(
    optimizer_class: type,
    options: dict[str, Any],
    params: list[torch.Tensor],
    default_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """A group's options as a shard runs them: fused where torch's default is not asked for
    and the kernel takes the group's tensors."""
    if is_fusable(params) and fuses_by_default(optimizer_class, options, default_dtype):
        return {**options, "fused": True}
    return options


def lay_out_state(value: Any, param: torch.Tensor) -> Any:
    """A parameter's optimizer state with each tensor shaped as the parameter laid out as the
    parameter is, as torch's own state is: torch makes it with ``zeros_like(p)``, which keeps a
    ``channels_last`` or transposed parameter's strides, and its fused kernels take state and
    parameter to share them (a state laid out otherwise gives them wrong numbers). A tensor
    already laid out so is kept, not copied."""
    if isinstance(value, torch.Tensor):
        if value.shape != param.shape or value.stride() == param.stride():
            return value
        laid = torch.empty_like(param, dtype=value.dtype, device=value.device)
        return value if laid.stride() == value.stride() else laid.copy_(value)
    if isinstance(value, dict):
        return {k: lay_out_state(v, param) for k, v in value.items()}
    return value


def place_state(value: Any, device: torch.device, options: dict[str, Any], key: Any = None) -> Any:
    """A parameter's optimizer state with its tensors where torch keeps them for a parameter on
    ``device`` in a group with ``options``: every tensor on ``device``, but ``step`` on the CPU
    unless the group is fused or capturable (torch's ``load_state_dict`` policy; no dtype
    casts). Tensors already in place are kept, not copied."""
    if isinstance(value, torch.Tensor):
        if key == "step" and not (options.get("fused") or options.get("capturable")):
            return value
        return value.to(device)
    if isinstance(value, dict):
        return {k: place_state(v, device, options, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(place_state(v, device, options, key) for v in value)
    return value
