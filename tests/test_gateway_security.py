"""Attacks on a real gateway on 127.0.0.1, by a token holder (issue #13): code execution through
session options, starving other tokens, reaching another token's checkpoints, and the low ones.

Each attack must fail with its status, leave no trace (no marker file, no session, no shard
host, no bytes held), and leave a victim session of another token unchanged while a bystander
session keeps stepping (:func:`gateway_helpers.guarded_victim`).
"""

from __future__ import annotations

import inspect
import os
import socket
import threading
import time
import uuid

import grpc
import pytest
import ray
import torch
from gateway_helpers import (
    OTHER_TOKEN,
    TOKEN,
    auth,
    close_session,
    code_of,
    error_of,
    guarded_victim,
    open_session,
    pull,
    push,
    state_of,
    step,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import assert_same_state_dict

import shardopt
from shardopt.client.runtime import host_pool
from shardopt.core import wire
from shardopt.core.proto import pb, rpc, tensors_pb
from shardopt.gateway import Limits, serve
from shardopt.gateway.admission import token_scope
from shardopt.gateway.auth import principal_of

ATTACKER = "token-of-the-attacker-5551234"
MiB = 1 << 20
LIMITS = Limits(
    max_session_bytes=1 * MiB,
    max_total_bytes=16 * MiB,
    max_buffered_bytes=16 * MiB,
    max_token_bytes=3 * MiB,
    max_sessions_per_token=4,
    max_calls_per_token=4,
    stream_idle_timeout_s=3.0,
    stream_timeout_s=60.0,
    session_idle_timeout_s=None,
    max_shards=3,
    idle_shard_hosts=1,
)
ok = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("security-ckpt")


@pytest.fixture(scope="module")
def gateway(checkpoints):
    gw = serve(
        "127.0.0.1", 0, tokens=[TOKEN, OTHER_TOKEN, ATTACKER], checkpoint_dir=str(checkpoints),
        limits=LIMITS, max_workers=16,
    )  # fmt: skip
    yield gw
    gw.stop(1)


@pytest.fixture
def victim(stub):
    with guarded_victim(stub) as guarded:
        yield guarded


def usage(gateway, token=ATTACKER):
    return gateway.servicer.ledger.usage(principal_of(token))


def eventually(condition, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.05)


def healthy(address) -> bool:
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
    return answer.status == health_pb2.HealthCheckResponse.SERVING


# ----- 1. session options: no code, processes, addresses, paths or other groups -------------


KEYWORD_ONLY = sorted(
    name
    for name, p in inspect.signature(shardopt.ShardedOptimizer.__init__).parameters.items()
    if p.kind == inspect.Parameter.KEYWORD_ONLY
)


def attack_value(option, marker, listener, secret):
    """What an attacker puts under each of ShardedOptimizer's own keyword options."""
    return {
        # Ray runs py_executable through a shell on the worker that starts the shard host
        "actor_options": {"runtime_env": {"py_executable": f"$(touch {marker}) python"}},
        "address": f"127.0.0.1:{listener.getsockname()[1]}",
        "tls": str(secret),
        "token": TOKEN,
        "group": "victim-group",
        "placement": "STRICT_PACK",
        "shard_resources": {"CPU": 1},
        "mode": "async",
        "timeout": 1.0,
    }.get(option, 1)


@pytest.mark.parametrize("option", KEYWORD_ONLY)
def test_session_options_are_only_the_optimizers_constructor_arguments(
    stub, gateway, victim, tmp_path, option
):
    marker, secret = tmp_path / "marker", tmp_path / "secret.pem"
    secret.write_text("not for tenants")
    hosts_before = len(host_pool.hosts())
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.3)
        value = attack_value(option, marker, listener, secret)
        error = error_of(
            lambda: open_session(
                stub, [torch.ones(3)], ATTACKER, hyperparameters={"lr": 0.1, option: value}
            )
        )
        if option == "address":
            with pytest.raises(TimeoutError):  # the gateway connected nowhere
                listener.accept()
    assert error.code() == INVALID
    assert f"unknown hyperparameter {option!r}" in error.details()
    assert not marker.exists()
    assert usage(gateway) == {"sessions": 0, "resident": 0, "buffered": 0}
    assert len(host_pool.hosts()) == hosts_before  # no process was started


