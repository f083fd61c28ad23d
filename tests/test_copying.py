"""copy.deepcopy, copy.copy and pickle of a sharded optimizer, against what torch.optim does.

torch's deep copy of ``(model, optimizer)`` is an independent pair; shardopt's is too, with new
shards. What cannot be copied faithfully (a shallow copy, a pickle, a shard group's member)
raises TypeError saying what to do instead, and leaves the original as it was.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import ray
import torch
from gateway_helpers import TOKEN, WARM_POOL
from helpers import assert_same_params, assert_same_state_dict, closure_step, make_model

import shardopt
from shardopt.core.errors import OptimizerClosedError
from shardopt.gateway import serve


def _pair(factory, torch_class, seed=0, **hyper):
    """A model with a sharded optimizer, and a twin model with torch's, an lr scheduler on
    each (so the groups carry ``initial_lr``), both stepped twice."""
    model, twin = make_model(seed), make_model(seed)
    opt, want = factory(model.parameters()), torch_class(twin.parameters(), **hyper)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, want)]
    for _ in range(2):
        x = torch.randn(4, 6)
        closure_step(model, opt, x)
        closure_step(twin, want, x)
        for sched in scheds:
            sched.step()
    return model, opt, twin, want


def _run_both(pairs, steps=2):
    for _ in range(steps):
        x = torch.randn(4, 6)
        for model, opt in pairs:
            closure_step(model, opt, x)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = serve(
        "127.0.0.1",
        0,
        tokens=[TOKEN],
        checkpoint_dir=str(tmp_path_factory.mktemp("gw")),
        limits=WARM_POOL,
    )
    yield {"address": f"127.0.0.1:{gw.port}", "token": TOKEN}
    gw.stop(1)


ADAM = (torch.optim.Adam, {"lr": 0.05, "fused": True})
LBFGS = (torch.optim.LBFGS, {"lr": 0.5, "history_size": 4})
CASES = {
    "ray": (lambda ps, _: shardopt.Adam(ps, **ADAM[1], num_shards=2, split=False), *ADAM),
    "ray-lbfgs": (lambda ps, _: shardopt.LBFGS(ps, **LBFGS[1], num_shards=1), *LBFGS),
    "gateway": (lambda ps, gw: shardopt.Adam(ps, **ADAM[1], num_shards=2, **gw), *ADAM),
    "gateway-lbfgs": (lambda ps, gw: shardopt.LBFGS(ps, **LBFGS[1], num_shards=1, **gw), *LBFGS),
}


@pytest.mark.parametrize("where", list(CASES))
def test_deepcopy_makes_an_independent_optimizer_as_torchs_does(where, request):
    """``copy.deepcopy((model, opt))``: the copy steps the copied model's parameters on shards
    of its own (a session of its own), from the original's state and param groups (the
    scheduler's lr included), and the two go on apart, each step for step with torch's
    copies."""
    make, torch_class, hyper = CASES[where]
    remote = request.getfixturevalue("gateway") if where.startswith("gateway") else None
    factory = lambda ps: make(ps, remote)  # noqa: E731
    torch.manual_seed(0)
    model, opt, twin, want = _pair(factory, torch_class, **hyper)
    copies = []
    try:
        model_copy, opt_copy = copy.deepcopy((model, opt))
        copies.append(opt_copy)
        if (
            torch_class is torch.optim.LBFGS
        ):  # torch's own deep copy of LBFGS loses its _params: built anew
            twin_copy = copy.deepcopy(twin)
            want_copy = torch_class(twin_copy.parameters(), **hyper)
            want_copy.load_state_dict(copy.deepcopy(want.state_dict()))  # torch aliases it
        else:
            twin_copy, want_copy = copy.deepcopy((twin, want))
        assert type(opt_copy) is type(opt) and opt_copy.num_shards == opt.num_shards
        copied = list(model_copy.parameters())
        assert [p for g in opt_copy.param_groups for p in g["params"]] == copied  # the memo's
        assert not any(p is q for p, q in zip(copied, model.parameters()))
        assert opt_copy.backend is not opt.backend
        lr, initial = want.param_groups[0]["lr"], want.param_groups[0]["initial_lr"]
        assert lr == initial / 4 and opt.param_groups[0]["lr"] == lr  # after two halvings
        assert (opt_copy.param_groups[0]["lr"], opt_copy.param_groups[0]["initial_lr"]) == (
            lr, initial,
        )  # fmt: skip
        assert_same_state_dict(opt_copy.state_dict(), want_copy.state_dict())
        # apart from here on: different inputs for the originals and the copies
        _run_both([(model, opt), (twin, want)])
        torch.manual_seed(1)
        _run_both([(model_copy, opt_copy), (twin_copy, want_copy)], steps=3)
        assert_same_params(model, twin)
        assert_same_params(model_copy, twin_copy)
        assert_same_state_dict(opt.state_dict(), want.state_dict())
        assert_same_state_dict(opt_copy.state_dict(), want_copy.state_dict())
        assert not torch.equal(next(model.parameters()), next(model_copy.parameters()))
        # a copy alone (its own copies of the parameters), then the original closed: the copy
        # goes on
        alone = copy.deepcopy(opt)
        copies.append(alone)
        assert not any(p is q for p, q in zip(alone.param_groups[0]["params"], copied))
        opt.close()
        _run_both([(model_copy, opt_copy), (twin_copy, want_copy)], steps=1)
        assert_same_params(model_copy, twin_copy)
        with pytest.raises(OptimizerClosedError):
            copy.deepcopy(opt)
    finally:
        for o in (opt, *copies):
            o.close()


def test_shallow_copies_and_pickles_are_refused_and_change_nothing(tmp_path):
    """A shallow copy would drive the same shards; a pickle (``pickle``, ``torch.save`` of the
    object, handing it to a Ray task) would carry no state, or a token, to wherever it is
    loaded: each is a TypeError that says what to do instead, and the optimizer steps on."""
    torch.manual_seed(0)
    model, opt, twin, want = _pair(
        lambda ps: shardopt.SGD(ps, lr=0.1, momentum=0.9, num_shards=2),
        torch.optim.SGD, lr=0.1, momentum=0.9,
    )  # fmt: skip
    try:
        with pytest.raises(TypeError, match="use copy.deepcopy"):
            copy.copy(opt)
        with pytest.raises(TypeError, match=r"cannot be pickled.*opt.state_dict\(\)"):
            pickle.dumps(opt)
        with pytest.raises(TypeError, match="cannot be pickled"):
            torch.save({"model": model, "optimizer": opt}, tmp_path / "whole.pt")

        @ray.remote
        def use(optimizer):
            return optimizer.param_groups[0]["lr"]

        with pytest.raises(TypeError, match="cannot be pickled"):
            use.remote(opt)
        torch.save(opt.state_dict(), tmp_path / "state.pt")  # what travels instead
        reloaded = torch.load(tmp_path / "state.pt", weights_only=True)
        assert_same_state_dict(reloaded, want.state_dict())
        _run_both([(model, opt), (twin, want)])
        assert_same_params(model, twin)
    finally:
        opt.close()


@pytest.mark.parametrize("where", ["ray", "gateway"])
def test_a_shard_group_member_cannot_be_copied(where, request):
    """A copy would be a second process's optimizer claiming the same rank: refused, in the
    cluster and through a gateway, and the member steps on."""
    remote = request.getfixturevalue("gateway") if where == "gateway" else {}
    model = make_model(0)
    opt = shardopt.SGD(model.parameters(), lr=0.1, num_shards=1, group=f"copy-me-{where}",
                       world_size=1, rank=0, **remote)  # fmt: skip
    try:
        with pytest.raises(TypeError, match=r"shard group's member .* rank 0\) cannot be copied"):
            copy.deepcopy(opt)
        closure_step(model, opt, torch.randn(4, 6))  # still a member, stepping
    finally:
        opt.close()


def test_copies_and_pickles_of_the_state_are_snapshots_as_torchs():
    """``copy.deepcopy(opt.state)`` and a pickle of it are torch's kind of snapshot (a
    ``defaultdict`` of the parameters' states, fresh tensors), not a live view that later steps
    would change; a deep copy with the model keys it by the model's copies."""
    torch.manual_seed(0)
    model, opt, twin, want = _pair(
        lambda ps: shardopt.AdamW(ps, lr=0.05, fused=True, num_shards=2),
        torch.optim.AdamW, lr=0.05, fused=True,
    )  # fmt: skip
    try:
        saved, reference = copy.deepcopy(opt.state), copy.deepcopy(want.state)
        pickled = pickle.loads(pickle.dumps(opt.state))
        model_copy, state_copy = copy.deepcopy((model, opt.state))
        for got in (saved, pickled, state_copy):
            assert type(got) is type(reference) and got.default_factory is dict
            assert [p.shape for p in got] == [p.shape for p in reference]
            assert all(torch.equal(a, b) for a, b in zip(got, reference))  # the keys: params
            assert_same_state_dict(
                {"state": dict(enumerate(got.values())), "param_groups": []},
                {"state": dict(enumerate(reference.values())), "param_groups": []},
            )
        assert list(state_copy) == list(model_copy.parameters())
        assert not any(p is q for p, q in zip(saved, model.parameters()))
        _run_both([(model, opt), (twin, want)])
        assert_same_state_dict(  # the snapshots stayed as they were; the state moved on
            {"state": dict(enumerate(saved.values())), "param_groups": []},
            {"state": dict(enumerate(reference.values())), "param_groups": []},
        )
        assert not torch.equal(next(iter(opt.state.values()))["exp_avg"],
                               next(iter(saved.values()))["exp_avg"])  # fmt: skip
        assert_same_state_dict(opt.state_dict(), want.state_dict())
    finally:
        opt.close()
