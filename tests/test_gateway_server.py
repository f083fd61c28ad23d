"""``shardopt serve`` as a real process, TLS, and graceful shutdown of the gateway."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import shardopt
from shardopt.admission import token_scope
from shardopt.gateway import serve
from shardopt.proto import pb, rpc

TOKEN = "serve-test-token-0123456789"


def wait_for_line(process: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"no {prefix!r} line from the server (exit code {process.poll()})")


def health_of(address: str, credentials=None) -> int:
    channel = (
        grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_serve_command_trains_a_client_and_shuts_down_gracefully(tmp_path):
    """The CLI joins the session's Ray (--ray-address), serves, and stops on SIGTERM."""
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# one token per line\n{TOKEN}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
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
        assert health_of(address) == health_pb2.HealthCheckResponse.SERVING
        model = torch.nn.Linear(3, 1)
        opt = shardopt.SGD(model.parameters(), lr=0.1, address=address, token=TOKEN)
        before = model.weight.detach().clone()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        assert not torch.equal(model.weight, before)
        opt.save_checkpoint("demo/step-1")
        saved = tmp_path / "ckpt" / token_scope(TOKEN) / "demo" / "step-1"  # the token's own
        assert (saved / ".metadata").exists()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "shutting down" in process.stdout.read()
        with pytest.raises(shardopt.ShardUnavailableError):
            opt.step()
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
        rank=0, timeout=3,
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