def test_a_token_cannot_reach_an_in_cluster_group(stub, victim):
    """Neither a raw ``group`` option nor SessionSpec.group joins a group of a job inside the
    cluster: the first is refused, the second opens a group of the token's own."""
    name = f"in-cluster-{uuid.uuid4().hex[:6]}"
    w = torch.zeros(3)
    inside = shardopt.SGD([w], lr=1.0, group=name, world_size=2, rank=0, mode="async")
    try:
        raw = {"lr": 1.0, "group": name, "world_size": 2, "rank": 1, "mode": "async"}
        error = error_of(lambda: open_session(stub, [torch.ones(3)], ATTACKER, hyperparameters=raw))
        assert error.code() == INVALID and "'group'" in error.details()
        group = pb.GroupOptions(name=name, world_size=2, rank=1, mode="async")
        own = open_session(stub, [torch.ones(3)], ATTACKER, group=group, num_shards=1)
        assert own.created_group  # a group of its own, not the job's
        push(stub, own.session_id, [torch.full((3,), 100.0)], token=ATTACKER)
        step(stub, own.session_id, ATTACKER)
        assert shardopt.list_groups()[name]["members"] == [0]
        inside.pull_params()
        assert torch.equal(w, torch.zeros(3))
        close_session(stub, own.session_id, ATTACKER)
    finally:
        inside.close()


def test_group_placement_and_sizes_are_not_the_clients(stub, victim):
    for group in (
        pb.GroupOptions(name="g", world_size=1, rank=0, placement="STRICT_PACK"),
        pb.GroupOptions(name="g", world_size=1, rank=0, shard_resources={"CPU": 64}),
        pb.GroupOptions(name="g", world_size=1 << 30, rank=0),
        pb.GroupOptions(name="g", world_size=1, rank=0, timeout_seconds=1e9),
        pb.GroupOptions(name="../other", world_size=1, rank=0),
    ):
        code = code_of(lambda g=group: open_session(stub, [torch.ones(3)], ATTACKER, group=g))
        assert code == INVALID, group


def test_session_values_are_plain_data(stub, gateway, victim):
    for hyperparameters in ({"lr": {"a": 1}}, {"lr": 0.1, "betas": [[0.9], [0.99]]}):
        code = code_of(
            lambda h=hyperparameters: open_session(
                stub, [torch.ones(3)], ATTACKER, optimizer="Adam", hyperparameters=h
            )
        )
        assert code == INVALID
    for options in ({"params": [0]}, {f"k{i}": i for i in range(65)}, {"lr": -1.0}):
        group = pb.ParamGroup(params=[0], options=wire.encode_options(options))
        code = code_of(
            lambda g=group: open_session(stub, [torch.ones(3)], ATTACKER, param_groups=[g])
        )
        assert code == INVALID, options
    assert usage(gateway)["sessions"] == 0


# ----- 3. one token cannot starve the others ------------------------------------------------


