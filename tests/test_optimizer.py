"""Integration tests of the proxy on real Ray shards: the torch.optim contract beyond plain parity.

Param groups, lr schedulers, add_param_group, zero_grad, grad None, closures, hooks, GradScaler,
the state view, state_dict round trips with torch in both directions and across shard counts,
bad input rejected with torch's error types and nothing changed.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import assert_same_params, assert_same_state_dict, make_model, train_step
from reference import run_as_shards
from torch import nn

import shardopt
from shardopt import OptimizerClosedError, ShardedOptimizer


@pytest.fixture(params=[True, False], ids=["shm", "object_store"])
def pair(request):
    """A model under shardopt (2 shards) and an identical one under torch.optim.AdamW.

    Runs each test over both data paths: shared memory and Ray's object store.
    """
    sharded, reference = make_model(), make_model()
    opt = shardopt.AdamW(
        sharded.parameters(), lr=1e-2, weight_decay=0.1, num_shards=2, shared_memory=request.param
    )
    assert opt.uses_shared_memory == [request.param] * 2
    ref = run_as_shards(torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1))
    yield sharded, opt, reference, ref
    opt.close()


def test_is_a_torch_optimizer(pair):
    model, opt, _, _ = pair
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, ShardedOptimizer)
    assert opt.defaults == plain.defaults
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in plain.param_groups
    ]
    assert sum(len(s.state_ids) for s in opt.shard_status()) == 0
    assert "AdamW x2 shards" in repr(opt)


def test_adam_shards_run_fused_unless_told_otherwise():
    """Left unset, Adam/AdamW shards run torch's fused kernel: torch's numbers to rounding.

    ``foreach`` or ``fused=False`` keeps them on exactly torch's default path.
    """
    models = [make_model() for _ in range(4)]
    auto = shardopt.AdamW(models[0].parameters(), lr=1e-2, num_shards=2)
    exact = shardopt.AdamW(models[1].parameters(), lr=1e-2, fused=False, num_shards=2)
    default = torch.optim.AdamW(models[2].parameters(), lr=1e-2)
    unfused = torch.optim.AdamW(models[3].parameters(), lr=1e-2, fused=False)
    assert [s.fused for s in auto.shard_status()] == [True, True]
    assert [s.fused for s in exact.shard_status()] == [False, False]
    assert auto.param_groups[0]["fused"] is None  # the user's choice, as torch shows it
    for k in range(5):
        for m, o in zip(models, (auto, exact, default, unfused)):
            train_step(m, o, k)
    for a, b in zip(models[0].parameters(), models[2].parameters()):
        torch.testing.assert_close(a, b)  # torch's default tolerance, as torch tests fused
    assert_same_params(models[1], models[3])
    got, want = auto.state_dict(), default.state_dict()
    assert got["param_groups"] == want["param_groups"]
    torch.testing.assert_close(got["state"], want["state"])
    auto.close()
    exact.close()


def test_user_tensors_updated_in_place(pair):
    model, opt, reference, ref = pair
    before = [p.data_ptr() for p in model.parameters()]
    for k in range(3):
        torch.testing.assert_close(train_step(model, opt, k), train_step(reference, ref, k))
    assert [p.data_ptr() for p in model.parameters()] == before
    assert_same_params(model, reference)


def test_param_groups_base_classifier():
    """The torch docs' per-group options example."""

    def build():
        torch.manual_seed(1)
        return nn.ModuleDict({"base": nn.Linear(6, 8), "classifier": nn.Linear(8, 3)})

    m1, m2 = build(), build()

    def groups(m):
        return [
            {"params": m["base"].parameters()},
            {"params": m["classifier"].parameters(), "lr": 1e-3, "momentum": 0.5},
        ]

    opt = shardopt.SGD(groups(m1), lr=1e-2, momentum=0.9, num_shards=3)
    ref = torch.optim.SGD(groups(m2), lr=1e-2, momentum=0.9)
    for k in range(4):
        for m, o in ((m1, opt), (m2, ref)):
            o.zero_grad()
            m["classifier"](
                torch.relu(m["base"](torch.randn(5, 6, generator=torch.Generator().manual_seed(k))))
            ).sum().backward()
            o.step()
        assert_same_params(m1, m2)
    assert_same_state_dict(opt.state_dict(), ref.state_dict())
    opt.close()


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 1.0 / (1 + epoch)),
    ],
    ids=["StepLR", "OneCycleLR", "LambdaLR"],
)
def test_lr_schedulers(pair, make_scheduler):
    model, opt, reference, ref = pair
    sched, ref_sched = make_scheduler(opt), make_scheduler(ref)
    for k in range(6):
        train_step(model, opt, k)
        train_step(reference, ref, k)
        sched.step()
        ref_sched.step()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        assert opt.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
        assert_same_params(model, reference)
    assert_same_state_dict(opt.state_dict(), ref.state_dict())


