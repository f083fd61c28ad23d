"""A model converted after its optimizer was made (``model.to(torch.bfloat16)``, ``.double()``,
a parameter given data of another shape), against what torch.optim does with the same calls.

torch updates a parameter in its new form as long as it has no state (and fails, or mixes the
two forms, once it has); shardopt's shards held a master copy in the old form and went on
updating that, writing it back rounded (other numbers than torch's, float32 state for a
bfloat16 model). Now the shards are re-placed in the new form before the step, or the step is
refused where state exists, with nothing changed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from gateway_helpers import TOKEN, WARM_POOL
from helpers import (
    assert_same_params,
    assert_same_state_dict,
    closure_step,
    make_model,
    square_step,
)

import shardopt
from shardopt.core.errors import QuotaExceededError
from shardopt.gateway import serve
from shardopt.gateway.quotas import Limits


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


def _inputs(model, n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    return [torch.randn(4, 6, generator=gen).to(dtype) for _ in range(n)]


def _grow(model):
    """The last layer gets two more outputs (``p.data`` of another shape, as model surgery
    does), its values seeded."""
    gen = torch.Generator().manual_seed(7)
    last = model[-1]
    last.weight.data = torch.randn(last.out_features + 2, last.in_features, generator=gen)
    last.bias.data = torch.randn(last.out_features + 2, generator=gen)


def _steps_as_torch(model, opt, twin, want, inputs, step=square_step):
    """Steps both optimizers on each input: the parameters (dtype, shape and bits) are torch's
    after every step, the state dict after the last."""
    for x in inputs:
        step(model, opt, x)
        step(twin, want, x)
        assert_same_params(model, twin)
    assert_same_state_dict(opt.state_dict(), want.state_dict())


CONVERSIONS = {
    "bfloat16": lambda m: m.to(torch.bfloat16),
    "float64": lambda m: m.double(),
    "grown": _grow,
}
WHERE = {
    "shared-memory": {},
    "object-store": {"shared_memory": False},
    "gateway": None,  # filled from the fixture
}


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
@pytest.mark.parametrize("where", list(WHERE))
def test_a_model_converted_before_its_first_step_is_updated_in_its_new_form(
    conversion, where, request
):
    """Converted after the optimizer was made, before any step: every step, the parameters
    (dtype, shape and bits) and the state dict (state in the new dtype) are torch's."""
    options = request.getfixturevalue("gateway") if where == "gateway" else WHERE[where]
    model, twin = make_model(0), make_model(0)
    hyper = {"lr": 0.05, "weight_decay": 0.01, "foreach": False}  # fused by default: rounding
    opt = shardopt.AdamW(model.parameters(), num_shards=2, **hyper, **options)
    want = torch.optim.AdamW(twin.parameters(), **hyper)
    try:
        for m in (model, twin):
            CONVERSIONS[conversion](m)
        _steps_as_torch(model, opt, twin, want, _inputs(model))
        dtype = next(twin.parameters()).dtype
        assert opt.state[model[0].weight]["exp_avg"].dtype == dtype
    finally:
        opt.close()


@pytest.mark.parametrize(
    "options", [{"overlap": True, "share_params": True}, {"replicate": True}], ids=str
)
def test_the_speed_options_and_replicas_follow_a_converted_model(options):
    """Gradients shipped during backward, parameters living in the shards' shared memory, and
    replicas: all made again in the new form, torch's numbers every step."""
    model, twin = make_model(0), make_model(0)
    shards = 1 if options.get("replicate") else 2  # a replica each: actors are slow to start
    opt = shardopt.AdamW(model.parameters(), lr=0.05, foreach=False, num_shards=shards, **options)
    want = torch.optim.AdamW(twin.parameters(), lr=0.05, foreach=False)
    try:
        model.double()
        twin.double()
        _steps_as_torch(model, opt, twin, want, _inputs(model))
    finally:
        opt.close()


