"""Step-by-step parity of shardopt with ``torch.optim``, over every algorithm and torch's variants.

Each case runs one plain ``torch.optim`` optimizer and shardopt with 1, 2 and 3 shards on the same
parameters and the same gradients, and demands bit-identical parameters after every step and a
bit-identical ``state_dict`` (ids, order, keys, values, param_groups) after the last. On CPU both
run torch's own kernels on the same inputs, so there is no tolerance (LBFGS with several shards,
whose dot products are summed per shard, is the one exception).

The variants are torch's own (``optim_db[...].optim_inputs_func(device="cpu")``, and again with
``fused``/``differentiable``/``foreach``) plus a param-groups case per algorithm; see
:mod:`parity_cases`. Beyond those: complex parameters, more shards than tensors, LBFGS, what
happens between steps (schedulers, state-dict round trips, parameter edits, new groups), and an
optimizer class of the user's own.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from helpers import assert_same, assert_same_state_dict
from parity_cases import (
    STEPS,
    ParityCase,
    complex_cases,
    default_cases,
    default_lr,
    initial_values,
    lbfgs_cases,
    make_grads,
    make_params,
    parity_cases,
    set_grads,
)
from reference import run_as_shards

import shardopt

SHARD_COUNTS = (1, 2, 3)


def _as_params(cases: Iterable[ParityCase]) -> list[Any]:
    return [
        pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=c.skip)] if c.skip else [])
        for c in cases
    ]


def _sharded(
    case: ParityCase, params: list[torch.Tensor], num_shards: int, by_name: bool = False
) -> shardopt.ShardedOptimizer:
    """shardopt's optimizer for ``case``: ``ShardedOptimizer(..., cls)``, or with ``by_name``
    the ``shardopt.<Name>`` class that mirrors ``cls``'s signature."""
    if by_name and hasattr(shardopt, case.optim_cls.__name__):
        cls = getattr(shardopt, case.optim_cls.__name__)
        return cls(case.param_arg(params), num_shards=num_shards, **case.fresh_kwargs())
    return shardopt.ShardedOptimizer(
        case.param_arg(params), case.optim_cls, num_shards=num_shards, **case.fresh_kwargs()
    )


def assert_state_view_matches(opt: shardopt.ShardedOptimizer, params, reference, ref_params):
    """``opt.state`` (fetched from the shards) is ``reference.state``: same parameters in the
    same order, same values."""
    by_id = {id(r): p for p, r in zip(params, ref_params)}
    assert [id(p) for p in opt.state] == [id(by_id[id(r)]) for r in reference.state]
    for p, r in zip(params, ref_params):
        assert (p in opt.state) == (r in reference.state)
        assert_same(opt.state[p], reference.state.get(r, {}), f"state[param {id(r)}]")


def run_parity(case: ParityCase, shard_counts: tuple[int, ...], count: int | None = None) -> None:
    """Steps torch and shardopt (one optimizer per shard count) side by side and compares.

    The 2-shard run is built through ``shardopt.<Name>``, the others through
    ``ShardedOptimizer(params, torch.optim.<Name>, ...)``. After the last step the state dicts
    are compared for every run, and ``opt.state`` for the last.
    """
    kind = case.kind
    values = initial_values(kind, count)
    ref_params = make_params(values, case.requires_grad)
    reference = run_as_shards(case.optim_cls(case.param_arg(ref_params), **case.fresh_kwargs()))
    runs = []
    try:
        for n in shard_counts:
            params = make_params(values, case.requires_grad)
            runs.append((n, params, _sharded(case, params, n, by_name=n == 2)))
        for step in range(STEPS):
            grads = make_grads(kind, values, step, case.no_grad_at)
            set_grads(ref_params, grads)
            reference.step()
            for n, params, opt in runs:
                set_grads(params, grads)
                opt.step()
                for i, (p, ref) in enumerate(zip(params, ref_params)):
                    torch.testing.assert_close(
                        p,
                        ref,
                        rtol=0,
                        atol=0,
                        msg=lambda m, n=n, i=i, step=step: (
                            f"{n} shards, step {step}, param {i}: {m}"
                        ),
                    )
        expected = reference.state_dict()
        for n, _, opt in runs:
            try:
                assert_same_state_dict(opt.state_dict(), expected)
            except AssertionError as err:
                raise AssertionError(f"{n} shards: {err}") from err
        _, params, opt = runs[-1]
        assert_state_view_matches(opt, params, reference, ref_params)
    finally:
        for _, _, opt in runs:
            opt.close()