def test_add_param_group_mid_training():
    m1, m2 = make_model(), make_model()
    layers1, layers2 = list(m1), list(m2)
    opt = shardopt.Adam(layers1[0].parameters(), lr=1e-2, num_shards=2)
    ref = run_as_shards(torch.optim.Adam(layers2[0].parameters(), lr=1e-2))
    for k in range(5):
        if k == 2:
            opt.add_param_group(
                {
                    "params": list(layers1[2].parameters()) + list(layers1[4].parameters()),
                    "lr": 3e-3,
                }
            )
            ref.add_param_group(
                {
                    "params": list(layers2[2].parameters()) + list(layers2[4].parameters()),
                    "lr": 3e-3,
                }
            )
        train_step(m1, opt, k)
        train_step(m2, ref, k)
        assert_same_params(m1, m2)
    assert opt.plan.num_shards == 2 and len(opt.plan.owners) == 6
    assert_same_state_dict(opt.state_dict(), ref.state_dict())
    opt.close()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_both_ways(pair, set_to_none):
    model, opt, reference, ref = pair
    train_step(model, opt, 0)
    train_step(reference, ref, 0)
    opt.zero_grad(set_to_none=set_to_none)
    ref.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert (p.grad is None) if set_to_none else torch.all(p.grad == 0)
    opt.step()  # zero (not None) gradients still step, as in torch: Adam moves on momentum
    ref.step()
    assert_same_params(model, reference)


def test_grad_none_params_are_skipped(pair):
    model, opt, reference, ref = pair
    for k in range(3):
        for m, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            m(torch.randn(4, 6, generator=torch.Generator().manual_seed(k))).sum().backward()
            m[2].weight.grad = None  # frozen this step
            if k == 0:
                m[4].bias.grad = None
            o.step()
        assert_same_params(model, reference)
    assert_same_state_dict(opt.state_dict(), ref.state_dict())
    assert list(opt.state_dict()["state"]) == list(ref.state_dict()["state"])


def test_closure_runs_once_on_client_and_returns_loss(pair):
    model, opt, reference, ref = pair
    calls = []

    def closure_for(m, o):
        def closure():
            calls.append(1)
            o.zero_grad()
            loss = m(torch.ones(3, 6)).pow(2).sum()
            loss.backward()
            return loss

        return closure

    loss = opt.step(closure_for(model, opt))
    ref_loss = ref.step(closure_for(reference, ref))
    assert len(calls) == 2
    torch.testing.assert_close(loss, ref_loss)
    assert loss.requires_grad == ref_loss.requires_grad
    assert opt.step() is None
    ref.step()
    assert_same_params(model, reference)


def test_step_hooks_run(pair):
    model, opt, _, _ = pair
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    train_step(model, opt, 0)
    assert seen == ["pre", "post"]


def test_global_step_hooks_see_only_the_users_steps(pair):
    # torch.optim.optimizer's process-wide hooks (profilers, step counters) run for every
    # optimizer's step: shardopt's checks of a step's inputs must not show up there as steps
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    model, opt, _, _ = pair
    seen = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(("post", o))),
    ]
    try:
        for k in range(2):
            train_step(model, opt, k)
    finally:
        for handle in handles:
            handle.remove()
    assert [(when, o is opt) for when, o in seen] == [("pre", True), ("post", True)] * 2


