"""Replicated shard groups (replicate=True): a group shard's host SIGKILLed mid-run is replaced
by its replica with nothing lost (see shardopt.actor.group_replica)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from group_workers import GroupWorker, make_data

import shardopt
from shardopt.actor.host import NAMESPACE

HYPER = {"lr": 0.05, "weight_decay": 0.01}
STEPS = 12


def run_group(name: str, kill_at: int | None = None, **options):
    """Two worker threads train STEPS steps; with ``kill_at``, shard 1's host process is
    SIGKILLed once shard 0 reached that version. Returns each rank's parameters and state."""
    x, y = make_data(16)
    options = dict(num_shards=2, timeout=120, world_size=2, **HYPER, **options)
    workers = [GroupWorker() for _ in range(2)]
    for r, w in enumerate(workers):
        w.attach(0, group=name, rank=r, **options)
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(w.train, *halves[r], STEPS) for r, w in enumerate(workers)]
        if kill_at is not None:
            shard0 = ray.get_actor(f"group/{name}/shard/0", namespace=NAMESPACE)
            shard1 = ray.get_actor(f"group/{name}/shard/1", namespace=NAMESPACE)
            pid = ray.get(shard1.info.remote())["pid"]
            deadline = time.monotonic() + 120
            while ray.get(shard0.version.remote()) < kill_at:
                assert time.monotonic() < deadline and not any(r.done() for r in runs)
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
        params = [r.result(timeout=180) for r in runs]
    states = [w.state_dict() for w in workers]
    logs = [w.push_log() for w in workers]
    for w in workers:
        w.close()
    return params, states, logs


@pytest.fixture
def names():
    made = []

    def new():
        made.append(f"replicas-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    for name in made:
        shardopt.close_group(name)


def test_a_killed_group_shard_fails_over_to_its_replica_bit_identically(names):
    reference, reference_state, _ = run_group(names())
    params, state, logs = run_group(names(), kill_at=4, replicate=True)
    for rank in range(2):
        for got, want in zip(params[rank], reference[0]):
            assert torch.equal(got, want)
        for p, st in reference_state[0]["state"].items():
            for key, want in st.items():
                assert torch.equal(state[rank]["state"][p][key], want), (rank, p, key)
        # every round applied once on every shard: versions 0..STEPS-1, none twice
        for s in range(2):
            assert [v for (sh, v, _, _) in logs[rank] if sh == s] == list(range(STEPS))


def test_replicate_options_for_groups_are_checked(names):
    with pytest.raises(ValueError, match="replicate=True"):
        shardopt.AdamW(
            [torch.zeros(2, requires_grad=True)], group=names(), world_size=1, rank=0,
            mode="async", replicate=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="replicate=True"):
        shardopt.AdamW(
            [torch.zeros(2, requires_grad=True)], group=names(), world_size=1, rank=0,
            replicate=3,
        )  # fmt: skip
