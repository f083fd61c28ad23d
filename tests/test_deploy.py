"""docker-compose.yml's services, run as local processes on loopback (no container engine here).

The commands, environment and health checks are read from docker-compose.yml itself, with
compose's variable interpolation, so the compose file and this test cannot drift apart. Only
what a container would provide is replaced: host names become 127.0.0.1, the token secret and
the checkpoint volume become files in a temporary directory, the ports are free ones, and since
all Ray nodes share this host's network (each container has its own), every ``ray start`` gets
its own free ports for the per-node agents that containers would all run on Ray's defaults,
and the nodes start one after the other.
Then a remote client trains through the gateway on shards spread over the two Ray workers and
the head, and everything is shut down: the gateway gracefully (exit code 0), the Ray nodes with
SIGTERM as ``docker compose down`` does.
"""

from __future__ import annotations

import os
import pathlib
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

import shardopt
from shardopt.gateway.admission import token_scope

ROOT = pathlib.Path(__file__).resolve().parent.parent
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}`` and ``$$``, recursively."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        raise KeyError(f"{name} is required: {arg}")

    return VARIABLE.sub(replace, value).replace("$$", "$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Ports a Ray node binds to at fixed defaults: one free set per node on a shared host."""
    flags = (
        "--node-manager-port", "--object-manager-port", "--metrics-export-port",
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
    )  # fmt: skip
    return [f"{flag}={free_port()}" for flag in flags]


class LocalCompose:
    """The compose services as process groups on this machine."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        self.tmp = tmp
        self.variables = {
            "RAY_AUTH_TOKEN": secrets.token_urlsafe(24),
            "SHARDOPT_TOKEN": secrets.token_urlsafe(24),
            "RAY_HEAD_PORT": str(free_port()),
            "SHARDOPT_PORT": str(free_port()),
            "SHARDOPT_METRICS_PORT": str(free_port()),
            "RAY_OBJECT_STORE_BYTES": str(100 * 2**20),
            "RAY_NODE_CPUS": "2",
            "SHARDOPT_PLACEMENT": "STRICT_SPREAD",  # the operator's: one shard per node
        }
        self.token_file = tmp / "shardopt_tokens"
        self.token_file.write_text(self.variables["SHARDOPT_TOKEN"] + "\n")
        self.checkpoints = tmp / "checkpoints"
        self.checkpoints.mkdir()
        self.replacements = {
            "ray-head": "127.0.0.1",
            "0.0.0.0": "127.0.0.1",
            "/run/secrets/shardopt_tokens": str(self.token_file),
            "/checkpoints": str(self.checkpoints),
        }
        self.processes: dict[str, subprocess.Popen] = {}

    def _local(self, words: list[str]) -> list[str]:
        out = []
        for word in interpolate(words, self.variables):
            for old, new in self.replacements.items():
                word = word.replace(old, new)
            out.append(word)
        if out[:2] == ["ray", "start"]:
            return out[:2] + node_ports() + out[2:]
        return [w.replace("ray start ", "ray start " + " ".join(node_ports()) + " ") for w in out]

    def env(self, service: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env["PATH"]])
        declared = self.compose["services"][service].get("environment", {})
        env.update({k: str(v) for k, v in interpolate(declared, self.variables).items()})
        return env

    def start(self, service: str) -> None:
        command = self._local(self.compose["services"][service]["command"])
        log = open(self.tmp / f"{service}.log", "w")  # noqa: SIM115 - kept open for the process
        self.processes[service] = subprocess.Popen(
            command, env=self.env(service), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def healthy(self, service: str, timeout: float = 120) -> None:
        test = self.compose["services"][service]["healthcheck"]["test"]
        assert test[0] == "CMD"
        command = self._local(test[1:])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[service].poll() is not None:
                break
            probe = subprocess.run(command, env=self.env(service), capture_output=True, timeout=60)
            if probe.returncode == 0:
                return
            time.sleep(1)
        raise AssertionError(f"{service} never became healthy:\n{self.log(service)}")

    def node_up(self, service: str, timeout: float = 120) -> None:
        """Waits for a service's ``ray start`` to report its node running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log(service):
                return
            if self.processes[service].poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"{service}'s Ray node did not start:\n{self.log(service)}")

    def start_gateway(self, attempts: int = 3) -> None:
        """Starts the gateway on ports picked now, once the Ray nodes hold theirs: a Ray process
        may have bound any port that was free before it started (a gateway that still meets
        one fails to listen, loudly, and gets fresh ports)."""
        for attempt in range(attempts):
            for port in ("SHARDOPT_PORT", "SHARDOPT_METRICS_PORT"):
                self.variables[port] = str(free_port())
            self.start("gateway")
            try:
                self.healthy("gateway")
                return
            except AssertionError:
                log = self.log("gateway")
                if attempt + 1 == attempts or not re.search("cannot listen|in use", log):
                    raise
                self.stop("gateway")

    def log(self, service: str) -> str:
        return (self.tmp / f"{service}.log").read_text()[-4000:]

    def stop(self, service: str, grace: float = 20) -> int | None:
        """SIGTERM to the service's process group; SIGKILL what is left after ``grace``."""
        process = self.processes.pop(service, None)
        if process is None:
            return None
        try:
            os.killpg(process.pid, signal.SIGTERM)
            code = process.wait(grace)
        except subprocess.TimeoutExpired:
            code = None
        except ProcessLookupError:
            return process.poll()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the service's leftover children
        except ProcessLookupError:
            pass
        process.wait(30)
        return code