def test_grad_scaler(pair):
    model, opt, reference, ref = pair
    for m, o in ((model, opt), (reference, ref)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for k in range(3):
            o.zero_grad()
            scaler.scale(
                m(torch.randn(4, 6, generator=torch.Generator().manual_seed(k))).sum()
            ).backward()
            scaler.step(o)
            scaler.update()
    assert_same_params(model, reference)


def test_state_view(pair):
    model, opt, reference, ref = pair
    assert len(opt.state) == 0 and not opt.state
    train_step(model, opt, 0)
    train_step(reference, ref, 0)
    assert len(opt.state) == len(ref.state) == 6
    params, ref_params = list(model.parameters()), list(reference.parameters())
    assert list(opt.state) == params
    for p, rp in zip(params, ref_params):
        assert p in opt.state
        got, want = opt.state[p], ref.state[rp]
        assert list(got) == list(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    # writing a parameter's state goes to its shard (Lightning moves state like this)
    new = {k: v.clone() for k, v in opt.state[params[0]].items()}
    new["exp_avg"].fill_(0.5)
    opt.state[params[0]] = new
    torch.testing.assert_close(
        opt.state_dict()["state"][0]["exp_avg"], torch.full_like(params[0], 0.5)
    )
    with pytest.raises(KeyError):
        opt.state[torch.zeros(1)]


def test_state_changed_in_place_reaches_the_shards_as_in_torch(pair):
    """``opt.state[p]`` is torch's state itself: a moment zeroed in place, one scaled, a view of
    one filled, ``step`` replaced reach the shards (a read shows them; the next steps are
    torch's, step for step). A dict read before a step and changed after it is not applied
    (the shards moved on without it) and the next use of the optimizer says so."""
    model, opt, reference, ref = pair
    train_step(model, opt, 0)
    train_step(reference, ref, 0)
    params, ref_params = list(model.parameters()), list(reference.parameters())
    for o, ps in ((opt, params), (ref, ref_params)):
        o.state[ps[0]]["exp_avg"].zero_()
        state = o.state[ps[1]]
        state["exp_avg_sq"].mul_(2.0)
        state["step"] = torch.tensor(10.0)
        o.state[ps[2]]["exp_avg"][0].fill_(1.0)  # through a view: the same version counter
    assert not opt.state[params[0]]["exp_avg"].any()  # read back before any step
    assert float(opt.state[params[1]]["step"]) == 10.0
    for k in (1, 2):
        train_step(model, opt, k)
        train_step(reference, ref, k)
        assert_same_params(model, reference)
    assert_same_state_dict(opt.state_dict(), ref.state_dict())
    stale = opt.state[params[3]]
    train_step(model, opt, 3)
    train_step(reference, ref, 3)
    stale["exp_avg"].zero_()  # in torch this would change the live state; here it cannot
    with pytest.warns(RuntimeWarning, match=r"ids \[3\] was changed in place .* not applied"):
        train_step(model, opt, 4)
    train_step(reference, ref, 4)
    assert_same_params(model, reference)  # as torch without that change
    assert_same_state_dict(opt.state_dict(), ref.state_dict())


def test_assigning_the_state_resets_it_as_in_torch(pair):
    """Code resets a torch optimizer by assigning its state: ``opt.state = defaultdict(dict)``,
    ``opt.__setstate__({"state": defaultdict(dict)})``, or a kept part of it (or by
    ``opt.state.clear()``, which held already, one parameter at a time). The shards kept
    their state (only the proxy's attribute was replaced, and ``opt.state`` then showed none):
    the next steps went on from the old moments, silently. Now the assignment replaces the
    shards' state, step for step as torch; a bad one is refused and changes nothing."""
    from collections import defaultdict

    model, opt, reference, ref = pair
    params, ref_params = list(model.parameters()), list(reference.parameters())
    both = ((model, opt, params), (reference, ref, ref_params))
    for k in range(2):
        train_step(model, opt, k)
        train_step(reference, ref, k)
    kept = [{k: v.clone() for k, v in o.state[ps[1]].items()} for _, o, ps in both]
    for _, o, _ in both:
        o.state = defaultdict(dict)
    assert len(opt.state) == 0 and not opt.state_dict()["state"]
    for k in (2, 3):
        train_step(model, opt, k)
        train_step(reference, ref, k)
        assert_same_params(model, reference)
    assert_same_state_dict(opt.state_dict(), ref.state_dict())
    for _, o, _ in both:
        o.__setstate__({"state": defaultdict(dict)})
    assert len(opt.state) == 0
    for (_, o, ps), state in zip(both, kept):
        o.state = defaultdict(dict, {ps[1]: state})  # one parameter's older state, kept
    assert list(opt.state) == [params[1]]
    for k in (4, 5):
        train_step(model, opt, k)
        train_step(reference, ref, k)
        assert_same_params(model, reference)
    assert_same_state_dict(opt.state_dict(), ref.state_dict())
    before = opt.state_dict()
    for bad, error in (
        ({params[0]: {}, torch.zeros(1): {}}, KeyError),  # not a parameter of this optimizer
        ({params[0]: 3.0}, TypeError),
        ([params[0]], TypeError),
    ):
        with pytest.raises(error):
            opt.state = bad
        assert_same_state_dict(opt.state_dict(), before)
    opt.state = opt.state  # itself: nothing changes
    assert_same_state_dict(opt.state_dict(), before)
    for _, o, _ in both:
        o.state.clear()  # the other way to reset: one load, not one per parameter
    assert len(opt.state) == 0
    train_step(model, opt, 6)
    train_step(reference, ref, 6)
    assert_same_params(model, reference)
    assert_same_state_dict(opt.state_dict(), ref.state_dict())


def test_user_changes_to_params_reach_the_shards(pair):
    model, opt, reference, ref = pair
    train_step(model, opt, 0)
    train_step(reference, ref, 0)
    fresh = make_model(seed=7).state_dict()
    model.load_state_dict(fresh)  # in-place copy_ under no_grad: versioned
    reference.load_state_dict(fresh)
    with torch.no_grad():
        model[0].weight.mul_(0.5)
        reference[0].weight.mul_(0.5)
    model[2].bias.data.add_(1.0)  # .data writes are not versioned: push_params covers them
    reference[2].bias.data.add_(1.0)
    opt.push_params()
    for k in range(1, 3):
        train_step(model, opt, k)
        train_step(reference, ref, k)
    assert_same_params(model, reference)


def test_state_dict_equals_torch_and_survives_weights_only_load(pair):
    model, opt, reference, ref = pair
    for k in range(3):
        train_step(model, opt, k)
        train_step(reference, ref, k)
    sd = opt.state_dict()
    assert_same_state_dict(sd, ref.state_dict())
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_same_state_dict(loaded, ref.state_dict())


def test_a_state_dict_round_trip_changes_nothing_and_any_change_is_loaded(pair):
    """``load_state_dict(state_dict())`` (HF Trainer and Accelerate run it on every new
    optimizer) leaves the shards as they are; a state dict read before a step, or with a tensor
    changed in place or replaced, is loaded as given."""
    model, opt, _, _ = pair
    for k in range(2):
        train_step(model, opt, k)
    first = opt.state_dict()
    opt.load_state_dict(first)  # a round trip
    assert_same_state_dict(opt.state_dict(), first)
    later = copy.deepcopy(opt.state_dict())
    train_step(model, opt, 2)
    opt.load_state_dict(first)  # read before that step: the shards go back to it
    assert_same_state_dict(opt.state_dict(), first)
    edited = opt.state_dict()
    edited["state"][0]["exp_avg"].zero_()  # in place: its version counter moves
    edited["state"][1]["exp_avg_sq"] = torch.ones_like(edited["state"][1]["exp_avg_sq"])
    opt.load_state_dict(edited)
    got = opt.state_dict()["state"]
    assert torch.equal(got[0]["exp_avg"], torch.zeros_like(got[0]["exp_avg"]))
    assert torch.equal(got[1]["exp_avg_sq"], torch.ones_like(got[1]["exp_avg_sq"]))
    opt.load_state_dict(later)
    assert_same_state_dict(opt.state_dict(), later)


def test_round_trip_torch_to_shardopt_and_back():
    torch_model, sharded_model, control = make_model(), make_model(), make_model()
    torch_opt = run_as_shards(torch.optim.Adam(torch_model.parameters(), lr=1e-2, amsgrad=True))
    control_opt = run_as_shards(torch.optim.Adam(control.parameters(), lr=1e-2, amsgrad=True))
    for k in range(3):
        train_step(torch_model, torch_opt, k)
        train_step(control, control_opt, k)
    # torch -> shardopt
    sharded_model.load_state_dict(torch_model.state_dict())
    opt = shardopt.Adam(sharded_model.parameters(), lr=0.5, num_shards=3)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["amsgrad"] is True
    for k in range(3, 6):
        train_step(sharded_model, opt, k)
        train_step(control, control_opt, k)
        assert_same_params(sharded_model, control)
    # shardopt -> torch
    back_model = make_model(seed=3)
    back_model.load_state_dict(sharded_model.state_dict())
    back = run_as_shards(torch.optim.Adam(back_model.parameters()))
    back.load_state_dict(opt.state_dict())
    for k in range(6, 9):
        train_step(back_model, back, k)
        train_step(control, control_opt, k)
        assert_same_params(back_model, control)
    opt.close()


def test_reshard_two_to_three_shards():
    m2, m3, control = make_model(), make_model(), make_model()
    opt2 = shardopt.RMSprop(m2.parameters(), lr=1e-2, momentum=0.9, centered=True, num_shards=2)
    ctrl = torch.optim.RMSprop(control.parameters(), lr=1e-2, momentum=0.9, centered=True)
    for k in range(3):
        train_step(m2, opt2, k)
        train_step(control, ctrl, k)
    m3.load_state_dict(m2.state_dict())
    opt3 = shardopt.RMSprop(m3.parameters(), num_shards=3)
    opt3.load_state_dict(opt2.state_dict())
    assert opt3.plan.owners != opt2.plan.owners
    assert_same_state_dict(opt3.state_dict(), ctrl.state_dict())
    for k in range(3, 6):
        train_step(m3, opt3, k)
        train_step(control, ctrl, k)
        assert_same_params(m3, control)
    opt2.close()
    opt3.close()


def test_named_parameters_keep_param_names():
    m1, m2 = make_model(), make_model()
    opt = shardopt.SGD(m1.named_parameters(), lr=0.1, momentum=0.9, num_shards=2)
    ref = torch.optim.SGD(m2.named_parameters(), lr=0.1, momentum=0.9)
    train_step(m1, opt, 0)
    train_step(m2, ref, 0)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in m1.named_parameters()]
    assert_same_state_dict(sd, ref.state_dict())
    opt.close()


# ----- bad input: torch's error types, and nothing changes -----------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (shardopt.Adam, {"lr": -1.0}, "Invalid learning rate"),
        (shardopt.Adam, {"betas": (1.5, 0.9)}, "Invalid beta parameter"),
        (shardopt.SGD, {"lr": 0.1, "momentum": -0.5}, "Invalid momentum value"),
        (shardopt.SGD, {"lr": 0.1, "nesterov": True}, "Nesterov momentum requires"),
        (shardopt.RMSprop, {"eps": -1e-3}, "Invalid epsilon value"),
    ],
)
def test_invalid_hyperparameters_raise_like_torch(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(make_model().parameters(), num_shards=2, **kwargs)


def test_constructor_errors():
    params = list(make_model().parameters())
    with pytest.raises(TypeError, match="optimizer_class must be"):
        ShardedOptimizer(params, nn.Linear)
    with pytest.raises(ValueError, match="num_shards"):
        shardopt.Adam(params, num_shards=0)
    with pytest.raises(TypeError, match="iterable of Tensors"):
        shardopt.Adam(params[0])
    with pytest.raises(ValueError, match="empty parameter list"):
        shardopt.Adam([])
    with pytest.raises(TypeError):
        shardopt.Adam(params, 1e-3, (0.9, 0.99), 1e-8, 0.0, False, 7)  # too many positionals
    with pytest.raises(TypeError, match="shardopt.LBFGS"):
        ShardedOptimizer(params, torch.optim.LBFGS)
    assert shardopt.SGD(params, 0.5, num_shards=1).param_groups[0]["lr"] == 0.5


def test_differentiable_warns_that_no_graph_crosses_the_shards():
    with pytest.warns(UserWarning, match="no autograd graph"):
        opt = shardopt.SGD(make_model().parameters(), lr=0.1, differentiable=True, num_shards=1)
    opt.close()


def test_duplicate_parameters_across_groups():
    m = make_model()
    with pytest.raises(ValueError, match="more than one parameter group"):
        shardopt.SGD([{"params": m[0].parameters()}, {"params": [m[0].weight]}], lr=0.1)
    opt = shardopt.SGD(m[0].parameters(), lr=0.1, num_shards=2)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [m[0].bias]})
    assert len(opt.param_groups) == 1 and len(opt.plan.owners) == 2
    opt.close()


