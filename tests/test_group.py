"""Shard groups on the session's local Ray: many workers (threads here), one sharded optimizer.

The multi-node ring (placement, workers as Ray actors on several nodes) is
tests/test_group_cluster.py.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from group_workers import GroupWorker, loss_of, make_data, make_model, reference_run
from helpers import grads_of_ones, interrupt_a_step, sgd_on_ones

import shardopt
from shardopt.actor import placement
from shardopt.actor.threads import usable_cpus
from shardopt.client.shard_group import list_groups
from shardopt.client.shard_group import registry as group_registry
from shardopt.core import shm

HYPER = {"lr": 0.05, "weight_decay": 0.01}


@pytest.fixture
def name():
    """A fresh group name, torn down after the test."""
    group = f"test-{uuid.uuid4().hex[:8]}"
    yield group
    shardopt.close_group(group)


def run_ranks(world_size: int, work):
    """Runs ``work(rank)`` for every rank in its own thread; returns the results by rank."""
    with ThreadPoolExecutor(world_size) as pool:
        return list(pool.map(work, range(world_size)))


def attach(name: str, world_size: int, rank: int, seed: int = 0, **options) -> GroupWorker:
    worker = GroupWorker()
    options = {"num_shards": 2, "timeout": 30, **HYPER, **options}
    worker.attach(seed, group=name, world_size=world_size, rank=rank, **options)
    return worker


@pytest.mark.parametrize("world_size", [2, 4])
def test_sync_workers_on_slices_equal_one_worker_on_the_whole_batch(name, world_size):
    x, y = make_data(16)
    per = 16 // world_size

    def work(rank):
        worker = attach(name, world_size, rank)
        sl = slice(rank * per, (rank + 1) * per)
        params = worker.train(x[sl], y[sl], steps=8)
        log = worker.push_log()
        worker.close()
        return params, log

    results = run_ranks(world_size, work)
    expected = reference_run(8, x, y, **HYPER)
    for params, log in results:
        for got, first, want in zip(params, results[0][0], expected):
            assert torch.equal(got, first)  # every rank holds the very same parameters
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert [v for (s, v, _, _) in log if s == 0] == list(range(8))  # one version per step
        assert all(read == applied for (_, read, applied, _) in log)


def test_sync_matches_torch_state_dict_format(name):
    x, y = make_data(16)

    def work(rank):
        worker = attach(name, 2, rank)
        worker.train(x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8], steps=3)
        return worker

    workers = run_ranks(2, work)
    model = make_model(0)
    reference = torch.optim.AdamW(model.parameters(), fused=True, **HYPER)
    for _ in range(3):
        reference.zero_grad()
        loss_of(model, x, y).backward()
        reference.step()
    expected = reference.state_dict()
    for worker in workers:
        got = worker.state_dict()
        assert list(got["state"]) == list(expected["state"])
        for pid, state in expected["state"].items():
            assert set(got["state"][pid]) == set(state)
            for key, value in state.items():
                torch.testing.assert_close(got["state"][pid][key], value, rtol=1e-5, atol=1e-6)
        assert [g["params"] for g in got["param_groups"]] == [
            g["params"] for g in expected["param_groups"]
        ]
    for worker in workers:
        worker.close()


def test_sync_step_times_out_naming_the_missing_rank_and_changes_nothing(name):
    x, y = make_data(8)
    lonely = attach(name, 2, 0, timeout=1.5)
    before = lonely.params()
    with pytest.raises(shardopt.GroupTimeoutError, match=r"rank\(s\) \[1\]"):
        lonely.train(x, y, steps=1)
    lonely.opt.pull_params()
    for got, want in zip(lonely.params(), before):
        assert torch.equal(got, want)
    assert lonely.opt.state_dict()["state"] == {}
    # The group still works once the other rank arrives (the withdrawn push is pushed again).
    late = GroupWorker()
    late.attach(0, group=name, world_size=2, rank=1, num_shards=2, timeout=1.5, **HYPER)
    results = run_ranks(2, lambda r: (lonely, late)[r].train(x, y, steps=2))
    expected = reference_run(2, x, y, **HYPER)
    for got, want in zip(results[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    lonely.close()
    late.close()


def test_shared_memory_and_the_object_store_give_the_same_bits(name):
    """Workers on the shards' node push through gradient slots and read the shard's parameter
    buffer (with share_params, their parameters are that buffer); with shared_memory=False the
    same run goes through the object store, bit for bit."""
    x, y = make_data(8)
    variants = {"shm": {}, "store": {"shared_memory": False}, "share": {"share_params": True}}
    runs = {}
    for label, options in variants.items():
        group = f"{name}-{label}"

        def work(rank, group=group, options=options):
            worker = attach(group, 2, rank, **options)
            uses = (worker.opt.uses_shared_memory, len(worker.opt.group.lanes))
            params = worker.train(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4], 3)
            buffers = [worker.opt.group.data_path.group_params(s) for s in range(2)]
            spans = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in buffers if b is not None]
            inside = [
                any(a <= p.data_ptr() < z for a, z in spans) for p in worker.model.parameters()
            ]
            worker.close()
            return uses, params, inside

        try:
            runs[label] = run_ranks(2, work)
        finally:
            shardopt.close_group(group)
    # (shared memory per shard, push lanes): a rank on the shards' node pushes over lanes
    assert [r[0] for r in runs["shm"]] == [r[0] for r in runs["share"]] == [([True, True], 2)] * 2
    assert [r[0] for r in runs["store"]] == [([False, False], 0)] * 2
    assert all(all(r[2]) for r in runs["share"])  # the parameters are the shards' buffers
    assert not any(any(r[2]) for r in runs["shm"])
    for label in ("shm", "share"):
        for (_, a, _), (_, b, _) in zip(runs[label], runs["store"]):
            assert all(torch.equal(p, q) for p, q in zip(a, b))


def _close_push_lane(host, rank):
    host._lanes[rank].close()


def test_a_closed_groups_hosts_serve_the_next_group_from_a_clean_start(name):
    """A closed plain group's hosts wait in the registry's pool: the next group runs on the very
    same processes, from its own parameters and fresh optimizer state (bit-identical to
    torch), with no file of the first group left. Its pushes go over lanes, and through Ray
    once a lane breaks, with the same bits."""
    x, y = make_data(8)
    first = attach(name, 1, 0, seed=3)
    first.train(x, y, steps=2)
    registry = group_registry()
    hosts, _ = ray.get(registry.primary_hosts.remote(name))
    infos = ray.get([h.info.remote() for h in hosts])
    first_files = {f for i in infos for f in os.listdir("/dev/shm") if f"-{i['pid']}-" in f}
    first.close()
    assert name not in list_groups()
    assert ray.get(registry.pooled_hosts.remote()) >= 2
    second_name = f"{name}-next"
    try:
        second = attach(second_name, 1, 0)
        hosts, keys = ray.get(registry.primary_hosts.remote(second_name))
        assert {i["pid"] for i in ray.get([h.info.remote() for h in hosts])} == {
            i["pid"] for i in infos
        }
        assert not first_files & set(os.listdir("/dev/shm"))  # the first group's files
        # each host's torch threads: the node's CPUs, or the machine's if fewer, split in two
        cpus = min(int(ray.cluster_resources()["CPU"]), usable_cpus())
        threads = [h.__ray_call__.remote(lambda self: torch.get_num_threads()) for h in hosts]
        assert ray.get(threads) == [max(1, cpus // 2)] * 2
        assert len(second.opt.group.lanes) == 2
        second.train(x, y, steps=2)
        ray.get(hosts[0].__ray_call__.remote(_close_push_lane, 0))
        params = second.train(x, y, steps=2)  # shard 0's pushes now go through Ray
        assert len(second.opt.group.lanes) == 1
        expected = reference_run(4, x, y, **HYPER)
        assert all(torch.equal(p, q) for p, q in zip(params, expected))
        assert ray.get([h.version.remote() for h in hosts]) == [4, 4]
        second.close()
    finally:
        shardopt.close_group(second_name)


def test_late_joiner_gets_the_current_parameters(name):
    x, y = make_data(8)
    first = attach(name, 2, 0, mode="async")
    trained = first.train(x, y, steps=3)
    late = GroupWorker()
    adopted = late.attach(5, group=name, world_size=2, rank=1, mode="async", num_shards=2,
                          timeout=30, **HYPER)  # fmt: skip
    for got, want in zip(adopted, trained):
        assert torch.equal(got, want)
    assert late.opt.group.versions == first.opt.group.versions == [3, 3]
    first.close()
    late.close()


def test_async_workers_here_copy_the_shards_own_buffer_under_its_read_gate(name):
    """Async workers on the shards' node copy the shards' own parameter buffers under their
    read gates (the shard copies nothing per answer): a worker that pulls gets the newest
    version and counts its next push from there. A worker whose parameters are its shared
    buffer (share_params) gets a buffer of its own, which only its own answers change."""
    x, y = make_data(8)
    plain = attach(name, 2, 0, mode="async")
    sharing = attach(name, 2, 1, mode="async", share_params=True)
    paths = plain.opt.group.data_path, sharing.opt.group.data_path
    assert all(paths[0].read_gate(s) is not None for s in range(2))
    assert all(paths[1].read_gate(s) is None for s in range(2))
    own = [paths[1].group_params(s) for s in range(2)]
    spans = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in own]
    assert all(any(a <= p.data_ptr() < z for a, z in spans) for p in sharing.model.parameters())
    plain.train(x[:4], y[:4], steps=1)  # version 1
    at_two = sharing.train(x[4:], y[4:], steps=1)  # read at 0, applied at 1: version 2
    assert sharing.push_log() == [(0, 0, 1, 1), (1, 0, 1, 1)]
    plain.opt.pull_params()
    assert plain.opt.group.versions == [2, 2]
    assert all(torch.equal(p, q) for p, q in zip(plain.params(), at_two))
    plain.train(x[:4], y[:4], steps=1)
    assert plain.push_log()[-2:] == [(0, 2, 2, 0), (1, 2, 2, 0)]  # counted from what it read
    assert all(torch.equal(p, q) for p, q in zip(sharing.params(), at_two))  # not its answer
    plain.close()
    sharing.close()


def test_async_workers_never_copy_half_an_update(name):
    """Three async workers push at once to one shard whose parameters they copy in shared
    memory while the others' pushes apply. Gradients are all ones and SGD's lr 0.5, so the
    parameters at version v are -0.5 * v in every element: after every step each worker's
    parameters must be that, at the version it says it read (a copy that overlapped an
    update would mix two versions)."""

    def work(rank):
        param = torch.nn.Parameter(torch.zeros(2_000_000))
        opt = shardopt.SGD([param], lr=0.5, group=name, world_size=3, rank=rank,
                           mode="async", num_shards=1, timeout=30)  # fmt: skip
        assert opt.group.data_path.read_gate(0) is not None
        seen = []
        for _ in range(25):
            param.grad = torch.ones_like(param)
            opt.step()
            seen.append((opt.group.versions[0], param.min().item(), param.max().item()))
        opt.close()
        return seen

    seen = [entry for entries in run_ranks(3, work) for entry in entries]
    assert all(low == high == -0.5 * version for version, low, high in seen), seen
    assert max(version for version, _, _ in seen) >= 73  # every push applied (75 in all)


def test_async_without_bound_applies_every_push(name):
    x, y = make_data(12)

    def work(rank):
        worker = attach(name, 3, rank, mode="async")
        worker.train(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4], steps=5)
        return worker

    workers = run_ranks(3, work)
    log = [entry for w in workers for entry in w.push_log()]
    for shard in (0, 1):
        applied = sorted(a for (s, _, a, _) in log if s == shard)
        assert applied == list(range(15))  # every push applied, each at its own version
    assert workers[0].opt.group.versions != [0, 0]
    for w in workers:
        w.close()


def test_async_staleness_zero_is_a_serial_run(name):
    """With max_staleness=0 every applied gradient was computed on the parameters it updates:
    replaying the applied pushes in version order on plain torch gives the group's result."""
    x, y = make_data(12)
    slices = [slice(r * 4, (r + 1) * 4) for r in range(3)]

    def work(rank):
        worker = GroupWorker()
        worker.attach(0, group=name, world_size=3, rank=rank, num_shards=1, mode="async",
                      max_staleness=0, timeout=30, **HYPER)  # fmt: skip
        worker.train(x[slices[rank]], y[slices[rank]], steps=4, use_closure=True)
        return worker

    workers = run_ranks(3, work)
    log = [entry for w in workers for entry in w.push_log()]
    assert all(read == applied for (_, read, applied, _) in log)
    order = sorted((applied, rank) for (_, _, applied, rank) in log)
    assert [v for v, _ in order] == list(range(12))
    model = make_model(0)
    reference = torch.optim.AdamW(model.parameters(), fused=True, **HYPER)
    for _, rank in order:
        reference.zero_grad()
        loss_of(model, x[slices[rank]], y[slices[rank]]).backward()
        reference.step()
    workers[0].opt.pull_params()
    for got, want in zip(workers[0].params(), model.parameters()):
        assert torch.equal(got, want.detach())
    for w in workers:
        w.close()


