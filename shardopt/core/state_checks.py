"""What a parameter's loaded optimizer state must look like before torch's kernels run on it.

torch's ``load_state_dict`` takes state tensors of any shape, and its Python step paths fail
cleanly on a wrong one; its *fused* CPU kernels do not check: torch 2.13's
``Adam(fused=True)`` stepping a ``(300, 300)`` parameter whose loaded ``exp_avg`` is ``(2, 3)``
writes past that tensor and aborts the process (``malloc(): unaligned fastbin chunk``). Shards
run the fused kernels by default, and a state dict or a checkpoint may come from anywhere, so a
shard checks every parameter's state as it takes it (a load, ``opt.state[p] = ...``), against
what torch's own algorithms keep:

- the tensors torch keeps in the parameter's shape (moments, buffers, accumulators, below)
  must have its shape and dtype (after torch's load casts floating tensors to it), and are
  laid out as the parameter (a copy where they are not: the fused kernels walk every tensor's
  memory in the parameter's order, and torch's own fused ``Adam`` writes past an expanded
  ``exp_avg``, which ``torch.save`` keeps with its one-element storage; shardopt's transports
  already deliver tensors dense, this keeps it so whatever path a state takes);
- ``step`` (and the other scalars) must hold one element;
- Adafactor's factored second moments (``row_var``, ``col_var``) have the shapes torch gives
  them.

A subclass of one of torch's algorithms is checked as that algorithm (it runs its kernels). Any
other optimizer class keeps whatever it keeps: only the scalars and the shapes of state it held
before are checked for it (:func:`check_param_state`'s ``before``).

Talks to nothing: pure functions over tensors.
"""

from __future__ import annotations

from typing import Any

import torch

PARAM_SHAPED = frozenset(
    {
        "momentum_buffer",  # SGD, RMSprop, Muon
        "exp_avg", "exp_avg_sq", "max_exp_avg_sq",  # Adam, AdamW, NAdam, RAdam, SparseAdam
        "exp_inf",  # Adamax
        "square_avg", "acc_delta", "grad_avg",  # Adadelta, RMSprop
        "sum",  # Adagrad
        "ax",  # ASGD
        "prev", "step_size",  # Rprop
        "variance",  # Adafactor, parameters of fewer than 2 dims
    }
)  # fmt: skip
"""State keys torch's algorithms keep in their parameter's shape and dtype."""

SCALARS = frozenset({"step", "eta", "mu", "mu_product"})
"""State keys torch's algorithms keep as one number."""


def _is_torchs(optimizer_class: type) -> bool:
    """Whether ``optimizer_class`` is one of torch's algorithms or a subclass of one."""
    return any(
        (c.__module__ + ".").startswith("torch.optim.") and c is not torch.optim.Optimizer
        for c in optimizer_class.__mro__
    )


def _factored(shape: tuple[int, ...], key: str) -> tuple[int, ...] | None:
    """The shape of Adafactor's ``row_var``/``col_var`` for a parameter of ``shape``."""
    if len(shape) < 2:
        return None
    dim = -1 if key == "row_var" else -2
    out = list(shape)
    out[dim] = 1
    return tuple(out)


def check_param_state(
    optimizer_class: type,
    param: torch.Tensor,
    state: Any,
    name: str,
    before: dict[str, Any] | None = None,
) -> Any:
    """Refuses state that torch's kernels could not step ``param`` with safely; returns it
    with each tensor kept in the parameter's shape laid out as the parameter.

    Args:
        optimizer_class: the algorithm the state is for.
        param: the parameter (its shape and dtype).
        state: its state as the optimizer would keep it (after torch's load casts).
        name: how the error names the parameter (``parameter id 3``).
        before: its state before the load, if any (a class that is not torch's: its tensors'
            shapes are kept).

    Raises:
        ValueError: a tensor of the wrong shape, dtype or size.
    """
    if not isinstance(state, dict):
        return state  # torch's own load refuses what is not a dict
    out = dict(state)
    torchs = _is_torchs(optimizer_class)
    shape = tuple(param.shape)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key in SCALARS:
            if value.numel() != 1:
                raise ValueError(
                    f"loaded state dict has {key!r} with {value.numel()} elements for {name}, "
                    "expected one number"
                )
            continue
        want_dtype: torch.dtype | None = param.dtype if torchs else None
        if torchs and key in PARAM_SHAPED:
            want_shape: tuple[int, ...] | None = shape
        elif torchs and key in ("row_var", "col_var"):
            want_shape = _factored(shape, key)
            if want_shape is None:
                raise ValueError(
                    f"loaded state dict has {key!r} for {name}, of shape {shape}: "
                    "Adafactor factors parameters of 2 dims or more only"
                )
        elif before is not None and isinstance(before.get(key), torch.Tensor):
            want_shape, want_dtype = tuple(before[key].shape), None
        else:
            continue
        if tuple(value.shape) != want_shape or (want_dtype and value.dtype != want_dtype):
            expected = str(want_shape) + (f" ({want_dtype})" if want_dtype else "")
            raise ValueError(
                f"loaded state dict has {key!r} of shape {tuple(value.shape)} ({value.dtype}) "
                f"for {name}, expected {expected}"
            )
        if want_dtype is not None and value.stride() != _strides_of(param, want_shape):
            out[key] = _laid_out(value, param if want_shape == shape else None)
    return out


def _strides_of(param: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides torch's own state of ``shape`` has for ``param`` (``zeros_like(param)``'s
    for the parameter's shape, contiguous for another)."""
    if shape == tuple(param.shape):
        return torch.empty_like(param, device="meta").stride()
    return torch.empty(shape, device="meta").stride()


def _laid_out(value: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """``value`` copied into a tensor laid out as ``like`` (contiguous without one)."""
    if like is None:
        return value.contiguous()
    return torch.empty_like(like, dtype=value.dtype, device=value.device).copy_(value)