def _steps_like_untouched(model, opt, reference, ref, first_step):
    for k in range(first_step, first_step + 2):
        train_step(model, opt, k)
        train_step(reference, ref, k)
    assert_same_params(model, reference)
    assert_same_state_dict(opt.state_dict(), ref.state_dict())


def test_rejected_load_state_dict_changes_nothing(pair):
    model, opt, reference, ref = pair
    for k in range(2):
        train_step(model, opt, k)
        train_step(reference, ref, k)
    good = opt.state_dict()

    wrong_groups = copy.deepcopy(good)
    wrong_groups["param_groups"].append(dict(wrong_groups["param_groups"][0], params=[]))
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(wrong_groups)

    wrong_size = copy.deepcopy(good)
    wrong_size["param_groups"][0]["params"] = wrong_size["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="doesn't match the size"):
        opt.load_state_dict(wrong_size)

    # state from a model with other shapes: the last shard rejects it, so no shard applies it
    other = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3))
    other_opt = run_as_shards(torch.optim.AdamW(other.parameters(), lr=0.5))
    other(torch.randn(2, 6)).sum().backward()
    other_opt.step()
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other_opt.state_dict())

    unknown_id = copy.deepcopy(good)
    unknown_id["state"][99] = unknown_id["state"][0]
    with pytest.raises(ValueError, match="parameter id 99"):
        opt.load_state_dict(unknown_id)

    not_weights_only = copy.deepcopy(good)
    not_weights_only["state"][0]["extra"] = object()
    with pytest.raises(TypeError):
        opt.load_state_dict(not_weights_only)

    assert opt.param_groups[0]["lr"] == 1e-2
    _steps_like_untouched(model, opt, reference, ref, first_step=2)