def test_async_staleness_bound_is_never_exceeded(name):
    x, y = make_data(12)

    def work(rank):
        worker = attach(name, 3, rank, mode="async", max_staleness=1)
        worker.train(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4], steps=8)
        return worker

    workers = run_ranks(3, work)
    log = [entry for w in workers for entry in w.push_log()]
    applied = [(s, read, a) for (s, read, a, _) in log if a is not None]
    assert all(0 <= a - read <= 1 for (_, read, a) in applied)
    for shard in (0, 1):
        versions = sorted(a for (s, _, a) in applied if s == shard)
        assert versions == list(range(len(versions)))  # each version applied exactly once
    rejected = [entry for entry in log if entry[2] is None]
    assert len(applied) + len(rejected) == 3 * 8 * 2
    for w in workers:
        w.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_seed_shape": True}, "shape"),
        ({"lr": 0.5}, "hyperparameter 'lr' is 0.5 here, 0.05 in group"),
        ({"world_size": 3}, "world_size is 3 here, 2 in group"),
        ({"mode": "async"}, "mode is 'async' here, 'sync' in group"),
        ({"optimizer": torch.optim.Adam}, "optimizer class is torch.optim.adam.Adam here"),
        ({"dtype": torch.float64}, "dtype 'float64' here, 'float32'"),
        ({"named": True}, "name"),
        ({"split": False}, r"split \(per param group\) is \[False\] here, \[True\] in group"),
        ({"default_dtype": torch.float64}, r"default dtype .* is float64 here, float32 in group"),
    ],
)
def test_mismatched_worker_is_refused_and_the_group_is_untouched(name, change, message):
    first = attach(name, 2, 0, mode="sync")
    model = make_model(0)
    if change.get("model_seed_shape"):
        model[2] = torch.nn.Linear(8, 3)
    if "dtype" in change:
        model = model.to(change["dtype"])
    params = model.named_parameters() if change.get("named") else model.parameters()
    hyper = {**HYPER, "lr": change.get("lr", HYPER["lr"])}
    with pytest.raises(ValueError, match=message):
        shardopt.ShardedOptimizer(
            params, change.get("optimizer", torch.optim.AdamW), group=name,
            world_size=change.get("world_size", 2), rank=1, mode=change.get("mode", "sync"),
            num_shards=2, timeout=30, **({"split": change["split"]} if "split" in change else {}),
            default_dtype=change.get("default_dtype"), **hyper,
        )  # fmt: skip
    assert list_groups()[name]["members"] == [0]
    first.close()


