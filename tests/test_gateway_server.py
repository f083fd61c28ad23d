"""``shardopt serve`` as a real process, TLS, and graceful shutdown of the gateway."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest
import ray
import torch
from gateway_helpers import (
    OTHER_TOKEN,
    auth,
    close_session,
    code_of,
    drain,
    guarded_victim,
    open_session,
    push,
    stopped,
    wait_for_line,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

import shardopt
from shardopt.checkpoint.format import verify
from shardopt.checkpoint.integrity import KEY_ENV, read_key
from shardopt.core import wire
from shardopt.core.proto import pb, rpc
from shardopt.gateway import serve
from shardopt.gateway.admission import token_scope

TOKEN = "serve-test-token-0123456789"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def health_of(address: str, credentials=None) -> int:
    channel = (
        grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_serve_command_trains_a_client_and_shuts_down_gracefully(tmp_path):
    """The CLI joins the session's Ray (--ray-address), serves, signs its checkpoints with the
    key in $SHARDOPT_CHECKPOINT_KEY_FILE, and stops on SIGTERM."""
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# one token per line\n{TOKEN}\n")
    key_file = tmp_path / "checkpoint.key"
    key_file.write_text("b7e151628aed2a6abf7158809cf4f3c762e7160f38b4da56a784d9045190cfef\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[KEY_ENV] = str(key_file)
    process = subprocess.Popen(
        [
            sys.executable, "-m", "shardopt", "serve", "--port", "0",
            "--token-file", str(token_file), "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--ray-address", ray.get_runtime_context().gcs_address, "--grace", "2",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        address = wait_for_line(process, "serving on ").removeprefix("serving on ")
        drain(process)
        assert health_of(address) == health_pb2.HealthCheckResponse.SERVING
        model = torch.nn.Linear(3, 1)
        opt = shardopt.SGD(
            model.parameters(), lr=0.1, address=address, token=TOKEN, reconnect_timeout=1
        )  # a stopped gateway: fail after 1 s of retries
        before = model.weight.detach().clone()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        assert not torch.equal(model.weight, before)
        opt.save_checkpoint("demo/step-1")
        saved = tmp_path / "ckpt" / token_scope(TOKEN) / "demo" / "step-1"  # the token's own
        assert (saved / ".metadata").exists()
        verify(saved, key=read_key(key_file))  # signed
        process.send_signal(signal.SIGTERM)
        code, output = stopped(process)
        assert code == 0 and "shutting down" in output, output
        with pytest.raises(shardopt.ShardUnavailableError):
            opt.step()
    finally:
        if process.poll() is None:
            process.kill()


ROOT = pathlib.Path(__file__).resolve().parent.parent


def env_example() -> dict[str, str]:
    lines = (ROOT / "deploy" / "env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_serve_refuses_placeholder_tokens(tmp_path):
    """deploy/env.example's token, copied unchanged, keeps the gateway from starting."""
    tokens = tmp_path / "tokens"
    tokens.write_text(env_example()["SHARDOPT_TOKEN"] + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "shardopt", "serve", "--port", "0", "--token-file", str(tokens)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "placeholder" in result.stdout and "serving on" not in result.stdout


def test_serve_refuses_an_embedded_ray_without_token_auth_or_a_placeholder_ray_token(
    tmp_path, monkeypatch, capsys
):
    """An embedded Ray listens on all interfaces: it must keep Ray's token auth; and Ray's
    token must not be env.example's placeholder either (both checked before Ray starts)."""
    from shardopt.cli import main

    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert main(["serve", "--port", "0", "--token-file", str(tokens)]) == 2
    assert "RAY_AUTH_MODE=disabled" in capsys.readouterr().out
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_AUTH_TOKEN", env_example()["RAY_AUTH_TOKEN"])
    argv = ["serve", "--port", "0", "--token-file", str(tokens), "--ray-address", "127.0.0.1:1"]
    assert main(argv) == 2
    assert "RAY_AUTH_TOKEN is refused" in capsys.readouterr().out
    assert "RAY_ADDRESS" not in os.environ  # refused before anything was set up


def test_serve_that_cannot_listen_says_so_and_lets_its_ports_go(tmp_path, capsys):
    """A port in use (the gateway's, or its metrics port) ends `shardopt serve` with exit code 1
    and one line that says which address, not a traceback; what it had bound is free again."""
    from concurrent import futures

    from shardopt.cli import main

    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    squatter = grpc.server(futures.ThreadPoolExecutor(1))
    taken = squatter.add_insecure_port("127.0.0.1:0")
    squatter.start()
    try:
        argv = ["serve", "--host", "127.0.0.1", "--token-file", str(tokens)]
        assert main([*argv, "--port", str(taken)]) == 1
        out = capsys.readouterr().out
        assert f"shardopt serve: cannot listen on 127.0.0.1:{taken}" in out
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        assert main([*argv, "--port", str(free), "--metrics-port", str(taken)]) == 1
        assert "shardopt serve: " in capsys.readouterr().out
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", free))  # the gRPC port it had bound was let go
    finally:
        squatter.stop(0)


def test_serve_flags_hold_a_tenant_to_its_quotas(tmp_path):
    """A real `shardopt serve` with tight flags: an attacker's option injection, shard count,
    second session and idle stream are refused or cut off, its unused session expires, and a
    victim and a bystander of other tokens are untouched and keep stepping."""
    attacker = "serve-test-attacker-0123456789"
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKEN}\n{OTHER_TOKEN}\n{attacker}\n")
    marker = tmp_path / "marker"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "shardopt", "serve", "--port", "0",
            "--token-file", str(token_file), "--ray-address", ray.get_runtime_context().gcs_address,
            "--max-shards", "1", "--max-sessions-per-token", "1", "--max-calls-per-token", "2",
            "--max-workers", "16", "--stream-idle-timeout", "1", "--session-idle-timeout", "3",
            "--idle-shard-hosts", "1", "--grace", "1",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        address = wait_for_line(process, "serving on ").removeprefix("serving on ")
        drain(process)
        with grpc.insecure_channel(address) as channel:
            stub = rpc.OptimizerServiceStub(channel)
            with guarded_victim(stub, TOKEN, OTHER_TOKEN) as victim:
                payload = {"runtime_env": {"py_executable": f"$(touch {marker}) python"}}
                injected = {"lr": 0.1, "actor_options": payload}
                attack = lambda **kw: open_session(stub, [torch.ones(2)], attacker, **kw)  # noqa: E731
                assert code_of(lambda: attack(hyperparameters=injected)) == INVALID
                assert code_of(lambda: attack(num_shards=2)) == EXHAUSTED
                session = attack().session_id
                assert code_of(attack) == EXHAUSTED  # one session per token
                header = pb.PushGradientsHeader(
                    session_id=session, params=[0], grads=[wire.spec_of(torch.ones(2))]
                )
                release = threading.Event()

                def idle():
                    yield pb.PushGradientsRequest(header=header)
                    release.wait(30)

                started = time.monotonic()
                assert code_of(lambda: stub.PushGradients(idle(), metadata=auth(attacker))) == (
                    grpc.StatusCode.CANCELLED
                )
                assert time.monotonic() - started < 10
                release.set()
                unused = time.monotonic()
                while time.monotonic() - unused < 4.5:  # --session-idle-timeout 3, and more
                    victim.snapshot()  # the victim's and the bystander's are in use
                    victim.bystander_steps()
                    time.sleep(0.5)
                expired = lambda: push(stub, session, [torch.ones(2)], token=attacker)  # noqa: E731
                assert code_of(expired) == grpc.StatusCode.NOT_FOUND
                close_session(stub, attack().session_id, attacker)  # its quota is free again
            assert not marker.exists()
        process.send_signal(signal.SIGTERM)
        code, output = stopped(process)
        assert code == 0, output
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_refuses_to_run_without_tokens_unless_told():
    result = subprocess.run(
        [sys.executable, "-m", "shardopt", "serve", "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--token-file" in result.stdout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_a_self_signed_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    gateway = serve("127.0.0.1", 0, tokens=[TOKEN], tls_cert=cert, tls_key=key)
    address = f"localhost:{gateway.port}"
    try:
        model = torch.nn.Linear(3, 1)
        opt = shardopt.SGD(model.parameters(), lr=0.1, address=address, token=TOKEN, tls=cert)
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        opt.close()
        with grpc.insecure_channel(address) as channel:  # plaintext to a TLS port fails
            stub = rpc.OptimizerServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.CloseSession(pb.SessionRef(session_id="x"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gateway.stop(1)


def test_graceful_stop_lets_calls_in_flight_finish_and_closes_sessions():
    """A sync step waiting for a missing rank is in flight when stop() begins: health turns
    NOT_SERVING at once, the step still ends with its own answer (the group's timeout, not a
    cancellation), then the sessions close."""
    gateway = serve("127.0.0.1", 0, tokens=[TOKEN])
    address = f"127.0.0.1:{gateway.port}"
    model = torch.nn.Linear(3, 1)
    group = f"drain-{uuid.uuid4().hex[:6]}"
    opt = shardopt.SGD(
        model.parameters(), lr=0.1, address=address, token=TOKEN, group=group, world_size=2,
        rank=0, timeout=3, reconnect_timeout=0,  # (a sync group's step is retried, too)
    )  # fmt: skip
    model(torch.ones(2, 3)).sum().backward()
    outcome = {}

    def step():
        try:
            opt.step()
        except Exception as exc:
            outcome["error"] = exc

    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stepping = threading.Thread(target=step)
        stepping.start()
        time.sleep(0.5)
        stopping = threading.Thread(target=gateway.stop, args=(10,))
        stopping.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stepping.join(30)
        stopping.join(30)
    assert isinstance(outcome.get("error"), shardopt.GroupTimeoutError)
    assert len(gateway.servicer.sessions) == 0
    with pytest.raises(shardopt.ShardUnavailableError):
        opt.step()
