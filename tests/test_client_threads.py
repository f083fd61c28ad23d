"""Torch threads: each CPU shard's (shardopt.actor.threads: the node's CPUs, and the machine's,
split among the shards there) and the client's during a step (shardopt.core.omp_threads,
LocalShards.copy_threads).

A step's copies on the client run on one OpenMP thread while CPU shards on its node step on the
node's CPUs (so that no idle OpenMP worker spins on the CPUs the shards step on), and only in
the thread that steps and only for the update: the closure, the copy-back after the last shard
answered, other threads and everything after the step keep their team size.
"""

from __future__ import annotations

import threading

import pytest
import ray
import torch
from helpers import assert_same_params, make_model, square_step

import shardopt
from shardopt.actor.threads import cgroup_cpu_quota, threads_left, usable_cpus
from shardopt.core import omp_threads

needs_openmp = pytest.mark.skipif(
    omp_threads.runtime() is None or torch.get_num_threads() < 2,
    reason="needs torch on an OpenMP runtime with 2 threads or more",
)


@needs_openmp
def test_at_most_cuts_this_threads_team_and_restores_it():
    before = torch.get_num_threads()
    seen: dict[str, int] = {}

    def other() -> None:
        seen["other"] = torch.get_num_threads()

    with omp_threads.at_most(1):
        seen["inside"] = torch.get_num_threads()
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        with omp_threads.at_most(1):  # nested: no change, and the outer block's size after it
            seen["nested"] = torch.get_num_threads()
        seen["after nested"] = torch.get_num_threads()
    assert seen == {"inside": 1, "other": before, "nested": 1, "after nested": 1}
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError):  # restored on the way out of an exception too
        with omp_threads.at_most(1):
            raise KeyError("x")
    assert torch.get_num_threads() == before


@needs_openmp
def test_at_most_leaves_the_team_alone_for_none_or_more_threads():
    before = torch.get_num_threads()
    for limit in (None, before, before + 3):
        with omp_threads.at_most(limit):
            assert torch.get_num_threads() == before
    with omp_threads.at_most(0):  # at least one thread
        assert torch.get_num_threads() == 1


@needs_openmp
def test_copies_under_one_thread_give_the_same_bytes():
    src = torch.randn(3_000_000)
    want = src.clone()
    got = torch.empty_like(src)
    with omp_threads.at_most(1):
        got.copy_(src)
    assert torch.equal(got, want)