@pytest.fixture
def stack(tmp_path):
    compose = LocalCompose(tmp_path)
    yield compose
    for service in list(compose.processes)[::-1]:
        compose.stop(service, grace=5)


def test_the_compose_services_train_a_remote_client_and_shut_down(stack):
    stack.start("ray-head")
    stack.healthy("ray-head")
    # One node at a time: nodes on one host share Ray's session directory (containers do not)
    # and pick their socket names by counting what is there.
    for service in ("ray-worker-1", "ray-worker-2"):
        stack.start(service)
        stack.node_up(service)
    stack.start_gateway()
    address = f"127.0.0.1:{stack.variables['SHARDOPT_PORT']}"
    token = stack.variables["SHARDOPT_TOKEN"]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    twin.load_state_dict(model.state_dict())
    # One shard on each CPU node (SHARDOPT_PLACEMENT=STRICT_SPREAD; the gateway's node has
    # none): the workers must have joined.
    deadline = time.monotonic() + 120
    while True:
        try:
            opt = shardopt.AdamW(
                model.parameters(), lr=0.01, address=address, token=token, group="deploy",
                world_size=1, rank=0, num_shards=3,
            )  # fmt: skip
            break
        except shardopt.PlacementError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    reference = torch.optim.AdamW(twin.parameters(), lr=0.01, fused=True)
    for _ in range(3):
        x = torch.randn(5, 6)
        for m, o in ((model, opt), (twin, reference)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for got, want in zip(model.parameters(), twin.parameters()):
        assert torch.equal(got, want)
    metrics = f"http://127.0.0.1:{stack.variables['SHARDOPT_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(metrics, timeout=10) as answer:  # compose's published /metrics
        text = answer.read().decode()
    steps = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "shardopt_gateway_rpc_seconds_count"
        and s.labels == {"method": "Step", "code": "OK"}
    ]
    assert steps == [3.0]
    opt.save_checkpoint("deploy/step-3")
    assert (stack.checkpoints / token_scope(token) / "deploy" / "step-3" / ".metadata").exists()
    opt.close()

    assert stack.stop("gateway", grace=60) == 0, stack.log("gateway")
    assert "shutting down" in stack.log("gateway")
    for service in ("ray-worker-2", "ray-worker-1", "ray-head"):
        stack.stop(service)
        assert stack.processes.get(service) is None
