"""Replicated shard groups (replicate=k): group shard hosts SIGKILLed mid-run (a primary, a
primary with one of its replicas in an elastic group, a replica alone) or hung (SIGSTOP) are
replaced with nothing lost, and the round in flight is applied once (see
shardopt.actor.group_replica)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from group_workers import GroupWorker, make_data, sync_reference

import shardopt
from shardopt.client.shard_group import list_groups, registry

HYPER = {"lr": 0.05, "weight_decay": 0.01}
STEPS = 12


def hosts_of(name: str, shard: int) -> tuple:
    """Shard ``shard``'s primary and replicas now (from the registry)."""
    return ray.get(registry().hosts_of.remote(name, shard))


def pid_of(host) -> int:
    return ray.get(host.info.remote())["pid"]


def run_group(name: str, kills: dict[int, Callable[[], None]] | None = None, **options):
    """Two worker threads train STEPS steps; ``kills``: version of shard 0 -> what to kill
    once it is reached. Returns the workers (still attached) and each rank's parameters."""
    x, y = make_data(16)
    options = dict(num_shards=2, timeout=120, world_size=2, **HYPER) | options
    workers = [GroupWorker() for _ in range(2)]
    for r, w in enumerate(workers):
        w.attach(0, group=name, rank=r, **options)
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(w.train, *halves[r], STEPS) for r, w in enumerate(workers)]
        deadline = time.monotonic() + 120
        for version, kill in sorted((kills or {}).items()):
            while ray.get(hosts_of(name, 0)[0].version.remote()) < version:
                assert time.monotonic() < deadline and not any(r.done() for r in runs)
                time.sleep(0.01)
            kill()
        params = [r.result(timeout=180) for r in runs]
    return workers, params


def assert_same_run(workers, params, reference, shards: int = 2) -> None:
    """Bit-identical to the reference run, every round applied once on every shard."""
    ref_params, ref_state = reference
    for rank, w in enumerate(workers):
        for got, want in zip(params[rank], ref_params):
            assert torch.equal(got, want)
        state = w.state_dict()
        for p, st in ref_state["state"].items():
            for key, want in st.items():
                assert torch.equal(state["state"][p][key], want), (rank, p, key)
        # every round applied once on every shard: versions 0..STEPS-1, none twice
        for s in range(shards):
            assert [v for (sh, v, _, _) in w.push_log() if sh == s] == list(range(STEPS))


def wait_for_replicas(name: str, want: list[int], limit_s: float = 90) -> None:
    deadline = time.monotonic() + limit_s
    while list_groups()[name]["replicas"] != want:
        assert time.monotonic() < deadline, list_groups()[name]
        time.sleep(0.05)


