"""Helpers shared across the test suite: small seeded models and data, training steps, and the one
comparison of tensors, nested state and state dicts that every test uses.

- Models and data: :func:`make_model` (a seeded Tanh MLP; layer widths as an argument),
  :func:`mlp`, :func:`batch`, :func:`loss_of`.
- Training: :func:`train_step` (one step on a seeded minibatch), :func:`square_step` (one step on
  given inputs), :func:`run_steps` (steps on a seeded stream of inputs; parameters and
  ``state_dict`` after).
- Steps that stop half-way: :class:`InterruptedCopy` (a gradient whose copy raises
  ``KeyboardInterrupt``), :func:`grads_of_ones`, :func:`interrupt_a_step`, and
  :func:`sgd_on_ones` (what SGD's updates on those gradients give, to count the updates each
  shard applied).
- Comparing: :func:`assert_same` walks nested values (same types, same dict key order, tensors
  on the same device and equal); :func:`assert_same_tensors`, :func:`assert_same_params`,
  :func:`assert_same_state_dict` and its boolean form :func:`same_state_dict` are built on it.
  Every comparison is bit-exact (``rtol=0, atol=0``; shardopt runs torch's own kernels) unless a
  test passes ``tol``; ``bitwise=True`` compares tensors byte for byte.

Talks to torch only (no Ray, no shardopt): shard actors and Ray workers import the test modules.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

MODEL_SIZES = (6, 9, 5, 2)
"""The widths of :func:`make_model`'s layers unless a test asks for others."""

_SEEDING = threading.Lock()  # the global RNG is shared by threads (tests/test_group.py's ranks)


# ----- models and data -------------------------------------------------------------------------


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of widths ``sizes`` with a Tanh between each two, initialised from torch's
    global RNG (as it stands)."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes, sizes[1:]):
        if layers:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def make_model(seed: int = 0, sizes: Sequence[int] = MODEL_SIZES) -> nn.Sequential:
    """:func:`mlp` of ``sizes`` (by default 6 -> 9 -> 5 -> 2: six tensors of four sizes) with
    weights seeded by ``seed``; threads may call it at once."""
    with _SEEDING:
        torch.manual_seed(seed)
        return mlp(sizes)


def batch(seed: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded minibatch of ``n`` rows for :func:`make_model`: inputs (6 wide), targets (2)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 2, generator=gen)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean squared error of ``model(x)`` against ``y``."""
    return nn.functional.mse_loss(model(x), y)


# ----- training --------------------------------------------------------------------------------


def _step(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    opt.step()
    return loss.detach()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> torch.Tensor:
    """zero_grad, forward, backward and step on the minibatch of ``seed``; returns the loss."""
    return _step(opt, lambda: loss_of(model, *batch(seed)))


def square_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    """zero_grad, forward, backward and step with the mean square of ``model(x)`` as the loss;
    returns the loss."""
    return _step(opt, lambda: model(x).square().mean())


def closure_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    """One step on the mean square of ``model(x)`` through a closure (LBFGS needs one; the
    others run it first); returns the closure's loss."""

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    return opt.step(closure)


