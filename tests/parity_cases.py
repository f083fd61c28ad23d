"""The cases and helpers of the step-by-step parity tests against ``torch.optim``.

Owns three things: the hyperparameter variants (torch's own ``optim_db``, read for CPU), the small
models with awkward tensors each algorithm runs on (odd shapes, mixed dtypes, non-contiguous and
empty tensors; 2-D only for Muon; sparse gradients for SparseAdam), and the cases themselves (one
:class:`ParityCase` per algorithm and variant). The comparisons are tests/helpers.py's.

Talks to: ``torch.testing._internal.common_optimizers`` only (imported when the cases are built:
it takes seconds, and shard actors import the test modules); no Ray, no shardopt.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import torch


class TensorSpec(NamedTuple):
    """One parameter of a test model."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    transposed: bool = False
    """Stored as the transpose of a contiguous tensor: a non-contiguous parameter."""


DENSE_MODEL = (
    TensorSpec((7, 5)),  # a weight
    TensorSpec((7,)),  # its bias
    TensorSpec((3, 7)),  # a matrix
    TensorSpec((1,)),  # a scalar-like
    TensorSpec((2, 3, 4), torch.float64),  # 3-D, and a second dtype in the same optimizer
    TensorSpec((4, 3), torch.bfloat16, transposed=True),  # half precision, non-contiguous
    TensorSpec((0, 3)),  # empty
)
"""What most algorithms run on: odd shapes, three dtypes, a non-contiguous and an empty tensor."""

MATRIX_MODEL = (
    TensorSpec((7, 5)),
    TensorSpec((3, 7)),
    TensorSpec((5, 4), transposed=True),
    TensorSpec((1, 6)),
)
"""Muon only takes 2-D parameters: tall, wide, non-contiguous, and a single row."""

EMBEDDING_MODEL = (TensorSpec((10, 3)), TensorSpec((6, 5)), TensorSpec((4, 2)), TensorSpec((1, 4)))
"""SparseAdam's parameters: embedding tables that receive sparse row gradients."""

COMPLEX_MODEL = (
    TensorSpec((7, 5)),
    TensorSpec((3, 2), torch.complex64),
    TensorSpec((4, 3), torch.complex64, transposed=True),
    TensorSpec((5,), torch.complex128),
)
"""Complex parameters (which torch's optimizers treat as pairs of reals) beside a real one."""

STEPS = 5

NO_GRAD_AT = {0: 1, 3: 0}
"""``{step: parameter index}``: that parameter has ``grad=None`` in that step, as torch allows.

Parameter 1 first gains state in step 1, so torch's state order is not the id order; parameter 0
is skipped in step 3 after it has state.
"""


def model_kind(optim_cls: type[torch.optim.Optimizer]) -> str:
    """Which model an algorithm runs on: ``"matrix"`` (Muon), ``"sparse"`` (SparseAdam),
    ``"dense-nonempty"`` (Adafactor: torch's divides by the element count), ``"float64"``
    (LBFGS: one dtype, contiguous gradients for torch's ``grad.view(-1)``), else ``"dense"``."""
    if issubclass(optim_cls, torch.optim.LBFGS):
        return "float64"
    if issubclass(optim_cls, torch.optim.Muon):
        return "matrix"
    if issubclass(optim_cls, torch.optim.SparseAdam):
        return "sparse"
    if issubclass(optim_cls, torch.optim.Adafactor):
        return "dense-nonempty"
    return "dense"


def model_specs(kind: str) -> tuple[TensorSpec, ...]:
    """The parameters of a model kind (see :func:`model_kind`, and ``"complex"``)."""
    if kind == "complex":
        return COMPLEX_MODEL
    if kind == "matrix":
        return MATRIX_MODEL
    if kind == "sparse":
        return EMBEDDING_MODEL
    if kind == "dense-nonempty":
        return tuple(t for t in DENSE_MODEL if math.prod(t.shape) > 0)
    if kind == "float64":
        return tuple(TensorSpec(t.shape, torch.float64) for t in DENSE_MODEL)
    return DENSE_MODEL