class SubclassedAdamW(torch.optim.AdamW):
    """A user's subclass of a torch algorithm (it runs torch's kernels: checked as AdamW)."""


@pytest.mark.parametrize("subclass", [False, True], ids=["AdamW", "subclass"])
@pytest.mark.parametrize("how", ["load_state_dict", "state[p] ="])
def test_state_a_fused_kernel_would_overrun_is_refused(how, subclass):
    """torch's fused CPU kernels (the shards' default) do not check the state's shapes: torch
    2.13's ``Adam(fused=True)`` stepping a (300, 300) parameter whose loaded ``exp_avg`` is
    (2, 3) writes past it and aborts. A shardopt optimizer with no state yet (nothing to compare
    a load with) took such state, and its next step killed the shard host (``malloc():
    unaligned fastbin chunk detected``), whatever else it held. Every parameter's state is now
    checked as a shard takes it: shapes, dtypes and one-number scalars, as torch keeps them."""
    model, reference = make_model(), make_model()
    if subclass:
        opt = ShardedOptimizer(model.parameters(), SubclassedAdamW, lr=1e-2, num_shards=2)
    else:
        opt = shardopt.AdamW(model.parameters(), lr=1e-2, num_shards=2)
    ref = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    try:
        train_step(reference, ref, 0)
        good = ref.state_dict()
        first = list(model.parameters())[0]
        bad_states = [
            ("exp_avg", torch.zeros(2, 3), r"'exp_avg' of shape \(2, 3\)"),
            ("exp_avg_sq", torch.zeros(first.shape[::-1]), r"expected \(9, 6\)"),
            ("step", torch.ones(5), "'step' with 5 elements"),
        ]
        if how != "load_state_dict":  # (torch's load casts floating state to the parameter's)
            bad_states.append(("exp_avg", torch.zeros(first.shape, dtype=torch.int8), "int8"))
        for key, value, match in bad_states:
            bad = copy.deepcopy(good)
            bad["state"][0][key] = value
            with pytest.raises(ValueError, match=match):
                if how == "load_state_dict":
                    opt.load_state_dict(bad)
                else:
                    opt.state[first] = bad["state"][0]
            assert len(opt.state) == 0 and not opt.state_dict()["state"]
        model.load_state_dict(reference.state_dict())  # (reaches the shards at the next step)
        opt.load_state_dict(good)  # the shards are alive and take what is right
        train_step(model, opt, 1)
        train_step(reference, ref, 1)
        if not subclass:  # (not fused by default: torch's numbers to rounding)
            assert_same_params(model, reference)
            assert_same_state_dict(opt.state_dict(), ref.state_dict())
    finally:
        opt.close()


