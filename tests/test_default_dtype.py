"""A client whose default dtype is float64 (``torch.set_default_dtype(torch.float64)``, common in
scientific code and with LBFGS), against torch.optim in the same process.

torch makes each parameter's scalar state in the default dtype's precision: ``step`` is float64,
and ASGD's ``eta``/``mu`` and NAdam's ``mu_product`` (which enter the update) too. The shards ran
in processes with torch's own float32 default: float32 ``step`` in every state dict, and other
numbers for ASGD and NAdam. Now they run under their client's default (cluster, gateway, shard
group), and a group's workers must agree on it.
"""

from __future__ import annotations

import threading
import uuid

import grpc
import pytest
import torch
from gateway_helpers import TOKEN, WARM_POOL, open_session
from helpers import (
    assert_same_params,
    assert_same_state_dict,
    closure_step,
    make_model,
    square_step,
)

import shardopt
from shardopt.core.default_dtype import running_under
from shardopt.core.proto import tensors_pb
from shardopt.gateway import serve

ALGORITHMS = [
    (torch.optim.Adam, {"lr": 0.01}),  # fused on the shards under a float32 default
    (torch.optim.ASGD, {"lr": 0.01, "t0": 1}),
    (torch.optim.NAdam, {"lr": 0.01}),
    (torch.optim.Adagrad, {"lr": 0.01}),  # makes its state in the constructor
    (torch.optim.RMSprop, {"lr": 0.01}),
]


@pytest.fixture
def float64_default():
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def gateway():
    gw = serve("127.0.0.1", 0, tokens=[TOKEN], limits=WARM_POOL)
    yield gw
    gw.stop(1)


def _inputs(n=4):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(4, 6, generator=gen, dtype=torch.get_default_dtype()) for _ in range(n)]


def _run_as_torch(opt, model, twin, want, step=square_step):
    for x in _inputs():
        step(model, opt, x)
        step(twin, want, x)
        assert_same_params(model, twin)
        assert_same_state_dict(opt.state_dict(), want.state_dict())


