"""Elastic sync groups on the session's local Ray: members dropped mid-round, a real SIGKILL of
a worker actor's process, a late joiner (see shardopt.actor.group_membership)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from group_workers import GroupWorker, loss_of, make_data, reference_run

import shardopt
from shardopt.actor.host import NAMESPACE
from shardopt.client.shard_group import make_config

HYPER = {"lr": 0.05, "weight_decay": 0.01}


@pytest.fixture
def name():
    group = f"elastic-{uuid.uuid4().hex[:8]}"
    yield group
    shardopt.close_group(group)


def test_elastic_options_are_checked():
    base = dict(
        mode="sync", max_staleness=None, timeout=5, num_shards=1, placement=None,
        shard_resources=None, actor_options={},
    )  # fmt: skip
    config = make_config(world_size=None, rank=None, elastic=True, heartbeat_timeout=2, **base)
    assert (config.elastic, config.world_size, config.heartbeat_timeout_s) == (True, None, 2.0)
    with pytest.raises(ValueError, match="elastic=True applies to sync groups"):
        make_config(world_size=None, rank=None, elastic=True, **{**base, "mode": "async"})
    with pytest.raises(ValueError, match="Invalid rank"):
        make_config(world_size=2, rank=2, elastic=True, **base)
    with pytest.raises(ValueError, match="Invalid heartbeat_timeout|Invalid timeout"):
        make_config(world_size=None, rank=None, elastic=True, heartbeat_timeout=0, **base)
    with pytest.raises(ValueError, match="Invalid world_size"):  # not elastic: as before
        make_config(world_size=None, rank=0, **base)
    with pytest.raises(ValueError, match="elastic=True applies to shard groups"):
        shardopt.AdamW([torch.zeros(2, requires_grad=True)], elastic=True)


def test_a_member_dropped_mid_round_counts_on_no_shard(name):
    """Rank 2's gradients reach shard 0 only, then its heartbeats stop: the round completes
    without it on both shards (its gradients, 100x the others', are not counted anywhere)."""
    x, y = make_data(16)
    options = dict(num_shards=2, timeout=60, elastic=True, heartbeat_timeout=1.5, **HYPER)
    workers = [GroupWorker() for _ in range(3)]
    for w in workers:  # one after the other: ranks 0, 1, 2, all admitted at round 0
        w.attach(0, group=name, **options)
    assert [w.opt.group.rank for w in workers] == [0, 1, 2]
    dying = workers[2]
    dying.opt.group._heartbeats.stop()  # as if its process hung
    dying.opt.zero_grad()
    loss_of(dying.model, 100 * x, y).backward()
    with ThreadPoolExecutor(3) as pool:
        partial = pool.submit(dying.opt.group._push, [0], {})  # shard 0 only
        halves = [(x[:8], y[:8]), (x[8:], y[8:])]
        runs = [pool.submit(w.train, *halves[r], 1) for r, w in enumerate(workers[:2])]
        params = [r.result(timeout=60) for r in runs]
        partial.result(timeout=60)
    expected = reference_run(1, x, y, **HYPER)
    for got, other, want in zip(*params, expected):
        assert torch.equal(got, other)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for w in workers[:2]:
        assert [r.participants for r in w.opt.group.last_push] == [(0, 1), (0, 1)]
    view = workers[0].opt.group.members()
    assert view["members"] == {0: 0, 1: 0} and view["participants"] == {0: (0, 1)}
    assert "heartbeat" in view["dropped"][2]
    for w in workers:
        w.close()


def _wait_for_round(members, round_: int, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while ray.get(members.view.remote())["round"] < round_:
        assert time.monotonic() < deadline, "the group made no progress"
        time.sleep(0.05)


def test_sigkill_of_an_elastic_worker_and_a_late_joiner(name):
    """Three worker actors; rank 2's process is SIGKILLed mid-run: the others go on within
    heartbeat_timeout (plus seconds), with identical parameters. A worker that joins later
    adopts the current parameters and steps in lockstep with them."""
    heartbeat_timeout = 3.0
    x, y = make_data(24)
    data = [(x[8 * r : 8 * r + 8], y[8 * r : 8 * r + 8]) for r in range(3)]
    options = dict(
        num_shards=2, timeout=120, elastic=True, heartbeat_timeout=heartbeat_timeout, **HYPER
    )
    worker = ray.remote(GroupWorker).options(num_cpus=0)
    actors = [worker.remote() for _ in range(3)]
    for a in actors:
        ray.get(a.attach.remote(0, group=name, **options))
    assert ray.get([a.rank.remote() for a in actors]) == [0, 1, 2]
    pid = ray.get(actors[2].pid.remote())
    members = ray.get_actor(f"group/{name}/members", namespace=NAMESPACE)

    steps = 30
    runs = [a.train.remote(*data[r], steps) for r, a in enumerate(actors)]
    _wait_for_round(members, 4)
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    survivors = ray.get(runs[:2], timeout=120)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(runs[2], timeout=60)
    for got, other in zip(*survivors):
        assert torch.equal(got, other)
    times, participants = ray.get(actors[0].history.remote())
    assert participants == ray.get(actors[1].history.remote())[1]
    cut = participants.index((0, 1))
    assert cut >= 4 and participants[:cut] == [(0, 1, 2)] * cut
    assert participants[cut:] == [(0, 1)] * (steps - cut)
    resumed = times[cut] - killed_at
    print(f"first round without the killed worker completed {resumed:.2f} s after the kill")
    assert resumed < heartbeat_timeout + 10
    log = ray.get(actors[0].push_log.remote())
    assert [v for (s, v, _, _) in log if s == 0] == list(range(steps))

    joiner = worker.remote()
    adopted = ray.get(joiner.attach.remote(7, group=name, **options))  # another seed
    for got, want in zip(adopted, survivors[0]):
        assert torch.equal(got, want)  # the current parameters, not its own
    assert ray.get(joiner.rank.remote()) == 3  # rank 2 is not reused
    more = ray.get(
        [a.train.remote(*data[i], 3) for i, a in enumerate([actors[0], actors[1], joiner])]
    )
    for params in more[1:]:
        for got, want in zip(params, more[0]):
            assert torch.equal(got, want)
    joined_log = ray.get(joiner.push_log.remote())
    assert [v for (s, v, _, _) in joined_log if s == 0] == [steps, steps + 1, steps + 2]
    assert ray.get(joiner.history.remote())[1] == [(0, 1, 3)] * 3
    view = ray.get(members.view.remote())
    assert view["members"] == {0: 0, 1: 0, 3: steps}
    assert set(view["dropped"]) == {2}
    for a in [actors[0], actors[1], joiner]:
        ray.get(a.close.remote())