def test_equal_actor_options_made_apart_are_the_same_and_others_are_refused(name):
    """Ray's scheduling strategies compare by identity; two workers each making the same
    ``NodeAffinitySchedulingStrategy`` ask for the same hosts, one with another ``soft`` does
    not and is refused, saying so."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = ray.get_runtime_context().get_node_id()

    def pinned(soft: bool) -> dict:
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=soft)}

    first = attach(name, 3, 0, actor_options=pinned(False))
    second = attach(name, 3, 1, actor_options=pinned(False))
    with pytest.raises(ValueError, match="actor_options is .*soft.*here"):
        attach(name, 3, 2, actor_options=pinned(True))
    assert list_groups()[name]["members"] == [0, 1]
    first.close()
    second.close()


def test_options_key_compares_ray_strategies_by_value():
    """Pools and group signatures key actor options by value: equal strategies made apart are
    one key; a placement group counts by its id (its bundle cache fills in later)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    from shardopt.actor.placement import options_key

    head = ray.get_runtime_context().get_node_id()

    def key(strategy) -> str:
        return options_key({"num_cpus": 1, "scheduling_strategy": strategy})

    assert key(NodeAffinitySchedulingStrategy(head, soft=False)) == key(
        NodeAffinitySchedulingStrategy(head, soft=False)
    )
    assert key(NodeAffinitySchedulingStrategy(head, soft=False)) != key(
        NodeAffinitySchedulingStrategy(head, soft=True)
    )
    pg = placement_group([{"CPU": 0.01}, {"CPU": 0.01}])
    try:
        ray.get(pg.ready(), timeout=30)
        before = key(PlacementGroupSchedulingStrategy(pg, 0))
        assert pg.bundle_specs  # fills the cache
        assert key(PlacementGroupSchedulingStrategy(pg, 0)) == before
        assert key(PlacementGroupSchedulingStrategy(pg, 1)) != before
    finally:
        remove_placement_group(pg)