def test_a_layer_converted_before_its_first_step_keeps_the_others_state():
    """Trained layers keep their state when a layer added later (``add_param_group``) is
    converted before its first step: the re-placed shards go on exactly as torch, and no
    state is lost."""
    model, twin = make_model(0), make_model(0)
    head, head_twin = make_model(4, (6, 3)), make_model(4, (6, 3))
    opt = shardopt.Adam(model.parameters(), lr=0.05, foreach=False, num_shards=2, split=False)
    want = torch.optim.Adam(twin.parameters(), lr=0.05, foreach=False)

    def step(m, h, o, x):
        o.zero_grad()
        (m(x).square().mean() + h(x.double()).square().mean()).backward()
        o.step()

    try:
        xs = _inputs(model, 4)
        for x in xs[:2]:  # only the model is the optimizer's yet
            square_step(model, opt, x)
            square_step(twin, want, x)
        for o, m, h in ((opt, model, head), (want, twin, head_twin)):
            o.add_param_group({"params": list(h.parameters()), "lr": 0.01})
            h.double()
            m.double().float()  # new storage, same form: nothing to re-place
        for x in xs[2:]:
            step(model, head, opt, x)
            step(twin, head_twin, want, x)
        assert_same_params(model, twin)
        assert_same_params(head, head_twin)
        assert head[0].weight.dtype == torch.float64
        assert_same_state_dict(opt.state_dict(), want.state_dict())
    finally:
        opt.close()


@pytest.mark.parametrize("where", ["shared-memory", "gateway"])
def test_converting_parameters_that_have_state_is_refused_and_changes_nothing(where, request):
    """torch's Adam fails on moments of the old dtype; shardopt refuses before sending
    anything (RuntimeError naming the parameter and both forms), and once the model is
    converted back the optimizer goes on as torch's."""
    options = request.getfixturevalue("gateway") if where == "gateway" else {}
    model, twin = make_model(0), make_model(0)
    opt = shardopt.Adam(model.parameters(), lr=0.05, foreach=False, num_shards=2, **options)
    want = torch.optim.Adam(twin.parameters(), lr=0.05, foreach=False)
    try:
        xs = _inputs(model, 3)
        square_step(model, opt, xs[0])
        square_step(twin, want, xs[0])
        before = opt.state_dict()
        model.to(torch.bfloat16)
        twin.to(torch.bfloat16)
        x = xs[1].to(torch.bfloat16)
        with pytest.raises(RuntimeError) as torch_error:
            square_step(twin, want, x)
        with pytest.raises(
            RuntimeError,
            match=r"parameter 0 is bfloat16 \[9, 6\] now but its "
            r"shards hold it as float32 \[9, 6\].*optimizer state",
        ) as ours:
            square_step(model, opt, x)  # fmt: skip
        assert type(ours.value) is type(torch_error.value)
        assert_same_state_dict(opt.state_dict(), before)
        model.float()
        twin.float()
        want.load_state_dict(before)  # torch's failed step may have changed its state
        _steps_as_torch(model, opt, twin, want, xs[1:])
    finally:
        opt.close()


def test_lbfgs_converted_before_its_first_step_and_refused_after():
    """shardopt.LBFGS (one state for all parameters): converted before the first step it is
    torch's LBFGS in float64 (one shard: bit for bit); converted once it has state, refused."""
    model, twin = make_model(0), make_model(0)
    opt = shardopt.LBFGS(model.parameters(), lr=0.5, history_size=4, num_shards=1)
    want = torch.optim.LBFGS(twin.parameters(), lr=0.5, history_size=4)
    try:
        model.double()
        twin.double()
        _steps_as_torch(model, opt, twin, want, _inputs(model, 2), closure_step)
        model.float()
        with pytest.raises(RuntimeError, match="optimizer state was made for the old form"):
            closure_step(model, opt, torch.randn(4, 6))
    finally:
        opt.close()


