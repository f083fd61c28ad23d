"""Mixed precision: ``torch.amp.GradScaler``'s contract with an optimizer, on both sides.

The proxy sets ``_step_supports_amp_scaling``, so ``scaler.step(optimizer)`` does not unscale the
gradients on the client (torch unscales them in place without bumping their version counters,
which would leave gradients shipped early by ``overlap=True`` scaled). It sets
``optimizer.grad_scale`` (None once the user has called ``scaler.unscale_``) and
``optimizer.found_inf`` instead, and the step takes them to the shards, where each param group
is stepped as torch would step it:

- a group a shard runs with torch's fused kernel gets ``grad_scale`` and ``found_inf`` as
  torch's fused Adam/AdamW/SGD/Adagrad take them (``torch.optim.AdamW(fused=True)`` under a
  GradScaler: the kernel divides by the scale and skips the update on an inf);
- any other group is unscaled with GradScaler's own kernel
  (``torch._amp_foreach_non_finite_check_and_unscale_`` by the same inverse scale) and skipped
  entirely on an inf, as ``scaler.step`` skips a plain optimizer.

``found_inf`` is the scaler's verdict over every gradient of the optimizer, so an inf anywhere
skips the step on every shard. Sparse gradients are unscaled here before they are coalesced, as
GradScaler does. Backends that cannot take the scale to the shards (shard groups, the gateway)
unscale here exactly as GradScaler would and skip the step on an inf (:func:`unscale_here`).

Talks to nothing: the proxy calls :func:`scaling_of`, shards call :func:`step_scaled`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class AmpScaling:
    """What GradScaler told the optimizer for one step (tensors on CPU).

    ``grad_scale`` is None when the gradients were already unscaled on the client
    (``scaler.unscale_``); ``found_inf`` is nonzero when any gradient was inf or NaN.
    """

    grad_scale: torch.Tensor | None
    found_inf: torch.Tensor

    @property
    def skips(self) -> bool:
        return bool(self.found_inf.item())

    def inv_scale(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The factor GradScaler unscales by: ``1 / scale`` computed in double, then float."""
        if self.grad_scale is None:
            return None
        return self.grad_scale.double().reciprocal().float().to(device)


def scaling_of(optimizer: torch.optim.Optimizer) -> AmpScaling | None:
    """The scaling GradScaler set on ``optimizer`` for this step, or None outside a scaler."""
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return None
    grad_scale = getattr(optimizer, "grad_scale", None)
    if grad_scale is not None:
        grad_scale = torch.as_tensor(grad_scale).detach().to("cpu", torch.float32)
    return AmpScaling(grad_scale, torch.as_tensor(found_inf).detach().to("cpu", torch.float32))


def unscale_sparse(grad: torch.Tensor, scaling: AmpScaling | None) -> torch.Tensor:
    """A sparse gradient unscaled as GradScaler would (its values, before coalescing)."""
    inv_scale = scaling.inv_scale(grad.device) if scaling is not None else None
    if inv_scale is None:
        return grad
    if grad.dtype is torch.float16:
        grad = grad.coalesce()
    values = grad._values() * inv_scale
    return torch.sparse_coo_tensor(  # the gradient's own indices: valid
        grad._indices(), values, grad.shape, dtype=grad.dtype, check_invariants=False
    )


def _unscale(grads: Iterable[torch.Tensor], inv_scale: torch.Tensor) -> None:
    """GradScaler's in-place unscale of dense gradients, grouped by device and dtype."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        by_kind[(grad.device, grad.dtype)].append(grad)
    for (device, _), group in by_kind.items():
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)  # whatever the default
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale.to(device))


def unscale_here(params: Iterable[torch.Tensor], scaling: AmpScaling) -> None:
    """What ``scaler.step`` does for an optimizer that does not take the scale: unscale every
    gradient in place (dense and sparse), with GradScaler's checks.

    Raises:
        ValueError: a float16 gradient (GradScaler's own refusal).
    """
    inv_scale = scaling.inv_scale()
    if inv_scale is None:
        return
    dense = []
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        if grad.dtype == torch.float16:
            raise ValueError("Attempting to unscale FP16 gradients.")
        dense.append(grad._values() if grad.is_sparse else grad)
    with torch.no_grad():
        _unscale(dense, inv_scale)


@contextlib.contextmanager
def _only_groups(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> Iterator[None]:
    everything = optimizer.param_groups
    optimizer.param_groups = groups
    try:
        yield
    finally:
        optimizer.param_groups = everything


def step_scaled(optimizer: torch.optim.Optimizer, scaling: AmpScaling | None) -> None:
    """One ``optimizer.step()`` as torch steps it under a GradScaler (see the module docstring).

    Sparse gradients must already be unscaled (:func:`unscale_sparse`).
    """
    if scaling is None:
        optimizer.step()
        return
    groups = optimizer.param_groups
    fused = [g for g in groups if g.get("fused")]
    plain = [g for g in groups if not g.get("fused")]
    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    if fused:
        optimizer.grad_scale = None if scaling.grad_scale is None else scaling.grad_scale.to(device)
        optimizer.found_inf = scaling.found_inf.to(device)
        try:
            with _only_groups(optimizer, fused if plain else groups):
                optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    if plain and not scaling.skips:
        inv_scale = scaling.inv_scale(device)
        if inv_scale is not None:
            with torch.no_grad():
                _unscale(
                    (
                        p.grad
                        for g in plain
                        for p in g["params"]
                        if p.grad is not None and not p.grad.is_sparse
                    ),
                    inv_scale,
                )
        with _only_groups(optimizer, plain if fused else groups):
            optimizer.step()