def test_threads_left_counts_the_cpus_the_shards_on_this_node_leave():
    here = ray.get_runtime_context().get_node_id()
    cpus = int(ray.cluster_resources()["CPU"])  # the session's one node
    left = threads_left  # with as many usable CPUs as Ray counts
    assert left(here, [here, here], ["cpu", "cpu"], [cpus // 2, cpus // 2], 1, cpus) == 1
    assert left(here, [here], ["cpu"], [1], 1, cpus) == cpus - 1
    assert left(here, [here, here], ["cpu", "cpu"], [None, None], 1.0, cpus) == cpus - 2
    assert left(here, ["elsewhere"], ["cpu"], [cpus], 1, cpus) is None
    assert left(here, [here], ["cuda:0"], [None], 1, cpus) is None
    # a machine with fewer CPUs than Ray was told: what the shards leave of those
    assert left(here, [here], ["cpu"], [1], 1, cpus_here=cpus + 8) == cpus - 1
    assert left(here, [here], ["cpu"], [1], 1, cpus_here=3) == 2
    assert left(here, [here, here], ["cpu", "cpu"], [1, 1], 1, cpus_here=2) == 1


def host_threads(host) -> int:
    """The torch threads a shard host runs with."""
    return ray.get(host.__ray_call__.remote(lambda self: torch.get_num_threads()))


def test_shards_never_get_more_threads_than_the_machine_has_cpus():
    """The session's Ray counts 4 CPUs (``ray.init(num_cpus=4)``), more than a 2-core machine
    has: each shard's host gets the machine's CPUs split among the shards on it where they are
    fewer than the node's (an AdamW step over 1,923 small tensors on 2 shards: 62.7 ms with 2
    threads per shard on 2 cores, 30.3 ms with one); a single shard gets them all. (A group's
    shards: test_group.py's pooled-hosts test; raylets sharing a machine: test_plain_cluster.py.)
    """
    node_cpus = int(ray.cluster_resources()["CPU"])
    machine = usable_cpus()
    for num_shards in (1, 2):
        model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
        with shardopt.AdamW(model.parameters(), num_shards=num_shards) as opt:
            want = max(1, min(node_cpus // num_shards, machine // num_shards))
            assert opt.backend.threads == [want] * num_shards
            assert [host_threads(h.host) for h in opt.backend.handles] == [want] * num_shards
            model(torch.randn(2, 4)).sum().backward()
            opt.step()


@pytest.mark.parametrize(
    ("v2", "v1", "want"),
    [
        ("max 100000", None, None),  # no quota
        ("400000 100000", None, 4),
        ("150000 100000", None, 1),  # 1.5 CPUs: one thread's worth
        ("50000 100000", None, 1),  # at least one
        (None, ("-1", "100000"), None),  # cgroup v1, no quota
        (None, ("300000", "100000"), 3),
        (None, None, None),  # no cgroup files
        ("garbage", ("200000", "100000"), 2),  # an unreadable v2 file: v1's
    ],
)
def test_a_cgroup_cpu_quota_is_read_in_whole_cpus(tmp_path, v2, v1, want):
    v2_path = tmp_path / "cpu.max"
    v1_paths = (tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us")
    if v2 is not None:
        v2_path.write_text(v2 + "\n")
    if v1 is not None:
        for path, value in zip(v1_paths, v1):
            path.write_text(value + "\n")
    assert cgroup_cpu_quota(str(v2_path), tuple(str(p) for p in v1_paths)) == want


def test_usable_cpus_are_this_processs_affinity_within_its_quota():
    import os

    quota = cgroup_cpu_quota()
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus() == max(1, affinity if quota is None else min(affinity, quota))


@needs_openmp
def test_a_steps_copies_run_on_one_thread_while_shards_step_and_the_closure_on_all():
    before = torch.get_num_threads()
    model, ref = make_model(seed=3), make_model(seed=3)
    opt = shardopt.Adam(model.parameters(), lr=0.01, num_shards=2)
    want = torch.optim.Adam(ref.parameters(), lr=0.01, fused=True)  # what the shards run
    backend = opt._backend
    assert backend.copy_threads == 1  # two CPU shards on this node take its CPUs
    seen: dict[str, list[int]] = {"pack": [], "copy back": [], "closure": []}
    pack, copy_back = backend.data_path.pack_grads, backend.shard_map.copy_back

    def spy(name, method):
        def call(*args, **kwargs):
            seen[name].append(torch.get_num_threads())
            return method(*args, **kwargs)

        return call

    backend.data_path.pack_grads = spy("pack", pack)
    backend.shard_map.copy_back = spy("copy back", copy_back)
    try:
        for seed in range(3):
            x = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed))
            square_step(ref, want, x)
            square_step(model, opt, x)
            assert_same_params(model, ref)
            assert torch.get_num_threads() == before

            def closure(x: torch.Tensor = x) -> torch.Tensor:
                seen["closure"].append(torch.get_num_threads())
                opt.zero_grad()
                loss = model(x).square().mean()
                loss.backward()
                return loss

            opt.step(closure)
            want.zero_grad()
            ref(x).square().mean().backward()
            want.step()
            assert_same_params(model, ref)
    finally:
        opt.close()
    assert set(seen["pack"]) == {1}
    # the first shard's parameters come back while the other still steps; the last one's on
    # every thread (every shard is done: the node's CPUs are free again)
    assert seen["copy back"] == [1, before] * 6
    assert seen["closure"] == [before] * 3
    assert torch.get_num_threads() == before