@pytest.mark.parametrize("case", _as_params(parity_cases()))
def test_parity_with_torch(case: ParityCase):
    run_parity(case, SHARD_COUNTS)


@pytest.mark.parametrize("case", _as_params(complex_cases()))
def test_parity_with_complex_params(case: ParityCase):
    run_parity(case, SHARD_COUNTS)


@pytest.mark.parametrize("algorithm", ["Adam", "AdamW"])
@pytest.mark.parametrize("layout", ["one group", "two groups"])
def test_a_group_with_a_complex_parameter_runs_torchs_default_path_on_every_shard(
    algorithm, layout
):
    """torch's ``fused=True`` refuses a param group with a complex parameter, so such a group
    gets the numbers of torch's default path, for its real parameters too: a shard that holds
    only real ones of it must not pick the fused kernel (it did, and its state drifted from
    torch's in the last bits); a group of real parameters beside it still runs fused."""
    torch.manual_seed(0)
    values = [torch.randn(3, 4, dtype=torch.complex64), torch.randn(5), torch.randn(2, 3)]
    ref_params = [torch.nn.Parameter(v.clone()) for v in values]
    params = [torch.nn.Parameter(v.clone()) for v in values]
    cls = getattr(torch.optim, algorithm)
    refused = cls([torch.nn.Parameter(values[0].clone())], fused=True)
    refused.param_groups[0]["params"][0].grad = torch.ones_like(values[0])
    with pytest.raises(RuntimeError, match="fused=True"):
        refused.step()
    groups = [ref_params] if layout == "one group" else [ref_params[:1], ref_params[1:]]
    # as shards run it: a group of real parameters fused, the complex one's on torch's path
    reference = run_as_shards(cls([{"params": g} for g in groups], lr=0.01))
    groups = [params] if layout == "one group" else [params[:1], params[1:]]
    opt = getattr(shardopt, algorithm)([{"params": g} for g in groups], lr=0.01, num_shards=2)
    try:
        if layout == "one group":
            assert [s.fused for s in opt.shard_status()] == [False, False]
        for step in range(4):
            for ps, o in ((ref_params, reference), (params, opt)):
                gen = torch.Generator().manual_seed(step)
                o.zero_grad()
                weights = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ps]
                sum((p * w).abs().sum() for p, w in zip(ps, weights)).backward()
                o.step()
            assert_same(params, ref_params, f"params after step {step}")
        assert_same_state_dict(opt.state_dict(), reference.state_dict())
    finally:
        opt.close()


@pytest.mark.parametrize("case", _as_params(default_cases()))
def test_parity_more_shards_than_tensors(case: ParityCase):
    """5 shards over 3 tensors: two shards hold nothing and must stay out of the way."""
    run_parity(case, (5,), count=3)


def test_every_torch_algorithm_is_covered():
    """Every ``optim_db`` algorithm has a ``shardopt.<Name>`` and parity cases here."""
    from torch.testing._internal.common_optimizers import optim_db

    tested = {c.optim_cls for c in (*parity_cases(), *lbfgs_cases())}
    for info in optim_db:
        assert info.optim_cls in tested
        assert issubclass(getattr(shardopt, info.name), shardopt.ShardedOptimizer)


# ----- LBFGS -----------------------------------------------------------------------------------

LBFGS_TOL = 1e-9
"""With 2+ shards, LBFGS's global dot products and norms are sums of per-shard partial sums: a
different summation order than torch's single ``torch.cat`` vector, so float64 results differ
in the last bits (``tests/test_lbfgs.py`` documents the same). One shard is bit-identical."""


@pytest.mark.parametrize("case", _as_params(lbfgs_cases()))
def test_lbfgs_parity_with_torch(case: ParityCase):
    """``shardopt.LBFGS`` against ``torch.optim.LBFGS`` on torch's LBFGS variants: the closure
    runs as often, and losses, parameters and state agree (exactly with one shard).

    ``max_iter=5`` (torch's default is 20) and two steps keep it fast: every LBFGS iteration is
    a few round trips to the shards. ``tests/test_lbfgs.py`` runs longer trajectories.
    """
    kwargs = {"max_iter": 5, **case.kwargs}
    values = initial_values(case.kind)
    ref_params = make_params(values)
    reference = torch.optim.LBFGS(ref_params, **copy.deepcopy(kwargs))
    gen = torch.Generator().manual_seed(11)
    batches = [
        (torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, 3, generator=gen))
        for _ in range(2)
    ]
    ref_losses, ref_evals = [], []
    for x, y in batches:
        ref_losses.append(reference.step(_closure(ref_params, x, y.double(), ref_evals)))
    ref_state = reference.state_dict()
    for n in (1, 3):
        tol = 0.0 if n == 1 else LBFGS_TOL
        params = make_params(values)
        evals = []
        with shardopt.LBFGS(params, num_shards=n, **copy.deepcopy(kwargs)) as opt:
            for (x, y), ref_loss in zip(batches, ref_losses):
                loss = opt.step(_closure(params, x, y.double(), evals))
                torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
            assert len(evals) == len(ref_evals), f"{n} shards: closure calls"
            assert_same(params, ref_params, f"{n} shards", tol)
            assert_same_state_dict(opt.state_dict(), ref_state, tol)