def test_expanded_state_is_laid_out_as_its_parameter():
    """An expanded state tensor (stride 0, which ``torch.save`` keeps with its one-element
    storage) has the right shape, and torch's fused kernel walks it as if it were dense: torch's
    own fused ``AdamW`` writes past that storage and aborts. shardopt's transports deliver it
    dense and the shard lays state out as its parameter whatever the path (a pin, not a fix):
    the load gives torch's numbers, as with the dense values."""
    import io

    model, reference = make_model(), make_model()
    opt = shardopt.AdamW(model.parameters(), lr=1e-2, num_shards=2)
    ref = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    try:
        train_step(reference, ref, 0)
        model.load_state_dict(reference.state_dict())
        expanded = copy.deepcopy(ref.state_dict())
        for state in expanded["state"].values():
            state["exp_avg"] = torch.full((1,), 0.01).expand(state["exp_avg"].shape)
        saved = io.BytesIO()
        torch.save(expanded, saved)
        saved.seek(0)
        loaded = torch.load(saved, weights_only=True)
        assert loaded["state"][0]["exp_avg"].stride() == (0, 0)  # a file keeps it expanded
        opt.load_state_dict(loaded)
        for state in ref.state.values():
            state["exp_avg"].fill_(0.01)
        for k in (1, 2):
            train_step(model, opt, k)
            train_step(reference, ref, k)
            assert_same_params(model, reference)
        assert_same_state_dict(opt.state_dict(), ref.state_dict())
    finally:
        opt.close()


