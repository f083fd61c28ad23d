"""The gRPC gateway on 127.0.0.1: the remote proxy's parity with torch.optim, auth, and every
kind of bad input, after which the gateway keeps serving the other sessions with nothing lost.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from gateway_helpers import (
    OTHER_TOKEN,
    TOKEN,
    auth,
    chunk,
    code_of,
    guarded_victim,
    open_session,
    pull,
    push,
    state_of,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    assert_same,
    assert_same_params,
    assert_same_state_dict,
    assert_same_tensors,
    make_model,
    mlp,
    square_step,
)
from reference import run_as_shards

import shardopt
from shardopt.core import wire
from shardopt.core.proto import pb, tensors_pb
from shardopt.gateway import Limits, serve

SIZES = (5, 4, 2)
"""The layer widths of the models trained through the gateway."""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = serve(
        "127.0.0.1", 0, tokens=[TOKEN, OTHER_TOKEN],
        checkpoint_dir=str(tmp_path_factory.mktemp("gateway-ckpt")),
        # the 16-client load test runs 16 sessions (and calls) of one token at once; hosts stay
        # pooled between the tests' sessions
        limits=Limits(max_session_bytes=64 << 20, max_sessions_per_token=32,
                      max_calls_per_token=24, idle_shard_hosts=4),
    )  # fmt: skip
    yield gw
    gw.stop(1)


def model_and_copy(seed=0):
    """A 5 -> 4 -> 2 model and a twin with the same weights."""
    model = make_model(seed, SIZES)
    twin = mlp(SIZES)  # weights overwritten below; drawing them keeps the RNG the inputs come from
    twin.load_state_dict(model.state_dict())
    return model, twin


def groups_of(model, **second):
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:], **second}]


# ----- health and reflection ----------------------------------------------------------------


def test_health_and_reflection_need_no_token(address):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "shardopt.v1.OptimizerService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(reflection.ServerReflectionInfo(iter([request])))
        names = {s.name for s in answer.list_services_response.service}
        assert "shardopt.v1.OptimizerService" in names


# ----- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "hyper"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
        (torch.optim.AdamW, {"lr": 0.01, "foreach": True}),
        (torch.optim.Adagrad, {"lr": 0.1}),
        (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    ],
)
def test_remote_proxy_matches_torch_step_by_step(address, cls, hyper):
    model, twin = model_and_copy()
    remote = shardopt.ShardedOptimizer(
        groups_of(model, lr=0.05), cls, num_shards=2, address=address, token=TOKEN, **hyper
    )
    local = run_as_shards(cls(groups_of(twin, lr=0.05), **hyper))
    sched = torch.optim.lr_scheduler.StepLR(remote, step_size=2, gamma=0.5)
    local_sched = torch.optim.lr_scheduler.StepLR(local, step_size=2, gamma=0.5)
    assert remote.param_groups[1]["lr"] == local.param_groups[1]["lr"]
    for step in range(5):
        x = torch.randn(6, 5)
        square_step(model, remote, x)
        square_step(twin, local, x)
        sched.step()
        local_sched.step()
        assert_same_params(model, twin, f"step {step}")
    assert_same_state_dict(remote.state_dict(), local.state_dict())
    assert len(remote.state) == len(local.state)
    remote.close()


def test_state_dicts_cross_between_torch_and_the_remote_proxy(address):
    model, twin = model_and_copy()
    local = torch.optim.AdamW(twin.parameters(), lr=0.01, fused=True)
    x = torch.randn(6, 5)
    square_step(twin, local, x)
    remote = shardopt.AdamW(model.parameters(), lr=0.01, address=address, token=TOKEN)
    remote.load_state_dict(local.state_dict())
    model.load_state_dict(twin.state_dict())
    for _ in range(2):
        x = torch.randn(6, 5)
        square_step(model, remote, x)
        square_step(twin, local, x)
    assert_same_params(model, twin)
    fresh = torch.optim.AdamW(twin.parameters(), lr=0.01, fused=True)
    fresh.load_state_dict(remote.state_dict())
    assert fresh.state_dict()["state"][0]["step"] == local.state_dict()["state"][0]["step"]
    remote.close()


def test_add_param_group_and_checkpoints_over_grpc(address):
    model, twin = model_and_copy()
    params, twin_params = list(model.parameters()), list(twin.parameters())
    remote = shardopt.Adam(params[:2], lr=0.01, address=address, token=TOKEN)
    local = torch.optim.Adam(twin_params[:2], lr=0.01, fused=True)
    remote.add_param_group({"params": params[2:], "lr": 0.02})
    local.add_param_group({"params": twin_params[2:], "lr": 0.02})
    x = torch.randn(6, 5)
    square_step(model, remote, x)
    square_step(twin, local, x)
    assert_same_tensors(params, twin_params)
    name = f"run-{uuid.uuid4().hex[:6]}/step-1"
    remote.save_checkpoint(name)
    saved = remote.state_dict()
    square_step(model, remote, torch.randn(6, 5))
    remote.param_groups[0]["lr"] = 0.5  # a scheduler moved it; the checkpoint's comes back
    remote.load_checkpoint(name)
    again = remote.state_dict()
    assert_same(again, saved)  # the groups too (their lr), in torch's key order
    for bad in ("../escape", "/etc/passwd", ""):
        with pytest.raises(ValueError, match="must be relative"):
            remote.save_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        remote.load_checkpoint("never-written")
    remote.close()


def test_every_client_of_an_async_group_over_grpc_sees_the_groups_state(address):
    """The remote client of rank 1 sees the state rank 0's push made (its session's worker
    showed only what its own pushes created: none, with Adam's moments on the shards)."""
    name = f"grpc-{uuid.uuid4().hex[:6]}"
    x = torch.randn(8, 5)
    models = [model_and_copy()[0] for _ in range(2)]
    opts = [
        shardopt.AdamW(
            models[rank].parameters(),
            lr=0.01,
            address=address,
            token=TOKEN,
            group=name,
            world_size=2,
            rank=rank,
            num_shards=2,
            mode="async",
            timeout=60,
        )  # fmt: skip
        for rank in range(2)
    ]
    for rank in range(2):  # rank 0's push first: it gives every parameter its state
        square_step(models[rank], opts[rank], x[rank * 4 : (rank + 1) * 4])
    for opt, model in zip(opts, models):
        assert [id(p) for p in opt.state] == [id(p) for p in model.parameters()]
        assert [float(state["step"]) for state in opt.state.values()] == [2.0] * 4
    for opt in opts:
        opt.close()