def test_duplicate_rank_is_refused(name):
    first = attach(name, 2, 0)
    with pytest.raises(ValueError, match="rank 0 is already attached"):
        attach(name, 2, 0)
    first.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"world_size": 0, "rank": 0}, "Invalid world_size"),
        ({"world_size": 2, "rank": 2}, "Invalid rank"),
        ({"world_size": 2, "rank": 0, "mode": "hogwild"}, "Invalid mode"),
        ({"world_size": 2, "rank": 0, "max_staleness": 1}, "bounds async mode"),
        ({"world_size": 2, "rank": 0, "mode": "async", "max_staleness": -1}, "max_staleness"),
        ({"world_size": 2, "rank": 0, "placement": "EVERYWHERE"}, "Invalid placement"),
        ({"world_size": 2, "rank": 0, "timeout": 0}, "Invalid timeout"),
    ],
)
def test_bad_group_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        shardopt.AdamW(make_model().parameters(), group="never-made", num_shards=1, **options)
    assert "never-made" not in list_groups()


def test_group_options_need_a_group_and_lbfgs_has_none():
    with pytest.raises(ValueError, match="need group"):
        shardopt.AdamW(make_model().parameters(), world_size=2, rank=0)
    with pytest.raises(TypeError, match="group"):
        shardopt.LBFGS(make_model().parameters(), group="lbfgs", world_size=1, rank=0)