def test_adafactor_factored_state_is_checked_too():
    model = nn.Linear(6, 4)
    opt = shardopt.Adafactor(model.parameters(), num_shards=1)
    ref = torch.optim.Adafactor(nn.Linear(6, 4).parameters())
    try:
        ref.param_groups[0]["params"][0].grad = torch.ones(4, 6)
        ref.param_groups[0]["params"][1].grad = torch.ones(4)
        ref.step()
        bad = copy.deepcopy(ref.state_dict())
        bad["state"][0]["row_var"] = torch.zeros(1, 6)  # torch's is (4, 1)
        with pytest.raises(ValueError, match=r"'row_var' of shape \(1, 6\).*expected \(4, 1\)"):
            opt.load_state_dict(bad)
        opt.load_state_dict(ref.state_dict())
        assert_same_state_dict(opt.state_dict(), ref.state_dict())
    finally:
        opt.close()


def test_closed_optimizer_refuses_work():
    m = make_model()
    with shardopt.SGD(m.parameters(), lr=0.1, num_shards=2) as opt:
        train_step(m, opt, 0)
    with pytest.raises(OptimizerClosedError):
        opt.step()
    with pytest.raises(OptimizerClosedError):
        opt.state_dict()
    opt.close()  # idempotent


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "object_store"])
def test_overlap_ships_gradients_during_backward(shared_memory):
    """overlap=True: same numbers, also when grads change after backward (scaler, clipping)."""
    models = [make_model() for _ in range(2)]
    opt = shardopt.AdamW(
        models[0].parameters(), lr=1e-2, num_shards=2, overlap=True, shared_memory=shared_memory
    )
    ref = run_as_shards(torch.optim.AdamW(models[1].parameters(), lr=1e-2))
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    for k in range(4):
        for m, o, scaler in zip(models, (opt, ref), scalers):
            o.zero_grad()
            gen = torch.Generator().manual_seed(k)
            loss = nn.functional.mse_loss(m(torch.randn(8, 6, generator=gen)), torch.zeros(8, 2))
            if k % 2:  # grads rewritten in place after backward
                scaler.scale(loss).backward()
                scaler.unscale_(o)
                nn.utils.clip_grad_norm_(m.parameters(), 0.05)
                scaler.step(o)
                scaler.update()
            else:
                loss.backward()
                if o is opt:
                    assert opt.backend.data_path.shipped == 6  # all went out during backward
                o.step()
        assert_same_params(*models)
    assert_same_state_dict(opt.state_dict(), ref.state_dict())
    opt.close()


