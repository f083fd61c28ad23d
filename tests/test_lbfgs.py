"""Sharded LBFGS against torch.optim.LBFGS: trajectories, closure counts, state_dict both ways.

float64 trajectories agree to ~1e-9 (a different summation order of the global dot products is
the only difference; with one shard they are bit-identical); float32 runs converge as torch's do.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_state_dict, assert_same_tensors
from sklearn.datasets import load_breast_cancer

import shardopt


def rosenbrock(params):
    x = torch.cat([p.reshape(-1) for p in params])
    return ((1 - x[:-1]) ** 2 + 100 * (x[1:] - x[:-1] ** 2) ** 2).sum()


_gen = torch.Generator().manual_seed(3)
_A = torch.randn(40, 9, generator=_gen, dtype=torch.float64)
_b = torch.randn(40, generator=_gen, dtype=torch.float64)


def least_squares(params):
    w, bias = params[0], params[1]
    return ((_A[:, :6] @ w.reshape(-1) + _A[:, 6:] @ params[2].reshape(-1) + bias - _b) ** 2).mean()


_data = load_breast_cancer()
_X = torch.tensor(_data.data, dtype=torch.float64)
_X = (_X - _X.mean(0)) / _X.std(0)
_y = torch.tensor(_data.target, dtype=torch.float64)


def logistic(params):
    w, bias = params
    logits = _X @ w.reshape(-1) + bias
    reg = 1e-3 * (w**2).sum()
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, _y) + reg


PROBLEMS = {
    "rosenbrock": (rosenbrock, [(2,), (3,), (1,), (2, 2)]),
    "least_squares": (least_squares, [(2, 3), (1,), (3,)]),
    "logistic": (logistic, [(30,), (1,)]),
}


def make_params(shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype) * 0.5) for s in shapes]


def closure_for(loss_fn, params, opt, counter):
    def closure():
        counter.append(1)
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    return closure


def without_scratch(state_dict: dict) -> dict:
    """``state_dict`` with the scratch space of the two-loop recursion (``al``: rewritten before
    it is read, and near convergence pure rounding noise) cut down to its shape, the only part of
    it in the contract: which entries are None."""
    state = {
        pid: {k: [x is None for x in v] if k == "al" else v for k, v in s.items()}
        for pid, s in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def assert_close_state(got: dict, want: dict, tol: float) -> None:
    """The same state dicts to within ``tol``, ``al`` aside (see :func:`without_scratch`)."""
    assert_same_state_dict(without_scratch(got), without_scratch(want), tol)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize(
    ("max_iter", "history_size"), [(10, 100), (4, 3)], ids=["long_history", "short_history"]
)
def test_trajectory_matches_torch(problem, line_search_fn, max_iter, history_size):
    loss_fn, shapes = PROBLEMS[problem]
    for num_shards in (1, 2, 3):
        mine, theirs = make_params(shapes), make_params(shapes)
        kwargs = dict(max_iter=max_iter, history_size=history_size, line_search_fn=line_search_fn)
        opt = shardopt.LBFGS(mine, num_shards=num_shards, **kwargs)
        ref = torch.optim.LBFGS(theirs, **kwargs)
        calls, ref_calls = [], []
        tol = 0.0 if num_shards == 1 else 1e-8
        for _ in range(2):
            loss = opt.step(closure_for(loss_fn, mine, opt, calls))
            ref_loss = ref.step(closure_for(loss_fn, theirs, ref, ref_calls))
            assert len(calls) == len(ref_calls), "closure must run exactly as often as in torch"
            torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)  # the first evaluation
            assert_same_tensors(mine, theirs, tol)
        assert_close_state(opt.state_dict(), ref.state_dict(), max(tol, 1e-6))
        opt.close()


def test_float32_converges_like_torch():
    loss_fn, shapes = PROBLEMS["logistic"]
    mine, theirs = make_params(shapes, torch.float32), make_params(shapes, torch.float32)
    global _X, _y
    x64, y64 = _X, _y
    _X, _y = _X.float(), _y.float()
    try:
        opt = shardopt.LBFGS(mine, line_search_fn="strong_wolfe", num_shards=2)
        ref = torch.optim.LBFGS(theirs, line_search_fn="strong_wolfe")
        for _ in range(4):
            opt.step(closure_for(loss_fn, mine, opt, []))
            ref.step(closure_for(loss_fn, theirs, ref, []))
        final, ref_final = loss_fn(mine).item(), loss_fn(theirs).item()
        start = loss_fn(make_params(shapes, torch.float32)).item()
        assert final < 0.2 * start
        assert final == pytest.approx(ref_final, rel=1e-3)
        opt.close()
    finally:
        _X, _y = x64, y64


@pytest.mark.parametrize("direction", ["torch_to_shardopt", "shardopt_to_torch"])
def test_state_dict_round_trip_mid_run(direction):
    loss_fn, shapes = PROBLEMS["rosenbrock"]
    kwargs = dict(line_search_fn="strong_wolfe", history_size=4, max_iter=6)
    control = make_params(shapes)
    control_opt = torch.optim.LBFGS(control, **kwargs)
    first = make_params(shapes)
    if direction == "torch_to_shardopt":
        first_opt = torch.optim.LBFGS(first, **kwargs)
    else:
        first_opt = shardopt.LBFGS(first, num_shards=2, **kwargs)
    for _ in range(2):
        first_opt.step(closure_for(loss_fn, first, first_opt, []))
        control_opt.step(closure_for(loss_fn, control, control_opt, []))
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    if direction == "torch_to_shardopt":
        second_opt = shardopt.LBFGS(second, num_shards=3, lr=0.3)
    else:
        second_opt = torch.optim.LBFGS(second, lr=0.3)
    second_opt.load_state_dict(copy.deepcopy(first_opt.state_dict()))
    if direction == "shardopt_to_torch":
        first_opt.close()
    assert second_opt.param_groups[0]["line_search_fn"] == "strong_wolfe"
    calls, control_calls = [], []
    for _ in range(3):
        second_opt.step(closure_for(loss_fn, second, second_opt, calls))
        control_opt.step(closure_for(loss_fn, control, control_opt, control_calls))
        assert len(calls) == len(control_calls)
        assert_same_tensors(second, control, 1e-8)
    if direction == "torch_to_shardopt":
        second_opt.close()


def test_state_view_and_errors():
    params = make_params([(3,), (2,)])
    opt = shardopt.LBFGS(params, num_shards=2)
    assert len(opt.state) == 0
    opt.step(closure_for(rosenbrock, params, opt, []))
    assert list(opt.state) == [params[0]]
    assert set(opt.state[params[0]]) >= {"d", "t", "old_dirs", "func_evals"}
    sd = opt.state_dict()

    bad = copy.deepcopy(sd)
    bad["state"][0]["d"] = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="elements"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][1] = {}
    with pytest.raises(ValueError, match="first parameter only"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    with pytest.raises(ValueError, match="parameter groups"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)
    with pytest.raises(TypeError, match="shardopt.LBFGS"):
        shardopt.ShardedOptimizer(params, torch.optim.LBFGS)
    with pytest.raises(ValueError, match="per-parameter options"):
        shardopt.LBFGS([{"params": params[:1]}, {"params": params[1:]}])
    # nothing above changed the state
    after = opt.state_dict()
    assert_close_state(after, sd, 0.0)
    opt.close()


def test_dropping_the_state_starts_afresh_as_torch():
    """``del opt.state[params[0]]`` (where torch's LBFGS keeps all of its state) drops the
    history, and the next step starts afresh as torch's does; other parameters have none."""
    loss_fn, shapes = PROBLEMS["least_squares"]
    mine, theirs = make_params(shapes), make_params(shapes)
    opt = shardopt.LBFGS(mine, num_shards=2, max_iter=4, history_size=3)
    ref = torch.optim.LBFGS(theirs, max_iter=4, history_size=3)
    try:
        for k in range(3):
            if k == 2:
                for o, ps in ((opt, mine), (ref, theirs)):
                    with pytest.raises(KeyError):
                        del o.state[ps[1]]
                    del o.state[ps[0]]
                assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
            opt.step(closure_for(loss_fn, mine, opt, []))
            ref.step(closure_for(loss_fn, theirs, ref, []))
            assert_same_tensors(mine, theirs, 1e-8)
        assert_close_state(opt.state_dict(), ref.state_dict(), 1e-6)
    finally:
        opt.close()


def test_checkpoint_round_trip_and_plain_torch(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    loss_fn, shapes = PROBLEMS["rosenbrock"]
    kwargs = dict(line_search_fn="strong_wolfe", history_size=4, max_iter=6)
    first = make_params(shapes)
    opt = shardopt.LBFGS(first, num_shards=2, **kwargs)
    for _ in range(2):
        opt.step(closure_for(loss_fn, first, opt, []))
    opt.save_checkpoint(tmp_path / "lbfgs")
    dcp_to_torch_save(tmp_path / "lbfgs", tmp_path / "opt.pt")
    runs = []
    for kind in ("shardopt", "torch"):
        params = [torch.nn.Parameter(p.detach().clone()) for p in first]
        if kind == "shardopt":
            other = shardopt.LBFGS(params, num_shards=3)
            other.load_checkpoint(tmp_path / "lbfgs")
        else:
            other = torch.optim.LBFGS(params)
            other.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        runs.append((params, other))
    for _ in range(2):
        opt.step(closure_for(loss_fn, first, opt, []))
        for params, other in runs:
            other.step(closure_for(loss_fn, params, other, []))
            assert_same_tensors(params, first, 1e-8)
    opt.close()
    runs[0][1].close()


def test_a_loaded_history_torch_could_not_step_on_from_is_refused(tmp_path):
    """A state dict or checkpoint whose history is longer than its group's ``history_size``
    (torch trims only at equality: it would grow two vectors every iteration from then on) or
    whose lists differ in length (torch fails mid-step) is refused, and nothing changes."""
    loss_fn, shapes = PROBLEMS["rosenbrock"]
    kwargs = dict(line_search_fn="strong_wolfe", history_size=5, max_iter=6)
    grown = make_params(shapes)
    source = shardopt.LBFGS(grown, num_shards=2, **kwargs)
    params = make_params(shapes)
    opt = shardopt.LBFGS(params, num_shards=2, **{**kwargs, "history_size": 3})
    try:
        for o, ps in ((source, grown), (opt, params)):
            o.step(closure_for(loss_fn, ps, o, []))
        source.param_groups[0]["history_size"] = 3  # torch allows it; its history stays at 5
        saved = source.state_dict()
        assert len(saved["state"][0]["old_dirs"]) == 5
        source.save_checkpoint(tmp_path / "long")
        before = opt.state_dict()
        with pytest.raises(ValueError, match="history of 5 entries; its group's history_size is 3"):
            opt.load_state_dict(saved)
        with pytest.raises(ValueError, match="history of 5 entries"):
            opt.load_checkpoint(tmp_path / "long")
        uneven = opt.state_dict()
        uneven["state"][0]["old_stps"] = uneven["state"][0]["old_stps"][:-1]
        with pytest.raises(ValueError, match="unequal lengths"):
            opt.load_state_dict(uneven)
        assert_close_state(opt.state_dict(), before, 0.0)
        assert opt.param_groups[0]["history_size"] == 3
        opt.step(closure_for(loss_fn, params, opt, []))  # steps on
    finally:
        source.close()
        opt.close()