def test_param_groups_are_fixed_and_lr_changes_reach_the_shards(name):
    x, y = make_data(8)
    worker = attach(name, 1, 0)
    with pytest.raises(ValueError, match="fixed when it was created"):
        worker.opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert len(worker.opt.param_groups) == 1
    scheduler = torch.optim.lr_scheduler.StepLR(worker.opt, step_size=1, gamma=0.5)
    model = make_model(0)
    reference = torch.optim.AdamW(model.parameters(), fused=True, **HYPER)
    ref_scheduler = torch.optim.lr_scheduler.StepLR(reference, step_size=1, gamma=0.5)
    for _ in range(3):
        worker.train(x, y, steps=1)
        scheduler.step()
        reference.zero_grad()
        loss_of(model, x, y).backward()
        reference.step()
        ref_scheduler.step()
    for got, want in zip(worker.params(), model.parameters()):
        assert torch.equal(got, want.detach())
    worker.close()


def test_owner_close_keeps_the_group_until_the_others_detach(name):
    """... and the files of a host killed before the end are removed with the group."""
    owner = attach(name, 2, 0, mode="async")
    other = attach(name, 2, 1, mode="async")
    owner.close()
    assert list_groups()[name]["owner_closed"]
    with pytest.raises(shardopt.OptimizerClosedError, match="closed by its owner"):
        attach(name, 2, 0, mode="async")
    x, y = make_data(4)
    other.train(x, y, steps=1)  # still served
    # a host SIGKILLed before the group ends: the registry removes its shared-memory files
    hosts, _ = ray.get(group_registry().primary_hosts.remote(name))
    info = ray.get(hosts[0].info.remote())
    made_there = glob.glob(f"{shm.SHM_DIR}/shardopt-{info['pid']}-*")  # the files it named
    assert made_there and sorted(info["shm_files"]) == sorted(made_there)  # its read gate too
    os.kill(info["pid"], signal.SIGKILL)
    other.close()
    assert name not in list_groups()
    assert not glob.glob(f"{shm.SHM_DIR}/shardopt-{info['pid']}-*")