def initial_values(kind: str, count: int | None = None, seed: int = 0) -> list[torch.Tensor]:
    """The starting values of a model's parameters (the first ``count`` of them)."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for spec in model_specs(kind)[:count]:
        shape = spec.shape[::-1] if spec.transposed else spec.shape
        value = torch.randn(shape, generator=gen, dtype=spec.dtype)
        values.append(value.t() if spec.transposed else value)
    return values


def make_params(values: list[torch.Tensor], requires_grad: bool = True) -> list[torch.Tensor]:
    """Fresh leaf parameters holding copies of ``values``, strides included (one set per
    optimizer under test).

    ``requires_grad=False`` for ``differentiable=True`` runs: torch then steps with autograd on,
    and an in-place update of a leaf that requires grad is an error (torch's own tests step
    non-leaf or grad-free tensors there).
    """
    return [torch.nn.Parameter(v.clone(), requires_grad=requires_grad) for v in values]


def _sparse_grad(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """An uncoalesced sparse COO row gradient, as ``Embedding(sparse=True)`` produces."""
    rows = torch.randint(0, shape[0], (shape[0] + 1,), generator=gen)  # some rows repeat
    values = torch.randn((len(rows), *shape[1:]), generator=gen)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape, check_invariants=True)


def make_grads(
    kind: str, values: list[torch.Tensor], step: int, no_grad_at: dict[int, int] = NO_GRAD_AT
) -> list[torch.Tensor | None]:
    """The gradients of one step: random, different every step, ``None`` as ``no_grad_at``."""
    gen = torch.Generator().manual_seed(1000 + step)
    grads: list[torch.Tensor | None] = []
    for i, v in enumerate(values):
        if kind == "sparse":
            grad = _sparse_grad(tuple(v.shape), gen)
        else:
            grad = torch.randn(v.shape, generator=gen, dtype=v.dtype)
        grads.append(None if no_grad_at.get(step) == i else grad)
    return grads


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Gives each parameter its own copy of its gradient.

    A dense gradient takes the parameter's strides, as autograd's would: torch's fused CPU
    kernels (Adam, AdamW, SGD, Adagrad) give wrong numbers for a non-contiguous parameter whose
    gradient is laid out differently.
    """
    for p, g in zip(params, grads):
        if g is None:
            p.grad = None
        elif g.is_sparse:
            p.grad = g.clone()
        else:
            p.grad = torch.empty_like(p, requires_grad=False).copy_(g)


# ----- the variants -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParityCase:
    """One hyperparameter variant of one algorithm: its test id, class, kwargs and groups (and
    the model it runs on, when not the algorithm's usual one)."""

    id: str
    optim_cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any]
    groups: Callable[[list[torch.Tensor]], list[Any]] | None = None
    skip: str | None = None
    model: str | None = None

    @property
    def kind(self) -> str:
        """The model kind to build (:func:`model_kind` unless the case names one)."""
        return self.model or model_kind(self.optim_cls)

    def param_arg(self, params: list[torch.Tensor]) -> list[Any]:
        """What to pass as ``params``: the tensors, or the case's param groups over them."""
        return list(params) if self.groups is None else self.groups(params)

    @property
    def requires_grad(self) -> bool:
        """Whether the parameters may require grad (not with ``differentiable=True``)."""
        return not self.kwargs.get("differentiable", False)

    @property
    def no_grad_at(self) -> dict[int, int]:
        """Which parameter lacks a gradient in which step (see :data:`NO_GRAD_AT`).

        torch's fused SGD with momentum fails (``TypeError: expected Tensor as element 1``) when
        a parameter gets its first gradient after the first step, so those cases only skip a
        parameter that already has state.
        """
        kwargs = self.kwargs
        if self.optim_cls is torch.optim.SGD and kwargs.get("fused") and kwargs.get("momentum"):
            return {s: i for s, i in NO_GRAD_AT.items() if s > 0}
        return NO_GRAD_AT

    def fresh_kwargs(self) -> dict[str, Any]:
        """A deep copy of the kwargs, so two optimizers never share a tensor ``lr``."""
        return copy.deepcopy(self.kwargs)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")


def _cpu_skip_reason(optim_info: Any, kwargs: dict[str, Any]) -> str | None:
    """Why a variant cannot run on CPU, or None. ``optim_inputs_func(device="cpu")`` already
    leaves out the CUDA-only ones; this guards against torch adding more."""
    if kwargs.get("capturable"):
        return "capturable=True needs CUDA"
    if kwargs.get("fused") and "cpu" not in optim_info.supports_fused_on:
        return f"fused {optim_info.name} is not available on CPU"
    return None


def default_lr(optim_cls: type) -> float:
    """The default learning rate in ``optim_cls``'s signature."""
    return inspect.signature(optim_cls.__init__).parameters["lr"].default