def test_share_params_updates_user_tensors_without_copies():
    models = [make_model() for _ in range(2)]
    opt = shardopt.AdamW(models[0].parameters(), lr=1e-2, num_shards=2, share_params=True)
    ref = run_as_shards(torch.optim.AdamW(models[1].parameters(), lr=1e-2))
    params = list(models[0].parameters())
    ptrs = [p.data_ptr() for p in params]
    mapped = [opt.backend.data_path.shared_params(s) for s in range(2)]
    for p in params:  # each parameter now lives inside a shard's shared buffer
        assert any(m.data_ptr() <= p.data_ptr() < m.data_ptr() + m.numel() for m in mapped)
    for k in range(3):
        train_step(models[0], opt, k)
        train_step(models[1], ref, k)
        assert_same_params(*models)
    assert [p.data_ptr() for p in params] == ptrs
    with torch.no_grad():  # the user's in-place edits are the master copy's
        params[0].mul_(0.5)
        list(models[1].parameters())[0].mul_(0.5)
    train_step(models[0], opt, 3)
    train_step(models[1], ref, 3)
    assert_same_params(*models)
    opt.close()


def test_shared_memory_leaves_nothing_in_dev_shm():
    import os

    import ray

    m = make_model()
    with shardopt.Adam(m.parameters(), num_shards=2) as opt:
        pids = {os.getpid(), *(ray.get(h.host.info.remote())["pid"] for h in opt.backend.handles)}

        def files() -> set[str]:  # this process's and its hosts' (other test sessions run beside)
            return {f for f in os.listdir("/dev/shm") for p in pids if f"shardopt-{p}-" in f}

        assert files() == set()  # unlinked once both sides mapped them
        assert opt.uses_shared_memory == [True, True]
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})  # buffers move
        train_step(m, opt, 0)
        assert len(opt.state_dict()["state"]) == 6  # gathered through shared-memory files
        assert set(opt.state[next(m.parameters())]) == {"step", "exp_avg", "exp_avg_sq"}
        assert files() == set()
    assert files() == set()


def test_shard_hosts_are_reused():
    """A new optimizer borrows the pooled hosts: no new actor processes, also when its actor
    options hold a Ray scheduling strategy equal to (not the same object as) the last one's."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from shardopt.client.runtime import host_pool

    m = make_model()
    opt = shardopt.SGD(m.parameters(), lr=0.1, num_shards=2)
    hosts = {h.host._actor_id for h in opt.backend.handles}
    opt.close()
    again = shardopt.SGD(m.parameters(), lr=0.1, num_shards=2)
    assert {h.host._actor_id for h in again.backend.handles} == hosts
    again.close()
    assert host_pool is not None
    head = ray.get_runtime_context().get_node_id()  # options made apart, equal: the same hosts
    pinned = [
        {"scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=False)} for _ in "ab"
    ]
    first = shardopt.SGD(m.parameters(), lr=0.1, num_shards=2, actor_options=pinned[0])
    hosts = {h.host._actor_id for h in first.backend.handles}
    first.close()
    second = shardopt.SGD(m.parameters(), lr=0.1, num_shards=2, actor_options=pinned[1])
    assert {h.host._actor_id for h in second.backend.handles} == hosts
    second.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_shards_match_torch_on_cuda():
    """Shards given a GPU run the update there; numbers match torch.optim on CUDA."""
    m1, m2 = make_model(), make_model()
    m1, m2 = m1.cuda(), m2.cuda()
    opt = shardopt.AdamW(m1.parameters(), lr=1e-2, num_shards=1, actor_options={"num_gpus": 1})
    ref = run_as_shards(torch.optim.AdamW(m2.parameters(), lr=1e-2))
    assert all(s.device.startswith("cuda") for s in opt.shard_status())
    for k in range(3):
        for m, o in ((m1, opt), (m2, ref)):
            o.zero_grad()
            m(torch.randn(4, 6, generator=torch.Generator().manual_seed(k)).cuda()).sum().backward()
            o.step()
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(a, b)
    opt.close()
