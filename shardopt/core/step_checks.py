"""What torch refuses before a step changes anything, refused before any shard is asked.

torch's optimizers check their inputs before they update a parameter: a sparse gradient for a
dense algorithm (``Adam does not support sparse gradients, ...``), a dense one for SparseAdam,
complex parameters an algorithm cannot take, and tensors assigned to ``.grad`` must have the
parameter's shape, dtype and device. A sharded step must refuse the same inputs as a whole:
otherwise the shards that hold valid gradients would step while one refuses.

:class:`StepInputCheck` does that on the client. Shape, dtype and device are compared directly.
For the rest it asks torch itself: the first time a kind of input appears (per param group: the
layouts, dtypes and ranks of the gradients, and the options that choose torch's code path) it
runs the optimizer class over tiny stand-ins of those kinds, as the shards run it, and keeps the
verdict. Only torch's own classes are asked: a user's class may count its steps or log, so its
refusals surface from the shards (see :class:`~shardopt.core.errors.PartialStepError`).

Talks to nothing; backends call it (through
:meth:`~shardopt.client.backend.ParamSource.check_step_inputs`) at the start of every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from shardopt.core.param_groups import group_options

_PATH_OPTIONS = ("fused", "foreach", "differentiable", "capturable", "maximize")
"""Group options that choose which of torch's implementations (and checks) runs."""


def _grad_mismatch(pid: int, param: torch.Tensor, grad: torch.Tensor) -> str | None:
    if grad.shape != param.shape:
        return f"has shape {tuple(grad.shape)}, but its parameter has {tuple(param.shape)}"
    if grad.dtype != param.dtype:
        return f"has dtype {grad.dtype}, but its parameter has {param.dtype}"
    if grad.device != param.device:
        return f"is on {grad.device}, but its parameter is on {param.device}"
    return None


def _stand_in(is_sparse: bool, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    """A parameter of one element with a gradient of one kind."""
    shape = (1,) * ndim
    param = torch.zeros(shape, dtype=dtype)
    if is_sparse:
        indices = torch.zeros((max(ndim, 1), 0), dtype=torch.long)
        param.grad = torch.sparse_coo_tensor(
            indices, torch.zeros(0, dtype=dtype), shape, check_invariants=True
        )
    else:
        param.grad = torch.zeros_like(param)
    return param


class StepInputCheck:
    """Refuses, before anything is sent, a step that torch would refuse before updating.

    Args:
        optimizer_class: the algorithm the shards run.
        defaults: its constructor's keyword arguments.
        run_options: a group's options as a shard runs them (given the group's options and its
            tensors), e.g. with torch's fused kernel chosen by default.
    """

    def __init__(
        self,
        optimizer_class: type[torch.optim.Optimizer],
        defaults: dict[str, Any],
        run_options: Callable[[dict[str, Any], list[torch.Tensor]], dict[str, Any]],
    ) -> None:
        self._class = optimizer_class
        self._defaults = defaults
        self._run_options = run_options
        self._asks_torch = optimizer_class.__module__.startswith("torch.optim")
        self._verdicts: dict[Any, BaseException | None] = {}

    def __call__(self, param_groups: list[dict[str, Any]]) -> None:
        """Checks every gradient of ``param_groups``.

        Raises:
            RuntimeError: a gradient whose shape, dtype or device is not its parameter's, or
                what torch's own step raises for these inputs (same type and message).
        """
        kinds = []
        pid = 0
        for group in param_groups:
            group_kinds = set()
            for p in group["params"]:
                grad = p.grad
                if grad is not None:
                    if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
                        raise RuntimeError(
                            f"the gradient of parameter {pid} {_grad_mismatch(pid, p, grad)}"
                        )
                    group_kinds.add((grad.is_sparse, grad.dtype, p.dim()))
                pid += 1
            kinds.append(group_kinds)
        if not self._asks_torch:
            return
        key = tuple(
            (frozenset(k), tuple(repr(g.get(o)) for o in _PATH_OPTIONS))
            for k, g in zip(kinds, param_groups)
        )
        if key not in self._verdicts:
            self._verdicts[key] = self._ask_torch(param_groups, kinds)
        verdict = self._verdicts[key]
        if verdict is not None:
            raise type(verdict)(*verdict.args)

    def _ask_torch(
        self, param_groups: list[dict[str, Any]], kinds: list[set[tuple]]
    ) -> BaseException | None:
        """What torch's step raises for stand-ins of these kinds of inputs (None: nothing)."""
        groups = []
        for group, group_kinds in zip(param_groups, kinds):
            stand_ins = [_stand_in(*kind) for kind in sorted(group_kinds, key=repr)]
            options = self._run_options(group_options(group), stand_ins)
            groups.append({**options, "params": stand_ins})
        try:
            optimizer = self._class(groups, **self._defaults)
        except Exception:  # the real groups were accepted: a stand-in's quirk, not the user's
            return None
        step = type(optimizer).step
        # torch wraps every optimizer class's step to run the process's global step hooks and a
        # profiler range: those belong to the user's steps, not to this probe of stand-ins
        step = step.__wrapped__ if getattr(step, "hooked", False) else step
        try:
            step(optimizer)
        except (RuntimeError, ValueError, TypeError) as err:
            return err
        return None