def test_sync_group_over_grpc_equals_one_worker(address):
    name = f"grpc-{uuid.uuid4().hex[:6]}"
    x = torch.randn(8, 5)
    models = [model_and_copy()[0] for _ in range(2)]
    full, _ = model_and_copy()
    reference = run_as_shards(torch.optim.AdamW(full.parameters(), lr=0.01))

    def work(rank):
        opt = shardopt.AdamW(
            models[rank].parameters(), lr=0.01, address=address, token=TOKEN, group=name,
            world_size=2, rank=rank, num_shards=2, timeout=60,
        )  # fmt: skip
        for _ in range(3):
            square_step(models[rank], opt, x[rank * 4 : (rank + 1) * 4])
        pushes = [p.applied_version for p in opt.backend.last_pushes]
        opt.close()
        return pushes

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(work, range(2)))
    for _ in range(3):
        square_step(full, reference, x)
    assert results[0] == results[1] == [2, 2]
    for a, b, want in zip(models[0].parameters(), models[1].parameters(), full.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6)


# ----- auth and isolation -------------------------------------------------------------------


def test_missing_or_wrong_token_is_unauthenticated(stub):
    params = [torch.ones(3)]
    request = pb.SessionRef(session_id="whatever")
    for metadata in ((), auth("not-a-valid-token-at-all"), (("authorization", TOKEN),)):
        code = code_of(lambda m=metadata: stub.CloseSession(request, metadata=m))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: open_session(stub, params, token="x" * 30)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_sessions_and_groups_are_isolated_between_tokens(stub):
    session = open_session(stub, [torch.ones(3)])
    assert code_of(lambda: pull(stub, session.session_id, token=OTHER_TOKEN)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(lambda: pull(stub, "no-such-session")) == grpc.StatusCode.NOT_FOUND
    # the same group name under two tokens is two groups: both can be rank 0 of world size 1
    name = f"shared-name-{uuid.uuid4().hex[:6]}"
    group = pb.GroupOptions(name=name, world_size=1, rank=0, mode="async")
    a = open_session(stub, [torch.ones(2)], group=group, num_shards=1)
    b = open_session(stub, [torch.full((2,), 5.0)], token=OTHER_TOKEN, group=group, num_shards=1)
    assert a.created_group and b.created_group
    assert torch.equal(pull(stub, a.session_id)[0], torch.ones(2))
    for s, token in ((session, TOKEN), (a, TOKEN), (b, OTHER_TOKEN)):
        stub.CloseSession(pb.SessionRef(session_id=s.session_id), metadata=auth(token))


# ----- bad input ------------------------------------------------------------------------------


@pytest.fixture
def victim(stub):
    """A session with state, and a bystander session; both must survive every bad request."""
    with guarded_victim(stub) as guarded:
        yield guarded.session_id


BAD_PUSHES = {
    "wrong shape": dict(specs=[wire.spec_of(torch.ones(3, 2)), wire.spec_of(torch.ones(4))]),
    "wrong dtype": dict(
        specs=[wire.spec_of(torch.ones(2, 3, dtype=torch.float64)), wire.spec_of(torch.ones(4))]
    ),
    "too few bytes": dict(chunks=[chunk(0, 0, b"\0" * 24), chunk(1, 0, b"\0" * 15)]),
    "too many bytes": dict(chunks=[chunk(0, 0, b"\0" * 24), chunk(1, 0, b"\0" * 17)]),
    "out of order": dict(chunks=[chunk(1, 0, b"\0" * 16), chunk(0, 0, b"\0" * 24)]),
    "offset gap": dict(chunks=[chunk(0, 0, b"\0" * 8), chunk(0, 12, b"\0" * 16)]),
    "chunk after the end": dict(
        chunks=[chunk(0, 0, b"\0" * 24), chunk(1, 0, b"\0" * 16), chunk(2, 0, b"\0")]
    ),
    "unknown dtype": dict(specs=[tensors_pb.TensorSpec(dtype=99, shape=[2, 3])] * 2),
    "index past the parameters": dict(indices=[0, 7]),
    "indices not increasing": dict(indices=[1, 0]),
}


@pytest.mark.parametrize("case", sorted(BAD_PUSHES))
def test_bad_gradient_streams_are_invalid_and_change_nothing(stub, victim, case):
    grads = [torch.full((2, 3), 7.0), torch.full((4,), 7.0)]
    code = code_of(lambda: push(stub, victim, grads, **BAD_PUSHES[case]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # nothing was staged: a step now is refused rather than applying half a gradient
    step = pb.StepRequest(session_id=victim)
    assert code_of(lambda: stub.Step(step, metadata=auth())) == grpc.StatusCode.FAILED_PRECONDITION


def test_terabyte_declarations_are_refused_before_allocating(stub, victim):
    huge = tensors_pb.TensorSpec(dtype=tensors_pb.FLOAT32, shape=[1 << 20, 1 << 20])
    spec = pb.SessionSpec(
        optimizer="SGD", params=[huge], hyperparameters=wire.encode_options({"lr": 0.1})
    )
    started = time.monotonic()
    code = code_of(
        lambda: stub.OpenSession(iter([pb.OpenSessionRequest(spec=spec)]), metadata=auth())
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - started < 5
    header = pb.StateDictHeader(session_id=victim, tensors=[huge])
    request = iter([pb.StateDictMessage(header=header)])
    assert code_of(lambda: stub.LoadStateDict(request, metadata=auth())) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_garbage_bytes_are_invalid_argument(address, victim):
    garbage = b"\xff\xfe\x00garbage that is no protobuf message\x07"
    with grpc.insecure_channel(address) as channel:
        for method, streaming in (("Step", False), ("PushGradients", True)):
            path = f"/shardopt.v1.OptimizerService/{method}"
            if streaming:
                call = channel.stream_unary(path, request_serializer=None)
                code = code_of(lambda c=call: c(iter([garbage]), metadata=auth()))
            else:
                call = channel.unary_unary(path, request_serializer=None)
                code = code_of(lambda c=call: c(garbage, metadata=auth()))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, method


def test_bad_state_dicts_and_options_are_refused(stub, victim):
    current = state_of(stub, victim)
    for broken in (
        {"state": current["state"]},  # no param_groups
        {**current, "param_groups": [{**current["param_groups"][0], "params": [0, 1, 2]}]},
    ):
        tensors = []
        header = pb.StateDictHeader(
            session_id=victim, state_dict=wire.encode_value(broken, tensors),
            tensors=[wire.spec_of(t) for t in tensors],
        )  # fmt: skip
        messages = [pb.StateDictMessage(header=header)] + [
            pb.StateDictMessage(chunk=c) for c in wire.tensor_chunks(tensors)
        ]
        code = code_of(lambda m=messages: stub.LoadStateDict(iter(m), metadata=auth()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    bad_lr = pb.ParamGroup(options=wire.encode_options({"lr": -1.0}))
    request = pb.UpdateParamGroupsRequest(session_id=victim, param_groups=[bad_lr, bad_lr])
    assert code_of(lambda: stub.UpdateParamGroups(request, metadata=auth())) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    spec = pb.SessionSpec(optimizer="os.system", params=[])
    request = iter([pb.OpenSessionRequest(spec=spec)])
    assert code_of(lambda: stub.OpenSession(request, metadata=auth())) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_client_that_disconnects_mid_stream_changes_nothing(stub, victim):
    gate = threading.Event()

    def requests():
        yield pb.PushGradientsRequest(
            header=pb.PushGradientsHeader(
                session_id=victim, params=[0, 1],
                grads=[wire.spec_of(torch.ones(2, 3)), wire.spec_of(torch.ones(4))],
            )
        )  # fmt: skip
        yield pb.PushGradientsRequest(chunk=chunk(0, 0, b"\0" * 24))
        gate.wait(10)  # the client goes away before sending the rest

    future = stub.PushGradients.future(requests(), metadata=auth())
    time.sleep(0.5)
    future.cancel()
    gate.set()
    assert future.cancelled() or code_of(future.result) == grpc.StatusCode.CANCELLED
    step = pb.StepRequest(session_id=victim)
    assert code_of(lambda: stub.Step(step, metadata=auth())) == grpc.StatusCode.FAILED_PRECONDITION


def test_remote_errors_have_torch_types(address):
    model, _ = model_and_copy()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        shardopt.SGD(model.parameters(), lr=-1.0, address=address, token=TOKEN)
    remote = shardopt.SGD(model.parameters(), lr=0.1, address=address, token=TOKEN)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        remote.load_state_dict({"state": {}, "param_groups": []})
    with pytest.raises(PermissionError):
        shardopt.SGD(model.parameters(), lr=0.1, address=address, token="wrong-token-123456")
    remote.close()
    with pytest.raises(shardopt.OptimizerClosedError):
        remote.step()


# ----- load ---------------------------------------------------------------------------------


def test_sixteen_clients_hundred_steps_every_update_accounted_for(address):
    """16 remote workers of one async group push gradient 1 a hundred times each to SGD(lr=1)
    on one scalar: the applied versions are exactly 0..1599, each once, and at the end every
    worker reads exactly -1600: no update lost or doubled."""
    name = f"load-{uuid.uuid4().hex[:6]}"
    clients, steps = 16, 100
    everyone_done = threading.Barrier(clients, timeout=120)

    def work(rank):
        w = torch.zeros(1, requires_grad=True)
        opt = shardopt.SGD([w], lr=1.0, address=address, token=TOKEN, group=name,
                           world_size=clients, rank=rank, mode="async", num_shards=1)  # fmt: skip
        applied = []
        for _ in range(steps):
            w.grad = torch.ones(1)
            opt.step()
            (push,) = opt.backend.last_pushes
            applied.append(push.applied_version)
            # the parameters come back with this update and maybe later ones in them
            assert w.item() <= -float(push.applied_version + 1)
        everyone_done.wait()
        opt.pull_params()
        assert w.item() == -float(clients * steps)
        opt.close()
        return applied

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(work, range(clients)))
    applied = sorted(v for r in results for v in r)
    assert applied == list(range(clients * steps))