def test_shards_per_session_are_capped_and_a_closed_sessions_extra_hosts_end(stub, victim):
    hosts_before = len(host_pool.hosts())
    code = code_of(lambda: open_session(stub, [torch.ones(3)], ATTACKER, num_shards=12))
    assert code == EXHAUSTED
    assert len(host_pool.hosts()) == hosts_before
    session = open_session(stub, [torch.ones(3) for _ in range(3)], ATTACKER, num_shards=3)
    pids = [(h, ray.get(h.info.remote())["pid"]) for h in host_pool.hosts()]
    close_session(stub, session.session_id, ATTACKER)
    assert host_pool.idle_hosts() <= LIMITS.idle_shard_hosts
    ended = [pid for h, pid in pids if all(h is not kept for kept in host_pool.hosts())]
    assert ended, "closing a 3-shard session left every host running"

    def gone(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    eventually(lambda: all(gone(pid) for pid in ended), what="the extra hosts' processes ended")


def test_sessions_per_token_are_bounded(stub, gateway, victim):
    opened = [
        open_session(stub, [torch.ones(2)], ATTACKER, num_shards=1).session_id
        for _ in range(LIMITS.max_sessions_per_token)
    ]
    try:
        error = error_of(lambda: open_session(stub, [torch.ones(2)], ATTACKER, num_shards=1))
        assert error.code() == EXHAUSTED and "open sessions" in error.details()
        victim.bystander_steps()  # other tokens are not affected
    finally:
        for session_id in opened:
            close_session(stub, session_id, ATTACKER)
    assert usage(gateway) == {"sessions": 0, "resident": 0, "buffered": 0}


class IdleStreams:
    """Streams that send their first message, then nothing, until released."""

    def __init__(self, method, first_messages, token=ATTACKER):
        self.release = threading.Event()
        self.futures = []
        for first in first_messages:

            def requests(first=first):
                yield first
                self.release.wait(30)

            self.futures.append(method.future(requests(), metadata=auth(token)))

    def codes(self):
        done = [f for f in self.futures if f.done()]
        return [f.exception().code() if f.exception() else ok for f in done]

    def close(self):
        self.release.set()
        for f in self.futures:
            f.cancel()


def test_idle_streams_hold_no_thread_for_long_and_lock_nobody_out(stub, gateway, address, victim):
    """More idle streams than the token may have: the extra ones are refused at once; while
    the others hang, health checks and other tokens are answered; then the watchdog ends them."""
    session = open_session(stub, [torch.ones(3)], ATTACKER, num_shards=1).session_id
    header = pb.PushGradientsHeader(
        session_id=session, params=[0], grads=[wire.spec_of(torch.ones(3))]
    )
    count = 2 * LIMITS.max_calls_per_token
    streams = IdleStreams(stub.PushGradients, [pb.PushGradientsRequest(header=header)] * count)
    try:
        started = time.monotonic()
        eventually(lambda: len(streams.codes()) >= count - LIMITS.max_calls_per_token, 2.0)
        assert streams.codes() == [EXHAUSTED] * (count - LIMITS.max_calls_per_token)
        assert gateway.limiter.in_flight(principal_of(ATTACKER)) == LIMITS.max_calls_per_token
        assert healthy(address)
        victim.bystander_steps()
        pull(stub, victim.session_id)
        assert time.monotonic() - started < LIMITS.stream_idle_timeout_s  # all while they hung
        eventually(lambda: len(streams.codes()) == count, LIMITS.stream_idle_timeout_s + 5)
        assert sorted(streams.codes(), key=str).count(grpc.StatusCode.CANCELLED) == (
            LIMITS.max_calls_per_token
        )
        eventually(lambda: gateway.limiter.in_flight(principal_of(ATTACKER)) == 0, 2.0)
        assert usage(gateway)["buffered"] == 0
    finally:
        streams.close()
        close_session(stub, session, ATTACKER)


def test_declared_bytes_count_against_the_token_before_anything_arrives(
    stub, gateway, address, victim
):
    """Idle uploads that each declare a whole session: the token's quota stops them at its
    bytes, before anything is allocated; other tokens still open sessions of that size."""
    big = tensors_pb.TensorSpec(dtype=tensors_pb.FLOAT32, shape=[LIMITS.max_session_bytes // 4])
    spec = pb.SessionSpec(
        optimizer="SGD", params=[big], hyperparameters=wire.encode_options({"lr": 0.1})
    )
    fit = LIMITS.max_token_bytes // LIMITS.max_session_bytes  # 3 of them
    streams = IdleStreams(stub.OpenSession, [pb.OpenSessionRequest(spec=spec)] * (fit + 1))
    try:
        eventually(lambda: len(streams.codes()) == 1, 2.0)
        assert streams.codes() == [EXHAUSTED]
        assert "token's quota" in next(f for f in streams.futures if f.done()).exception().details()
        assert usage(gateway)["resident"] == fit * LIMITS.max_session_bytes
        assert healthy(address)
        other = open_session(stub, [torch.zeros(LIMITS.max_session_bytes // 4)], OTHER_TOKEN)
        close_session(stub, other.session_id, OTHER_TOKEN)
        eventually(lambda: len(streams.codes()) == fit + 1, LIMITS.stream_idle_timeout_s + 5)
        eventually(lambda: usage(gateway) == {"sessions": 0, "resident": 0, "buffered": 0}, 2.0)
    finally:
        streams.close()


def test_one_sessions_uploads_in_flight_are_bounded(stub, gateway, victim):
    """A session's concurrent uploads share one budget (its largest legal upload)."""
    params = [torch.zeros(16 * 1024)]  # 64 KiB
    session = open_session(stub, params, ATTACKER, num_shards=1).session_id
    budget = LIMITS.upload_budget(64 * 1024)
    state = tensors_pb.TensorSpec(dtype=tensors_pb.UINT8, shape=[budget])
    first = pb.StateDictMessage(header=pb.StateDictHeader(session_id=session, tensors=[state]))
    streams = IdleStreams(stub.LoadStateDict, [first])
    try:
        eventually(lambda: usage(gateway)["buffered"] == budget, 2.0)
        error = error_of(lambda: push(stub, session, [torch.ones(16 * 1024)], token=ATTACKER))
        assert error.code() == EXHAUSTED and "session's bound" in error.details()
        victim.bystander_steps()
    finally:
        streams.close()
        eventually(lambda: usage(gateway)["buffered"] == 0, 5.0)
        close_session(stub, session, ATTACKER)


def test_unused_sessions_expire_and_release_what_they_held():
    limits = Limits(session_idle_timeout_s=1.0, idle_shard_hosts=1, max_shards=1)
    gw = serve("127.0.0.1", 0, tokens=[TOKEN, ATTACKER], limits=limits, max_workers=32)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
            stub = rpc.OptimizerServiceStub(channel)
            idle = open_session(stub, [torch.ones(3)], ATTACKER).session_id
            busy = open_session(stub, [torch.ones(3)], TOKEN).session_id
            push(stub, idle, [torch.ones(3)], token=ATTACKER)  # staged bytes, held until a step
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:  # the busy one is used more often than 1/s
                stub.GetParamGroups(pb.SessionRef(session_id=busy), metadata=auth())
                time.sleep(0.2)
            assert code_of(lambda: step(stub, idle, ATTACKER)) == grpc.StatusCode.NOT_FOUND
            assert not close_session(stub, idle, ATTACKER).closed
            assert usage(gw) == {"sessions": 0, "resident": 0, "buffered": 0}
            push(stub, busy, [torch.ones(3)])
            step(stub, busy)
    finally:
        gw.stop(1)


# ----- 4. checkpoints stay with their token -------------------------------------------------


def test_checkpoints_are_per_token(stub, checkpoints, victim):
    name = f"shared-{uuid.uuid4().hex[:6]}/step-1"
    save = pb.CheckpointRequest(session_id=victim.session_id, path=name)
    stub.SaveCheckpoint(save, metadata=auth(TOKEN))
    victims = checkpoints / token_scope(TOKEN) / name
    written = {p: p.read_bytes() for p in victims.iterdir()}
    attacker = open_session(stub, [torch.ones(6).reshape(2, 3), torch.ones(4)], ATTACKER,
                            optimizer="Adam", num_shards=1).session_id  # fmt: skip
    theirs = state_of(stub, attacker, ATTACKER)
    request = pb.CheckpointRequest(session_id=attacker, path=name)
    error = error_of(lambda: stub.LoadCheckpoint(request, metadata=auth(ATTACKER)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert str(checkpoints) not in error.details()  # no server path in errors
    stub.SaveCheckpoint(request, metadata=auth(ATTACKER))  # lands in the attacker's directory
    assert (checkpoints / token_scope(ATTACKER) / name / ".metadata").exists()
    assert {p: p.read_bytes() for p in victims.iterdir()} == written
    assert_same_state_dict(state_of(stub, attacker, ATTACKER), theirs)
    close_session(stub, attacker, ATTACKER)


def test_symlinks_out_of_a_tokens_checkpoints_are_refused(stub, checkpoints, tmp_path, victim):
    name = f"own-{uuid.uuid4().hex[:6]}"
    stub.SaveCheckpoint(
        pb.CheckpointRequest(session_id=victim.session_id, path=name), metadata=auth(TOKEN)
    )
    victims = checkpoints / token_scope(TOKEN) / name
    written = {p.name: p.read_bytes() for p in victims.iterdir()}
    home = checkpoints / token_scope(ATTACKER)
    (home / "planted").mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    links = {
        "to-victim": victims,  # another token's checkpoint
        "to-outside": outside,  # out of --checkpoint-dir
    }
    for link, target in links.items():
        (home / link).unlink(missing_ok=True)
        (home / link).symlink_to(target, target_is_directory=True)
    metadata = home / "planted" / ".metadata"  # a file inside an own checkpoint
    metadata.unlink(missing_ok=True)
    metadata.symlink_to(victims / ".metadata")
    attacker = open_session(stub, [torch.ones(6).reshape(2, 3), torch.ones(4)], ATTACKER,
                            optimizer="Adam", num_shards=1).session_id  # fmt: skip
    for path in ("to-victim", "to-outside/x", "planted"):
        for call in (stub.SaveCheckpoint, stub.LoadCheckpoint):
            request = pb.CheckpointRequest(session_id=attacker, path=path)
            error = error_of(lambda c=call, r=request: c(r, metadata=auth(ATTACKER)))
            assert error.code() == INVALID, (path, call)
            assert "leads out" in error.details() and str(checkpoints) not in error.details()
    assert list(outside.iterdir()) == []
    assert {p.name: p.read_bytes() for p in victims.iterdir()} == written
    close_session(stub, attacker, ATTACKER)


# ----- 6. the low ones ----------------------------------------------------------------------


def test_weak_tokens_are_refused_at_start():
    for weak in ("replace-me-with-another-long-random-string", "short-token", "a" * 40):
        with pytest.raises(ValueError, match="refused"):
            serve("127.0.0.1", 0, tokens=[TOKEN, weak])


def test_param_group_updates_pass_torchs_checks(stub, victim):
    bad = [
        {"lr": -1.0},
        {"betas": (1.5, 0.999)},
        {"eps": -1e-8},
        {"weight_decay": "a lot"},
        {"foreach": True, "fused": True},
    ]
    for options in bad:
        groups = [pb.ParamGroup(options=wire.encode_options(options))]
        request = pb.UpdateParamGroupsRequest(session_id=victim.session_id, param_groups=groups)
        assert code_of(lambda r=request: stub.UpdateParamGroups(r, metadata=auth())) == INVALID
        push(stub, victim.session_id, [torch.ones(2, 3), torch.ones(4)])
        code = code_of(lambda g=groups: step(stub, victim.session_id, param_groups=g))
        assert code == INVALID, options  # refused before the step: the gradients stay staged


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_parameters_are_invalid_argument(stub, gateway, victim, dtype):
    error = error_of(lambda: open_session(stub, [torch.ones(3, dtype=dtype)], ATTACKER))
    assert error.code() == INVALID and "floating point" in error.details()
    session = open_session(stub, [torch.ones(3)], ATTACKER, num_shards=1).session_id
    header = pb.AddParamGroupHeader(
        session_id=session, params=[wire.spec_of(torch.ones(2, dtype=dtype))]
    )
    request = iter([pb.AddParamGroupRequest(header=header)])
    assert code_of(lambda: stub.AddParamGroup(request, metadata=auth(ATTACKER))) == INVALID
    close_session(stub, session, ATTACKER)
    assert usage(gateway) == {"sessions": 0, "resident": 0, "buffered": 0}


def test_a_client_that_does_not_read_its_download_holds_no_thread_for_long():
    """A download larger than the transport's buffers, never read: the server's thread waits
    on the client (holding no copy of the parameters, nor the session), and the watchdog ends
    the call after the idle timeout."""
    limits = Limits(max_session_bytes=64 * MiB, stream_idle_timeout_s=1.0, idle_shard_hosts=1)
    gw = serve("127.0.0.1", 0, tokens=[ATTACKER], limits=limits, max_workers=32)
    options = [("grpc.max_receive_message_length", wire.MESSAGE_LIMIT)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gw.port}", options=options) as channel:
            stub = rpc.OptimizerServiceStub(channel)
            session = open_session(stub, [torch.zeros(16 * MiB)], ATTACKER, num_shards=1)
            request = pb.PullParametersRequest(session_id=session.session_id)
            started = time.monotonic()
            unread = stub.PullParameters(request, metadata=auth(ATTACKER))
            in_flight = lambda: gw.limiter.in_flight(principal_of(ATTACKER))  # noqa: E731
            eventually(lambda: in_flight() == 1, 2.0)
            time.sleep(0.5)
            # blocked on the client, holding no copy (a pull streams from the parameters)
            assert in_flight() == 1 and usage(gw)["buffered"] == 0
            eventually(lambda: in_flight() == 0, limits.stream_idle_timeout_s + 5)
            assert time.monotonic() - started >= limits.stream_idle_timeout_s
            assert usage(gw)["buffered"] == 0
            assert code_of(lambda: list(unread)) == grpc.StatusCode.CANCELLED
            assert len(pull(stub, session.session_id, ATTACKER)[0]) == 16 * MiB  # reads work
    finally:
        gw.stop(1)


def test_no_other_server_can_share_the_gateways_port(gateway, victim):
    """gRPC binds with ``SO_REUSEPORT`` by default: a second gRPC server of the same user (a Ray
    worker's, or an attacker's) could bind the gateway's port and the kernel would hand it some
    of the tenants' connections (this is how a deploy test's client once met Ray's server and
    ``UNIMPLEMENTED``). The gateway's socket shares with nobody, either way round."""
    from concurrent import futures

    intruder = grpc.server(futures.ThreadPoolExecutor(1))  # gRPC's defaults
    with pytest.raises(RuntimeError, match="Failed to bind"):
        intruder.add_insecure_port(f"127.0.0.1:{gateway.port}")
    squatter = grpc.server(futures.ThreadPoolExecutor(1))
    port = squatter.add_insecure_port("127.0.0.1:0")
    squatter.start()
    idle_before = host_pool.set_max_idle(None)
    host_pool.set_max_idle(idle_before)
    try:
        with pytest.raises(OSError, match="cannot listen on"):
            serve("127.0.0.1", port, tokens=[TOKEN])
        assert host_pool.set_max_idle(idle_before) == idle_before  # a failed serve restores it
    finally:
        squatter.stop(0)


def test_state_that_would_overrun_the_fused_kernel_is_refused(address, victim):
    """A tenant's LoadStateDict with state smaller than its parameter: torch's fused CPU
    kernels, which the shards run, do not check and write past it. Before, the load was taken
    (the session had no state yet to compare with) and the next step aborted the shard host,
    with every other session on it. Now it is refused before anything changes, and the
    victim's session (guarded) never notices."""
    weight = torch.nn.Parameter(torch.ones(64, 64))
    opt = shardopt.AdamW([weight], lr=0.1, num_shards=1, address=address, token=ATTACKER)
    try:
        groups = opt.state_dict()["param_groups"]
        small = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
        with pytest.raises(ValueError, match=r"'exp_avg' of shape \(2,\)"):
            opt.load_state_dict({"state": {0: small}, "param_groups": groups})
        weight.grad = torch.ones_like(weight)
        opt.step()  # the session's shard is alive and steps from no state, as before the load
        assert float(opt.state_dict()["state"][0]["step"]) == 1.0
    finally:
        opt.close()