def test_close_returns_once_the_group_has_ended_and_its_files_are_gone(name):
    """A script that closes its optimizer and then stops Ray (``ray.shutdown()``, the end of a
    job on an embedded Ray) leaves nothing in /dev/shm: the last worker's close() waits for the
    registry to end the group, its hosts' shared-memory files removed (before, close() only
    sent the leave, and the files of a cluster stopped meanwhile stayed)."""
    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]
    opt = _sgd_member(name, params, 1, 0, "async")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    hosts, _ = ray.get(group_registry().primary_hosts.remote(name))
    files = [f for info in ray.get([h.info.remote() for h in hosts]) for f in info["shm_files"]]
    assert files and all(os.path.exists(f) for f in files)
    opt.close()
    assert [f for f in files if os.path.exists(f)] == []
    assert name not in list_groups()


def test_group_ends_with_its_owners_job(name):
    """A driver in another process (its own Ray job) creates a group and exits without closing."""
    address = ray.get_runtime_context().gcs_address
    script = textwrap.dedent(
        f"""
        import ray, torch, shardopt
        ray.init(address={address!r})
        model = torch.nn.Linear(3, 1)
        opt = shardopt.SGD(model.parameters(), lr=0.1, group={name!r}, world_size=2, rank=0,
                           num_shards=1, mode="async")
        import os; os._exit(0)  # no close(), no clean shutdown
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    deadline = time.monotonic() + 30
    while name in list_groups() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert name not in list_groups()


def test_group_checkpoint_loads_into_a_plain_optimizer(name, tmp_path):
    x, y = make_data(16)
    workers = run_ranks(2, lambda r: attach(name, 2, r))
    run_ranks(2, lambda r: workers[r].train(x[r * 8 : (r + 1) * 8], y[r * 8 : (r + 1) * 8], 3))
    workers[1].opt.save_checkpoint(tmp_path / "ckpt")
    expected = workers[0].opt.state_dict()
    model = make_model(0)
    plain = shardopt.AdamW(model.parameters(), num_shards=1, **HYPER)
    plain.load_checkpoint(tmp_path / "ckpt")
    got = plain.state_dict()
    assert list(got["state"]) == list(expected["state"])
    for pid, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(got["state"][pid][key], value)
    plain.close()
    # the group's state is shared: what one worker loads, every worker sees
    for state in expected["state"].values():
        state["exp_avg"].zero_()
    workers[0].opt.load_state_dict(expected)
    seen = workers[1].opt.state_dict()["state"]
    assert all(not state["exp_avg"].any() for state in seen.values())
    for w in workers:
        w.close()


def test_plain_optimizer_pull_params_restores_the_master_copy():
    model = make_model(0)
    opt = shardopt.AdamW(model.parameters(), num_shards=2, shared_memory=False, **HYPER)
    x, y = make_data(8)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()
    stepped = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.data.zero_()  # .data writes are not versioned: the shards still hold the step
    opt.pull_params()
    for got, want in zip(model.parameters(), stepped):
        assert torch.equal(got.detach(), want)
    opt.close()


@pytest.mark.parametrize(
    ("shards", "nodes", "expected"),
    [
        (2, ("a",), ["a", "a"]),  # no placement group: the creating worker's node
        (2, ("a", "b"), ["a", "b"]),
        (2, ("a", "b", "c", "a"), ["a", "c"]),  # SPREAD bundles come round the nodes again
        (3, ("a", "a", "b"), ["a", "a", "b"]),  # PACK: by how many bundles each node has
        (2, (), [None, None]),
    ],
)
def test_shards_go_beside_the_workers_in_bundle_order(shards, nodes, expected):
    assert placement.beside_workers(shards, nodes) == expected


def test_a_worker_outside_a_placement_group_is_laid_out_on_its_node():
    """The driver belongs to no placement group (the cluster tests cover one that does)."""
    assert placement.worker_nodes() == (ray.get_runtime_context().get_node_id(),)


def _sgd_member(name, params, world_size, rank, mode):
    """SGD (lr 0.5) on ``params`` as ``rank`` of group ``name``: whole tensors on 2 shards."""
    return shardopt.SGD(
        params, lr=0.5, group=name, world_size=world_size, rank=rank, mode=mode, num_shards=2,
        split=False, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_push_interrupted_while_packing_leaves_no_answer_for_the_next_push(name, mode):
    """The push to shard 0 left through its lane before shard 1's gradients were packed, and
    the packing was interrupted. In async mode the push waits for shard 0's answer before it
    raises, so shard 0 applied it and its parameters came back; a late request would have
    been dropped by the lane opened again for the next push, or read the next push's
    gradients from the slot. In sync mode (the answer waits for the round) the lane whose
    answer was not read is closed, so the next pushes read their own answers. With one
    worker, shard 0 applied the interrupted push and shard 1 did not (SGD, lr 0.5, gradients
    of ones: the parameters count the updates). In sync mode the next push is a resend of the
    interrupted version (as after a lost answer), so the shards agree again: no half-applied
    push, and no stale gradients refused by one shard and applied by the other."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((16, 16), (12, 8), (7,))]
    opt = _sgd_member(name, params, 1, 0, mode)
    try:
        owners = opt.plan.owners
        assert sorted(set(owners)) == [0, 1]
        before = [p.detach().clone() for p in params]
        interrupt_a_step(opt, params, owners)
        for _ in range(3):
            opt.step()
        # sync: the next push repeats the interrupted version, which shard 0 answers without
        # applying it again and shard 1 applies: 3 updates each; async: 4 and 3
        updates = {0: 3 if mode == "sync" else 4, 1: 3}
        want = sgd_on_ones(before, [updates[s] for s in owners])
        for p, w in zip(params, want):
            assert torch.equal(p.detach(), w)
        assert opt.backend.versions == ([3, 3] if mode == "sync" else [4, 3])
    finally:
        opt.close()


def test_a_sync_push_interrupted_on_one_rank_completes_its_rounds_when_it_pushes_again(name):
    """Two sync ranks; rank 1's first push reaches shard 0 and is interrupted before shard 1
    (Ctrl-C while packing). Shard 0 applies its round with both ranks; shard 1's round waits
    for rank 1, whose next push repeats the version: shard 0 answers it once, shard 1 applies
    its round. Both ranks then hold the same parameters, every shard one update per round."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in ((16, 16), (12, 8), (7,))]

    def work(rank):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = _sgd_member(name, params, 2, rank, "sync")
        try:
            owners = opt.plan.owners
            if rank == 1:
                interrupt_a_step(opt, params, owners)
            else:
                grads_of_ones(params, owners)
            for _ in range(3):
                opt.step()
            return [p.detach().clone() for p in params], opt.backend.versions
        finally:
            opt.close()

    (params_0, versions_0), (params_1, versions_1) = run_ranks(2, work)
    assert versions_0 == versions_1 == [3, 3]
    want = sgd_on_ones(start, [3] * len(start))  # the mean of two ones is ones
    for a, b, w in zip(params_0, params_1, want):
        assert torch.equal(a, w) and torch.equal(b, w)