def _three_groups(optim_cls: type) -> Callable[[list[torch.Tensor]], list[dict[str, Any]]]:
    """Param groups in torch's ``test_param_groups_*`` style: per-group ``lr`` and (where the
    algorithm has one) ``weight_decay``, a group given as a bare tensor, and one on the
    defaults."""
    lr = default_lr(optim_cls) / 2
    has_wd = "weight_decay" in inspect.signature(optim_cls.__init__).parameters

    def groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
        middle = {"weight_decay": 0.05} if has_wd else {"lr": lr * 3}
        return [
            {"params": params[:2], "lr": lr},
            {"params": params[2], **middle},
            {"params": params[3:]},
        ]

    return groups


def _groups_from_spec(spec: Any) -> Callable[[list[torch.Tensor]], list[Any]]:
    """Rebuilds a variant's own param-group spec over our tensors (dicts keep their options;
    their tensors are replaced, in order, by ours)."""
    if not isinstance(spec, list) or not all(isinstance(g, dict) for g in spec):
        raise NotImplementedError(f"param spec {spec!r} is not a list of group dicts")

    def groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
        chunks = [params[i :: len(spec)] for i in range(len(spec))]
        return [
            {**{k: v for k, v in g.items() if k != "params"}, "params": c}
            for g, c in zip(spec, chunks)
        ]

    return groups


@functools.cache
def parity_cases() -> tuple[ParityCase, ...]:
    """Every CPU variant of every ``optim_db`` algorithm but LBFGS, plus a param-groups case each.

    The variants are ``optim_inputs_func(device="cpu")`` as given, then each of them again with
    each implementation flag torch tests on CPU switched on (``fused``, ``differentiable``: torch's
    ``_get_optim_inputs_including_global_cliquey_kwargs``), and ``foreach=True`` with the
    default hyperparameters (torch leaves it out on CPU for lack of fast kernels, but it runs).
    A variant that comes with its own ``params`` spec is rebuilt over our model when it is a list
    of group dicts; anything else (a bare tensor list tied to torch's own test model) is skipped
    with its reason.
    """
    from torch.testing._internal.common_optimizers import OptimizerInput, optim_db
    from torch.testing._internal.common_optimizers import (
        _get_optim_inputs_including_global_cliquey_kwargs as with_flags,
    )

    cases = []
    for info in optim_db:
        cls = info.optim_cls
        if cls is torch.optim.LBFGS:
            continue  # not per-tensor: see lbfgs_cases()
        flagged = [i for i in with_flags("cpu", None, info) if " & " in i.desc]
        if "foreach" in info.supported_impls:
            flagged.append(OptimizerInput(None, {"foreach": True}, "default & foreach"))
        for optim_input in [*info.optim_inputs_func(device="cpu"), *flagged]:
            case_id = f"{info.name}-{_slug(optim_input.desc)}"
            kwargs = dict(optim_input.kwargs)
            skip = _cpu_skip_reason(info, kwargs)
            groups = None
            if optim_input.params is not None:
                try:
                    groups = _groups_from_spec(optim_input.params)
                except NotImplementedError as err:
                    skip = skip or str(err)
            cases.append(ParityCase(case_id, cls, kwargs, groups, skip))
        if info.supports_param_groups:
            cases.append(ParityCase(f"{info.name}-param-groups", cls, {}, _three_groups(cls)))
    return tuple(cases)


def lbfgs_cases() -> list[ParityCase]:
    """LBFGS's CPU variants from ``optim_db`` (shardopt runs it as :class:`shardopt.LBFGS`)."""
    from torch.testing._internal.common_optimizers import optim_db

    (info,) = [i for i in optim_db if i.optim_cls is torch.optim.LBFGS]
    return [
        ParityCase(f"LBFGS-{_slug(i.desc)}", torch.optim.LBFGS, dict(i.kwargs))
        for i in info.optim_inputs_func(device="cpu")
    ]


def default_cases() -> list[ParityCase]:
    """One case per algorithm: its default hyperparameters."""
    return [c for c in parity_cases() if c.id.endswith("-default")]


def complex_cases() -> list[ParityCase]:
    """The default case of every algorithm torch supports complex parameters for, on
    :data:`COMPLEX_MODEL`."""
    from torch.testing._internal.common_optimizers import optim_db

    supported = {i.optim_cls for i in optim_db if i.supports_complex}
    return [
        dataclasses.replace(c, id=f"{c.id}-complex", model="complex")
        for c in default_cases()
        if c.optim_cls in supported
    ]