def test_a_state_dict_loaded_after_converting_lands_in_the_new_form():
    """Fabric-style: the optimizer is made, the model converted to bfloat16, then a checkpoint
    of a bfloat16 run is loaded: the state is in bfloat16 and the run goes on as torch's."""
    source, twin, model = make_model(3), make_model(0), make_model(0)
    source.to(torch.bfloat16)
    trained = torch.optim.AdamW(source.parameters(), lr=0.05, foreach=False)
    for x in _inputs(source, 2):
        square_step(source, trained, x)
    saved = trained.state_dict()
    opt = shardopt.AdamW(model.parameters(), lr=0.05, foreach=False, num_shards=2)
    want = torch.optim.AdamW(twin.parameters(), lr=0.05, foreach=False)
    try:
        for m, o in ((model, opt), (twin, want)):
            m.to(torch.bfloat16)
            m.load_state_dict(source.state_dict())
            o.load_state_dict(saved)
        assert_same_state_dict(opt.state_dict(), want.state_dict())
        _steps_as_torch(model, opt, twin, want, _inputs(model, 2, seed=5))
    finally:
        opt.close()


@pytest.mark.parametrize("where", ["ray", "gateway"])
def test_a_shard_group_member_refuses_a_converted_model(where, request):
    """A group's parameters are what its workers agreed on: converting them is refused, and
    the member steps on once converted back."""
    remote = request.getfixturevalue("gateway") if where == "gateway" else {}
    model = make_model(0)
    opt = shardopt.SGD(model.parameters(), lr=0.1, num_shards=1, group=f"forms-{where}",
                       world_size=1, rank=0, **remote)  # fmt: skip
    try:
        model.double()
        with pytest.raises(RuntimeError, match="a shard group's parameters are fixed"):
            square_step(model, opt, torch.randn(4, 6, dtype=torch.float64))
        model.float()
        square_step(model, opt, torch.randn(4, 6))
    finally:
        opt.close()


def test_a_re_placement_the_gateway_refuses_leaves_the_session_as_it_was():
    """Re-placing through a gateway opens a second session for a moment: where the token's
    quota allows one, the gateway's QuotaExceededError reaches the user with a note saying
    why, and the first session steps on once the model is converted back."""
    gw = serve("127.0.0.1", 0, tokens=[TOKEN], limits=Limits(max_sessions_per_token=1))
    model, twin = make_model(0), make_model(0)
    opt = shardopt.SGD(model.parameters(), lr=0.1, momentum=0.9, num_shards=2,
                       address=f"127.0.0.1:{gw.port}", token=TOKEN)  # fmt: skip
    want = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    try:
        model.double()
        with pytest.raises(QuotaExceededError) as refused:
            square_step(model, opt, torch.randn(4, 6, dtype=torch.float64))
        assert any("re-placing the shards" in note for note in refused.value.__notes__)
        model.float()
        _steps_as_torch(model, opt, twin, want, _inputs(model))
    finally:
        opt.close()
        gw.stop(1)


def _listed(model):
    return list(model.parameters())


LIST_CHANGES = {
    # opt, the model: what code does to the lists torch steps (instead of add_param_group)
    "appended": lambda o, m: o.param_groups[0]["params"].extend(_listed(m)[4:]),
    "removed": lambda o, m: o.param_groups[0]["params"].remove(_listed(m)[0]),
    "replaced": lambda o, m: o.param_groups[0].__setitem__(
        "params", _listed(m)[2::-1] + _listed(m)[4:]
    ),
    "moved": lambda o, m: o.param_groups[1]["params"].insert(0, o.param_groups[0]["params"].pop()),
    "group-appended": lambda o, m: o.param_groups.append(
        {**o.param_groups[1], "params": _listed(m)[4:]}
    ),
    "group-removed": lambda o, m: o.param_groups.pop(1),
}