@pytest.mark.parametrize(("cls", "hyper"), ALGORITHMS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("where", ["cluster", "gateway", "group"])
def test_a_float64_default_gives_torchs_state_and_numbers(
    float64_default, address, where, cls, hyper
):
    model, twin = make_model(0), make_model(0)
    assert next(model.parameters()).dtype == torch.float64
    options = {
        "cluster": {},
        "gateway": {"address": address, "token": TOKEN},
        "group": {"group": f"float64-{uuid.uuid4().hex[:8]}", "world_size": 1, "rank": 0},
    }[where]
    with shardopt.ShardedOptimizer(
        model.parameters(), cls, num_shards=2, **options, **hyper
    ) as opt:
        _run_as_torch(opt, model, twin, cls(twin.parameters(), **hyper))
        assert opt.state_dict()["state"][0]["step"].dtype == torch.float64
    if where == "group":
        shardopt.close_group(options["group"])


@pytest.mark.parametrize("where", ["cluster", "gateway"])
def test_lbfgs_under_a_float64_default_is_torchs(float64_default, address, where):
    """One shard: bit for bit (more sum the dot products in another order)."""
    model, twin = make_model(0), make_model(0)
    remote = {"address": address, "token": TOKEN} if where == "gateway" else {}
    with shardopt.LBFGS(model.parameters(), lr=0.5, max_iter=4, num_shards=1, **remote) as opt:
        want = torch.optim.LBFGS(twin.parameters(), lr=0.5, max_iter=4)
        _run_as_torch(opt, model, twin, want, step=closure_step)


def test_a_state_dict_with_plain_number_steps_loads_as_torch_loads_it(float64_default):
    """An old-format state dict (``step`` a number): torch's ``__setstate__`` makes it a tensor
    in the default dtype's precision; the shards do it under the client's."""
    model, twin = make_model(0), make_model(0)
    with shardopt.ShardedOptimizer(model.parameters(), torch.optim.Adam, num_shards=2) as opt:
        want = torch.optim.Adam(twin.parameters())
        square_step(model, opt, _inputs(1)[0])
        square_step(twin, want, _inputs(1)[0])
        old = want.state_dict()
        for state in old["state"].values():
            state["step"] = float(state["step"])
        opt.load_state_dict(old)
        want.load_state_dict(old)
        assert_same_state_dict(opt.state_dict(), want.state_dict())
        _run_as_torch(opt, model, twin, want)


def test_the_default_dtype_can_be_named_and_is_checked():
    """``default_dtype=`` runs the shards under that default whatever this process's is."""
    model, twin = make_model(0).double(), make_model(0).double()
    with running_under(torch.float64):
        want = torch.optim.NAdam(twin.parameters(), lr=0.01)
    with shardopt.ShardedOptimizer(
        model.parameters(), torch.optim.NAdam, num_shards=2, lr=0.01, default_dtype=torch.float64
    ) as opt:
        for x in _inputs():
            square_step(model, opt, x.double())
            with running_under(torch.float64):
                square_step(twin, want, x.double())
        assert_same_params(model, twin)
        assert_same_state_dict(opt.state_dict(), want.state_dict())
    with pytest.raises(TypeError, match="only floating-point types are supported"):
        shardopt.Adam(model.parameters(), default_dtype=torch.int64)


def test_a_gateway_refuses_a_default_dtype_torch_cannot_have(stub):
    params = [torch.zeros(3)]
    for code in (tensors_pb.INT64, 99):
        with pytest.raises(grpc.RpcError) as refused:
            open_session(stub, params, hyperparameters={"lr": 0.1}, default_dtype=code)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Invalid default_dtype" in refused.value.details()


def test_threads_under_different_defaults_never_see_each_others():
    """A host's shards step in threads of their own: each block sees its own default for its
    whole run, blocks nest, and the process's default is back afterwards."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    start = threading.Barrier(6)

    def work(dtype: torch.dtype) -> None:
        start.wait()
        for _ in range(200):
            with running_under(dtype):
                with running_under(dtype):
                    seen.append((dtype, torch.tensor(1.0).dtype))
                seen.append((dtype, torch.get_default_dtype()))
                with pytest.raises(RuntimeError, match="already running under"):
                    with running_under(
                        torch.bfloat16 if dtype != torch.bfloat16 else torch.float32
                    ):
                        pass

    dtypes = [torch.float32, torch.float64, torch.bfloat16] * 2
    threads = [threading.Thread(target=work, args=(d,)) for d in dtypes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 6 * 200 * 2
    assert all(want == got for want, got in seen)
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize(
    ("cls", "hyper"),
    [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 0.01})],
    ids=["SGD", "Adam"],
)
@pytest.mark.parametrize("where", ["cluster", "gateway"])
def test_a_grad_scaler_under_a_float64_default(float64_default, address, where, cls, hyper):
    """GradScaler's unscale (on the shards, or here for a gateway) keeps its ``found_inf`` in
    float32, as GradScaler does, whatever the default dtype (a float64 one failed the step:
    ``found_inf must be a float tensor``)."""
    model, twin = make_model(0), make_model(0)
    remote = {"address": address, "token": TOKEN} if where == "gateway" else {}
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in "ab"]
    with shardopt.ShardedOptimizer(model.parameters(), cls, num_shards=2, **remote, **hyper) as opt:
        want = cls(twin.parameters(), **hyper)
        for x in _inputs(3):
            for m, o, scaler in ((model, opt, scalers[0]), (twin, want, scalers[1])):
                o.zero_grad()
                scaler.scale(m(x).square().mean()).backward()
                scaler.step(o)
                scaler.update()
            assert_same_params(model, twin)
        assert_same_state_dict(opt.state_dict(), want.state_dict())