# ----- parity through what happens between steps -----------------------------------------------


def _lr_cases() -> list[ParityCase]:
    """Each algorithm's default case, and every variant with a tensor ``lr``."""
    return [
        c
        for c in parity_cases()
        if c.id.endswith("-default") or isinstance(c.kwargs.get("lr"), torch.Tensor)
    ]


def _step_both(
    case: ParityCase,
    step: int,
    ref_params: list[torch.Tensor],
    reference: torch.optim.Optimizer,
    runs: list[tuple[list[torch.Tensor], torch.optim.Optimizer]],
) -> None:
    """One step of the reference and of every ``(params, opt)`` run on the same gradients."""
    grads = make_grads(case.kind, ref_params, step, case.no_grad_at)
    set_grads(ref_params, grads)
    reference.step()
    for params, opt in runs:
        set_grads(params, grads)
        opt.step()
        assert_same(params, ref_params, f"step {step}")


@pytest.mark.parametrize("case", _as_params(_lr_cases()))
def test_parity_with_lr_scheduler(case: ParityCase):
    """A scheduler rewrites ``group["lr"]`` (in place for a tensor lr) between steps."""
    values = initial_values(case.kind)
    ref_params = make_params(values, case.requires_grad)
    params = make_params(values, case.requires_grad)
    reference = run_as_shards(case.optim_cls(ref_params, **case.fresh_kwargs()))
    ref_sched = torch.optim.lr_scheduler.StepLR(reference, step_size=2, gamma=0.3)
    with shardopt.ShardedOptimizer(
        params, case.optim_cls, num_shards=2, **case.fresh_kwargs()
    ) as opt:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)
        for step in range(STEPS):
            _step_both(case, step, ref_params, reference, [(params, opt)])
            ref_sched.step()
            sched.step()
        assert_same_state_dict(opt.state_dict(), reference.state_dict())


@pytest.mark.parametrize("case", _as_params(default_cases()))
def test_parity_across_state_dict_round_trips(case: ParityCase):
    """Mid-run, shardopt's state dict (2 shards) loads into torch and torch's into shardopt
    (3 shards); each pair then goes on in step.

    The loaded pair is compared with itself, not with the unloaded one: torch's
    ``load_state_dict`` casts non-``step`` state to the parameter's dtype (ASGD's ``eta``, NAdam's
    ``mu_product`` become float64 for a float64 parameter), which changes later rounding.
    """
    values = initial_values(case.kind)
    ref_params, params = make_params(values), make_params(values)
    reference = run_as_shards(case.optim_cls(ref_params, **case.fresh_kwargs()))
    with shardopt.ShardedOptimizer(
        params, case.optim_cls, num_shards=2, **case.fresh_kwargs()
    ) as opt:
        for step in range(3):
            _step_both(case, step, ref_params, reference, [(params, opt)])
        now = [p.detach() for p in ref_params]
        torch_params, loaded_params = make_params(now), make_params(now)
        from_shardopt = run_as_shards(case.optim_cls(torch_params, **case.fresh_kwargs()))
        from_shardopt.load_state_dict(opt.state_dict())
        with shardopt.ShardedOptimizer(
            loaded_params, case.optim_cls, num_shards=3, **case.fresh_kwargs()
        ) as from_torch:
            from_torch.load_state_dict(reference.state_dict())
            assert_same_state_dict(from_torch.state_dict(), from_shardopt.state_dict())
            for step in range(3, STEPS + 1):
                _step_both(case, step, ref_params, reference, [(params, opt)])
                _step_both(case, step, torch_params, from_shardopt, [(loaded_params, from_torch)])
            assert_same_state_dict(opt.state_dict(), reference.state_dict())
            assert_same_state_dict(from_torch.state_dict(), from_shardopt.state_dict())