@pytest.mark.parametrize("change", list(LIST_CHANGES))
@pytest.mark.parametrize("where", ["shared-memory", "object-store", "gateway"])
def test_tensors_added_to_or_removed_from_a_groups_list_are_stepped_as_torch(
    change, where, request
):
    """Code that appends to ``param_groups[g]["params"]``, removes from it, replaces it or
    moves a tensor to another group, after steps: torch steps exactly the tensors listed from
    then on; so do the shards (re-placed, every listed tensor's state carried over; a removed
    one's dropped with a warning). Before, appended tensors were silently not stepped and the
    gradients of the others went to the wrong tensors."""
    options = request.getfixturevalue("gateway") if where == "gateway" else WHERE[where]
    model, twin = make_model(0), make_model(0)
    hyper = {"lr": 0.05, "foreach": False}

    def groups(m):
        return [{"params": _listed(m)[:3]}, {"params": _listed(m)[3:4], "lr": 0.01}]

    opt = shardopt.Adam(groups(model), num_shards=2, **hyper, **options)
    want = torch.optim.Adam(groups(twin), **hyper)
    try:
        xs = _inputs(model, 4)
        for x in xs[:2]:
            square_step(model, opt, x)
            square_step(twin, want, x)
        LIST_CHANGES[change](opt, model)
        LIST_CHANGES[change](want, twin)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x in xs[2:]:
                square_step(model, opt, x)
                square_step(twin, want, x)
                assert_same_params(model, twin)
        dropped = [w for w in caught if "is dropped" in str(w.message)]
        removed = change in ("removed", "group-removed")
        assert len(dropped) == removed
        if not removed:  # torch's state_dict fails on state of a tensor it no longer lists
            assert_same_state_dict(opt.state_dict(), want.state_dict())
    finally:
        opt.close()


def test_a_tensor_appended_to_a_list_has_state_only_once_stepped_and_can_be_dropped():
    """``opt.state`` follows the lists too: a tensor just appended has no state (``{}``, as
    torch's defaultdict gives); ``del opt.state[p]`` (or ``pop``) drops a tensor's state, and
    its next step starts it afresh, as torch's."""
    model, twin = make_model(0), make_model(0)
    opt = shardopt.Adam(_listed(model)[:4], lr=0.05, foreach=False, num_shards=2)
    want = torch.optim.Adam(_listed(twin)[:4], lr=0.05, foreach=False)
    try:
        xs = _inputs(model, 3)
        square_step(model, opt, xs[0])
        square_step(twin, want, xs[0])
        for o, m in ((opt, model), (want, twin)):
            o.param_groups[0]["params"].append(m[4].weight)
        assert opt.state[model[4].weight] == {}
        assert model[4].weight not in opt.state and twin[4].weight not in want.state
        for o, m in ((opt, model), (want, twin)):
            del o.state[m[0].weight]
            o.state.pop(m[2].weight)
        with pytest.raises(KeyError):
            del opt.state[model[0].weight]  # no state now: KeyError, as torch's defaultdict
        assert_same_state_dict(opt.state_dict(), want.state_dict())
        _steps_as_torch(model, opt, twin, want, xs[1:])
    finally:
        opt.close()


@pytest.mark.parametrize("where", ["ray", "gateway"])
def test_list_changes_are_refused_where_state_spans_them(where, request):
    """A shard group's member (the workers agreed on the parameters) and LBFGS with state (one
    vector over all parameters) refuse a changed list before sending anything."""
    remote = request.getfixturevalue("gateway") if where == "gateway" else {}
    model = make_model(0)
    member = shardopt.SGD(_listed(model)[:4], lr=0.1, num_shards=1, group=f"lists-{where}",
                          world_size=1, rank=0, **remote)  # fmt: skip
    lbfgs = shardopt.LBFGS(_listed(model)[:4], lr=0.5, num_shards=1, **remote)
    try:
        closure_step(model, lbfgs, torch.randn(4, 6))
        for opt, message in ((member, "a shard group's parameters are fixed"),
                             (lbfgs, "LBFGS's state is one vector")):  # fmt: skip
            opt.param_groups[0]["params"].append(model[4].weight)
            with pytest.raises(RuntimeError, match=message):
                closure_step(model, opt, torch.randn(4, 6))
            opt.param_groups[0]["params"].pop()
            closure_step(model, opt, torch.randn(4, 6))
    finally:
        member.close()
        lbfgs.close()