def run_steps(
    model: nn.Sequential,
    opt: torch.optim.Optimizer,
    steps: int,
    before_step: Callable[[int], object] | None = None,
    rows: int = 5,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """``steps`` :func:`square_step` calls on one seeded stream of inputs (``rows`` rows a step,
    as wide as the model's first layer); ``before_step(k)`` runs before step ``k``.

    Returns copies of the parameters and the optimizer's ``state_dict`` after the last step.
    """
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        square_step(model, opt, torch.randn(rows, model[0].in_features, generator=gen))
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


# ----- steps that stop half-way ----------------------------------------------------------------


class InterruptedCopy(torch.Tensor):
    """A gradient whose copy into a shard's buffer raises ``KeyboardInterrupt``, as Ctrl-C would in
    the middle of a step (``grad.as_subclass(InterruptedCopy)``)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch._foreach_copy_:
            raise KeyboardInterrupt
        return super().__torch_function__(func, types, args, kwargs or {})


def grads_of_ones(
    params: Sequence[torch.Tensor], owners: Sequence[int], interrupted: int | None = None
) -> None:
    """Gives every parameter a gradient of ones; those of shard ``interrupted`` (by ``owners``,
    one shard per parameter) an :class:`InterruptedCopy` one."""
    for p, shard in zip(params, owners):
        p.grad = torch.ones_like(p)
        if shard == interrupted:
            p.grad = p.grad.as_subclass(InterruptedCopy)


def interrupt_a_step(
    opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], owners: Sequence[int]
) -> None:
    """A step on gradients of ones whose copy of shard 1's is interrupted (the step must raise
    ``KeyboardInterrupt``); the gradients are then all plain ones again."""
    grads_of_ones(params, owners, interrupted=1)
    try:
        opt.step()
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the step was not interrupted")
    grads_of_ones(params, owners)


def sgd_on_ones(
    start: Sequence[torch.Tensor], updates: Sequence[int], lr: float = 0.5
) -> list[torch.Tensor]:
    """Each tensor of ``start`` after its number of ``updates`` of torch's SGD (no momentum) on
    gradients of ones, update by update as torch applies them (bit for bit)."""
    out = []
    for tensor, count in zip(start, updates):
        tensor = tensor.detach().clone()
        for _ in range(count):
            tensor.add_(torch.ones_like(tensor), alpha=-lr)
        out.append(tensor)
    return out


# ----- comparing -------------------------------------------------------------------------------


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(
    actual: Any, expected: Any, path: str = "", tol: float = 0.0, bitwise: bool = False
) -> None:
    """Equality of nested values: same types, same dict key order, same lengths, and tensors
    (on the same device) and floats equal to within ``tol`` (relative and absolute; bit-identical
    by default, NaN equal to NaN). ``bitwise=True``: tensors of the same dtype and shape with the
    same bytes (tells ``-0.0`` from ``0.0``). ``path`` names the root in messages."""
    where = path or "<root>"
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.device == expected.device, f"{where}: on {actual.device}"
        if bitwise:
            assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), (
                f"{where}: {actual.dtype}{list(actual.shape)} != "
                f"{expected.dtype}{list(expected.shape)}"
            )
            assert torch.equal(_bytes(actual), _bytes(expected)), f"{where}: the bytes differ"
        else:
            torch.testing.assert_close(
                actual, expected, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{where}: {m}"
            )
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}[{key!r}]", tol, bitwise)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]", tol, bitwise)
    elif isinstance(expected, float) and tol:
        assert math.isclose(actual, expected, rel_tol=tol, abs_tol=tol), f"{where}: {actual!r}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_same_tensors(
    got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], tol: float = 0.0, path: str = ""
) -> None:
    """As many tensors, each the same as its counterpart, to within ``tol`` (parameters are
    compared as tensors)."""
    assert_same([t.detach() for t in got], [t.detach() for t in want], path or "tensors", tol)


def assert_same_params(a: nn.Module, b: nn.Module, path: str = "params") -> None:
    """Two models' parameters, by name, bit-identical."""
    assert_same(
        {n: p.detach() for n, p in a.named_parameters()},
        {n: p.detach() for n, p in b.named_parameters()},
        path,
    )


def assert_same_state_dict(got: dict[str, Any], want: dict[str, Any], tol: float = 0.0) -> None:
    """``got`` is ``want``: the same param_groups, state ids in the same order, each state's keys
    in the same order, every state value the same (to within ``tol``; hyperparameters always
    exactly)."""
    assert list(got) == list(want), f"keys {list(got)} != {list(want)}"
    assert_same(got["param_groups"], want["param_groups"], "param_groups")
    assert_same(got["state"], want["state"], "state", tol)


def same_state_dict(got: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether :func:`assert_same_state_dict` holds (for ``assert not ...`` and for picking which
    of several candidates a state dict is)."""
    try:
        assert_same_state_dict(got, want)
    except AssertionError:
        return False
    return True


def events_in(text: str) -> list[dict[str, str]]:
    """The lifecycle event lines (``event=NAME key=value ...``) of a log, parsed."""
    from shardopt.core.events import parse_event

    found = []
    for line in text.splitlines():
        at = line.find("event=")
        if at >= 0:
            found.append(parse_event(line[at:]))
    return found