@pytest.mark.parametrize("case", _as_params(default_cases()))
def test_parity_with_param_changes_between_steps(case: ParityCase):
    """The user edits parameters in place (tracked by version), through ``.data`` (then calls
    ``push_params``), and adds a param group mid-run."""
    values = initial_values(case.kind)
    ref_params, params = make_params(values), make_params(values)
    first = len(values) - 2
    reference = run_as_shards(case.optim_cls(ref_params[:first], **case.fresh_kwargs()))
    with shardopt.ShardedOptimizer(
        params[:first], case.optim_cls, num_shards=2, **case.fresh_kwargs()
    ) as opt:
        _step_both(case, 0, ref_params, reference, [(params, opt)])
        with torch.no_grad():
            for ps in (ref_params, params):
                ps[0].mul_(0.5)
                ps[first - 1].copy_(torch.ones_like(ps[first - 1]))
        _step_both(case, 1, ref_params, reference, [(params, opt)])
        for ps in (ref_params, params):
            ps[1].data.add_(0.25)
        opt.push_params()
        _step_both(case, 2, ref_params, reference, [(params, opt)])
        lr = default_lr(case.optim_cls)
        reference.add_param_group({"params": ref_params[first:], "lr": lr * 2})
        opt.add_param_group({"params": params[first:], "lr": lr * 2})
        for step in range(3, STEPS + 1):
            _step_both(case, step, ref_params, reference, [(params, opt)])
        assert_same_state_dict(opt.state_dict(), reference.state_dict())


# ----- a user-defined optimizer ---------------------------------------------------------------


class TinySGD(torch.optim.Optimizer):
    """SGD with heavy-ball momentum and a step counter, written the way users write optimizers.

    Defined at module level so that shard actors can import it (``tests/`` is on their path).
    """

    def __init__(self, params: Any, lr: float = 0.1, momentum: float = 0.5):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["velocity"] = torch.zeros_like(p)
                state["step"] += 1
                velocity = state["velocity"]
                velocity.mul_(group["momentum"]).add_(p.grad)
                p.add_(velocity, alpha=-group["lr"])
        return loss


def _closure(
    params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, calls: list[int] | None = None
) -> Callable[[], Any]:
    """A training closure with a real loss: a two-layer net over the dense model's first five
    tensors, and a small penalty on the others (so every parameter gets a gradient). Each call
    appends to ``calls``."""

    def closure() -> torch.Tensor:
        if calls is not None:
            calls.append(1)
        for p in params:
            p.grad = None
        w1, b1, w2, scale, cube, *rest = params
        hidden = torch.tanh(x @ w1.T + b1)  # (batch, 7)
        out = hidden @ w2.T * scale  # (batch, 3)
        loss = ((out - y) ** 2).mean() + 1e-3 * (cube**2).sum()
        loss = loss + sum(1e-3 * (p.float() ** 2).sum() for p in rest)
        loss.backward()
        return loss

    return closure


def _as_if_in_a_script(cls: type) -> type:
    """``cls`` defined anew from its source in a ``__main__`` namespace, as a class in a user's
    training script is: no shard can import it, so Ray pickles it by value."""
    namespace = {"__name__": "__main__", "torch": torch, "Any": Any, "Callable": Callable}
    exec(inspect.getsource(cls), namespace)
    return namespace[cls.__name__]


@pytest.mark.parametrize("defined_in", ["module", "script"])
def test_user_defined_optimizer(defined_in: str):
    """A user's own Optimizer subclass shards exactly like torch's (1-3 shards, two groups, a
    real loss through the closure), whether the shards import it or receive it by value."""
    optim_cls = TinySGD if defined_in == "module" else _as_if_in_a_script(TinySGD)
    assert (optim_cls.__module__ == "__main__") == (defined_in == "script")
    values = initial_values("dense")
    ref_params = make_params(values)

    def groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [{"params": params[:2], "lr": 0.05}, {"params": params[2:]}]

    reference = optim_cls(groups(ref_params), momentum=0.9)
    runs = []
    for n in SHARD_COUNTS:
        params = make_params(values)
        opt = shardopt.ShardedOptimizer(groups(params), optim_cls, num_shards=n, momentum=0.9)
        runs.append((params, opt))
    gen = torch.Generator().manual_seed(7)
    try:
        for step in range(STEPS):
            x, y = torch.randn(6, 5, generator=gen), torch.randn(6, 3, generator=gen)
            expected_loss = reference.step(_closure(ref_params, x, y))
            for params, opt in runs:
                loss = opt.step(_closure(params, x, y))
                torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
                assert_same(params, ref_params, f"{opt.num_shards} shards, step {step}")
        for _, opt in runs:
            assert_same_state_dict(opt.state_dict(), reference.state_dict())
    finally:
        for _, opt in runs:
            opt.close()
