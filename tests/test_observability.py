"""What an operator sees (issue #19): a real ``shardopt serve`` scraped for its metrics after
remote steps, ``shardopt status`` against it and from inside the cluster, lifecycle events as
one parseable line each, and the actors' Ray metrics recording. (The events of a lost shard, a
promoted replica and a committed checkpoint are checked where tests/test_ft.py loses them.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid

import pytest
import ray
import torch
from gateway_helpers import drain, stopped, wait_for_line
from helpers import events_in
from test_gateway_ops import sample, scrape

import shardopt
from shardopt.cli import main
from shardopt.core.events import emit, format_event, parse_event
from shardopt.gateway.admission import token_scope

TOKEN = "observability-token-0123456789"
OPERATOR = "observability-operator-987654321"


# ----- events -----------------------------------------------------------------------------------


def test_an_event_is_one_line_of_key_value_pairs(caplog):
    line = format_event(
        "checkpoint_committed", path="/ckpt/run 17/step=3", seconds=0.25, files=2, quote='a"b'
    )
    assert "\n" not in line and line.startswith("event=checkpoint_committed path=")
    assert parse_event(line) == {
        "event": "checkpoint_committed", "path": "/ckpt/run 17/step=3", "seconds": "0.25",
        "files": "2", "quote": 'a"b',
    }  # fmt: skip
    logger = logging.getLogger("shardopt.test")
    with caplog.at_level(logging.INFO, logger="shardopt"):
        emit(logger, "replica_promoted", logging.WARNING, shard=1, node="abc")
    (record,) = [r for r in caplog.records if r.name == "shardopt.test"]
    assert record.levelno == logging.WARNING
    assert parse_event(record.getMessage()) == {
        "event": "replica_promoted",
        "shard": "1",
        "node": "abc",
    }
    with pytest.raises(ValueError, match="unknown event"):
        emit(logger, "no_such_event")


def test_the_actors_ray_metrics_record_in_a_shard_actor():
    """Inside a real shard host (where steps record them), every Ray metric takes a sample."""
    opt = shardopt.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, num_shards=1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()

    def record_each(host):
        from shardopt.actor.metrics import actor_metrics, observe

        names = sorted(actor_metrics())
        tags = {"step": {"optimizer": "SGD", "shard": "0"}}
        return names, [observe(n, 0.01, **tags.get(n, {"mode": "sync"})) for n in names]

    names, recorded = ray.get(opt.backend.handles[0].host.__ray_call__.remote(record_each))
    opt.close()
    assert names == ["round_timeouts", "round_wait", "staleness", "step"]
    assert all(recorded)


# ----- a real `shardopt serve`: metrics, status, event lines -------------------------------------


@pytest.fixture
def served(tmp_path):
    """`shardopt serve` with metrics, an operator's token and info logs, joined to this Ray."""
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    (tmp_path / "operators").write_text(f"{OPERATOR}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "shardopt", "serve", "--port", "0", "--metrics-port", "0",
            "--token-file", str(tmp_path / "tokens"),
            "--operator-token-file", str(tmp_path / "operators"),
            "--ray-address", ray.get_runtime_context().gcs_address, "--grace", "2",
            "--log-level", "info",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        metrics = wait_for_line(process, "metrics on ").removeprefix("metrics on ")
        address = wait_for_line(process, "serving on ").removeprefix("serving on ")
        yield drain(process), address, int(metrics.rpartition(":")[2]), tmp_path
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_metrics_status_and_event_lines(served, capsys):
    process, address, metrics_port, tmp_path = served
    before = scrape(metrics_port)
    model = torch.nn.Linear(3, 2)
    opt = shardopt.SGD(model.parameters(), lr=0.1, num_shards=2, address=address, token=TOKEN)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
    after = scrape(metrics_port)

    def grew(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("shardopt_step_seconds_count", optimizer="SGD", backend="local") == 3
    assert grew("shardopt_shard_step_seconds_count", optimizer="SGD", shard="0") == 3
    assert grew("shardopt_gateway_rpc_seconds_count", method="Step", code="OK") == 3
    assert sample(after, "shardopt_gateway_sessions", scope=token_scope(TOKEN)) == 1

    # shardopt status against the running gateway: the token's session and its shards
    assert main(["status", "--address", address, "--token-file", str(tmp_path / "tokens"),
                 "--json"]) == 0  # fmt: skip
    (session,) = json.loads(capsys.readouterr().out)["sessions"]
    assert (session["optimizer"], session["steps"], session["scope"]) == (
        "SGD",
        3,
        token_scope(TOKEN),
    )
    assert [s["shard"] for s in session["shards"]] == [0, 1]
    assert {s["last_step"] for s in session["shards"]} == {2}
    assert all(s["node"] for s in session["shards"])
    assert main(["status", "--address", address, "--token-file", str(tmp_path / "tokens")]) == 0
    table = capsys.readouterr().out
    assert "sessions: 1" in table and "SGD" in table and token_scope(TOKEN) in table
    argv = ["status", "--address", address, "--all"]
    assert main([*argv, "--token-file", str(tmp_path / "tokens")]) == 1
    assert "AccessDeniedError" in capsys.readouterr().out
    assert main([*argv, "--token-file", str(tmp_path / "operators"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["sessions"]) == 1

    opt.close()
    process.send_signal(signal.SIGTERM)
    code, output = stopped(process)
    assert code == 0, output
    events = events_in(output)
    kinds = [e["event"] for e in events]
    assert {"session_opened", "session_closed", "gateway_stopping"} <= set(kinds)
    opened = next(e for e in events if e["event"] == "session_opened")
    assert (opened["optimizer"], opened["shards"], opened["scope"]) == (
        "SGD",
        "2",
        token_scope(TOKEN),
    )
    assert TOKEN not in json.dumps(events)


# ----- shardopt status in the cluster -----------------------------------------------------------


def test_status_in_the_cluster_shows_groups_optimizers_and_replicas(monkeypatch, capsys):
    name = f"status-{uuid.uuid4().hex[:8]}"
    member = shardopt.SGD(
        [torch.nn.Parameter(torch.ones(4))], lr=0.1, num_shards=1, group=name, world_size=1,
        rank=0,
    )  # fmt: skip
    replicated = shardopt.SGD(
        torch.nn.Linear(3, 2).parameters(), lr=0.1, num_shards=1, replicate=True
    )
    owner = replicated.backend.handles[0].key.partition("/")[0]
    gcs = ray.get_runtime_context().gcs_address
    monkeypatch.setenv("RAY_ADDRESS", gcs)
    try:
        assert main(["status", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        (group,) = [g for g in status["groups"] if g["group"] == name]
        assert (group["world_size"], group["mode"], group["members"]) == (1, "sync", [0])
        (shard,) = group["shards"]
        assert (shard["params"], shard["version"], shard["device"]) == (1, 0, "cpu")
        (mine,) = [o for o in status["optimizers"] if o["owner"] == owner]
        assert mine["optimizer"] == "SGD"
        assert [s["shard"] for s in mine["shards"]] == [0]
        assert all(s["replica"] for s in mine["shards"])  # each shard's replica and its node
        assert main(["status", "--watch", "0.05", "--count", "2"]) == 0
        assert capsys.readouterr().out.count(f"shard groups: {len(status['groups'])}") == 2
        # the command itself, as a driver of its own joining the cluster
        result = subprocess.run(
            [sys.executable, "-m", "shardopt", "status"], capture_output=True, text=True,
            timeout=180, env={**os.environ, "RAY_ADDRESS": gcs},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert name in result.stdout and owner in result.stdout
    finally:
        member.close()
        replicated.close()
        shardopt.close_group(name)


def test_status_needs_a_gateway_or_a_cluster(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["status"]) == 2
    assert "--address" in capsys.readouterr().out