@pytest.fixture
def names():
    made = []

    def new():
        made.append(f"replicas-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    for name in made:
        shardopt.close_group(name)


@pytest.fixture(scope="module")
def reference():
    """An uninterrupted sync group's run, computed without Ray: its parameters and state."""
    x, y = make_data(16)
    return sync_reference(STEPS, [(x[:8], y[:8]), (x[8:], y[8:])], **HYPER)


def test_a_killed_group_shard_fails_over_to_its_replica_bit_identically(names, reference):
    """replicate=True: shard 1's primary SIGKILLed mid-run, later shard 0's replica alone:
    nothing lost, the lost replica rebuilt. A load then reaches the rebuilt replica; shard 0's
    primary SIGKILLed between rounds: a state_dict and a pull fail over too."""
    name = names()
    kill_primary = lambda: os.kill(pid_of(hosts_of(name, 1)[0]), signal.SIGKILL)  # noqa: E731
    kill_replica = lambda: os.kill(pid_of(hosts_of(name, 0)[1][0]), signal.SIGKILL)  # noqa: E731
    workers, params = run_group(name, {4: kill_primary, 8: kill_replica}, replicate=True)
    assert_same_run(workers, params, reference)
    wait_for_replicas(name, [1, 1])
    for s in range(2):  # replicated groups' hosts make no shared-memory files a kill leaves
        assert ray.get(hosts_of(name, s)[0].info.remote())["shm_files"] == []
    assert [w.opt.group.uses_shared_memory for w in workers] == [[False, False]] * 2

    # a load reaches the replicas the registry knows now (shard 0's was rebuilt: the
    # workers' memberships name the lost one)
    changed = workers[0].state_dict()
    for st in changed["state"].values():
        st["exp_avg"].mul_(2)
    workers[0].opt.load_state_dict(changed)

    os.kill(pid_of(hosts_of(name, 0)[0]), signal.SIGKILL)
    state = workers[0].state_dict()  # meets the dead primary: the rebuilt replica answers
    for p, st in reference[1]["state"].items():
        for key, want in st.items():
            want = want * 2 if key == "exp_avg" else want
            assert torch.equal(state["state"][p][key], want), (p, key)
    for p in workers[1].model.parameters():
        p.data.zero_()
    workers[1].opt.group.pull_params()  # its handle is on the dead primary
    for got, want in zip(workers[1].params(), reference[0]):
        assert torch.equal(got, want)
    for w in workers:
        w.close()


def test_two_replicas_survive_a_primary_and_a_replica_killed_together(names, reference):
    """replicate=2 (one shard: the same numbers as two) in an elastic group: the primary and
    one of its replicas SIGKILLed at once: the new primary takes the coordinator's decisions of
    the rounds in flight, so nothing is lost, each round is applied once over both workers, and
    the group is back at two replicas."""
    name = names()

    def kill_primary_and_replica() -> None:
        primary, replicas = hosts_of(name, 0)
        pids = [pid_of(primary), pid_of(replicas[0])]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    workers, params = run_group(
        name, {4: kill_primary_and_replica}, replicate=2, num_shards=1, elastic=True,
        heartbeat_timeout=30,
    )  # fmt: skip
    assert_same_run(workers, params, reference, shards=1)
    assert [w.opt.group.participants for w in workers] == [(0, 1), (0, 1)]
    wait_for_replicas(name, [2])
    assert ray.get(hosts_of(name, 0)[0].replica_count.remote()) == 2
    for w in workers:
        w.close()


def test_replicate_options_for_groups_are_checked(names):
    with pytest.raises(ValueError, match="replicate=True"):
        shardopt.AdamW(
            [torch.zeros(2, requires_grad=True)], group=names(), world_size=1, rank=0,
            mode="async", replicate=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="Invalid replicate: 9"):
        shardopt.AdamW(
            [torch.zeros(2, requires_grad=True)], group=names(), world_size=1, rank=0,
            replicate=9,
        )  # fmt: skip


def test_a_hung_replica_is_dropped_after_the_timeout_and_rebuilt(names, reference):
    """A replica that stops answering (its process SIGSTOPped: alive, hung) holds a round up
    for the group's timeout (4 s) at most: the primary drops it, the run goes on bit-identical, and
    the registry builds a replacement, so the group is back at one replica per shard."""
    name = names()
    stopped: list[int] = []

    def hang_replica() -> None:
        stopped.append(pid_of(hosts_of(name, 0)[1][0]))
        os.kill(stopped[0], signal.SIGSTOP)

    try:
        start = time.monotonic()
        workers, params = run_group(
            name, {4: hang_replica}, replicate=True, timeout=4, num_shards=1
        )
        elapsed = time.monotonic() - start
        assert_same_run(workers, params, reference, shards=1)
        wait_for_replicas(name, [1])
        replica = hosts_of(name, 0)[1][0]
        assert pid_of(replica) != stopped[0]  # a new process, answering
        assert ray.get(replica.version.remote()) == STEPS
        assert elapsed < 60  # one round held up for 4 s, not the default 5 minutes
    finally:
        for pid in stopped:  # the registry killed it; a stopped process may need the push
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for w in workers:
        w.close()
