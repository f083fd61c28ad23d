"""Shard groups across nodes: a ``ray.cluster_utils.Cluster`` of three raylets on this machine.

Placement (one shard per node, refusals that say what to change), and workers that are Ray
actors on different nodes, in sync and async mode. The cluster (conftest's ``cluster``) replaces
the session's local Ray, so conftest runs these tests before every other test.
"""

from __future__ import annotations

import os
import signal
import uuid

import pytest
import ray
import torch
from group_workers import (
    GroupWorker,
    loss_of,
    make_data,
    make_model,
    reference_run,
    sync_reference,
)
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

import shardopt
from shardopt.client.shard_group import registry as group_registry

pytestmark = pytest.mark.cluster

HYPER = {"lr": 0.05, "weight_decay": 0.01}
NODES = 3  # the conftest's cluster: a head and two nodes with two (logical) GPUs each


@pytest.fixture(scope="module")
def workers(cluster):
    """Four worker actors, round-robin over the nodes, reused by every test here."""
    nodes = sorted(alive_nodes())
    actors = [
        ray.remote(GroupWorker)
        .options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False),
        )
        .remote()
        for i in range(4)
    ]
    ray.get([a.node_id.remote() for a in actors])
    return actors


@pytest.fixture
def name(cluster):
    group = f"cluster-{uuid.uuid4().hex[:8]}"
    yield group
    shardopt.close_group(group)


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_strict_spread_puts_one_shard_on_each_node(name):
    opt = shardopt.AdamW(
        make_model().parameters(), lr=0.1, group=name, world_size=1, rank=0, num_shards=3,
        placement="STRICT_SPREAD",
    )  # fmt: skip
    nodes = list(shardopt.list_groups()[name]["node_ids"])
    assert sorted(nodes) == sorted(alive_nodes())
    assert len(set(nodes)) == NODES
    opt.close()


def test_one_shard_per_gpu(name):
    """Ray's GPU accounting only (the GPUs are logical here; the shards run on CPU)."""
    model = make_model()
    opt = shardopt.AdamW(
        model.parameters(), lr=0.1, group=name, world_size=1, rank=0, num_shards=4,
        placement="SPREAD", shard_resources={"GPU": 1},
    )  # fmt: skip
    infos = [
        ray.get(ray.get_actor(f"group/{name}/shard/{s}", namespace="shardopt").info.remote())
        for s in range(4)
    ]
    slots = {(info["node_id"], tuple(info["gpu_ids"])) for info in infos}
    assert len(slots) == 4 and all(len(gpus) == 1 for _, gpus in slots)
    assert len({node for node, _ in slots}) == 2
    x, y = make_data(8)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_shards": 4, "placement": "STRICT_SPREAD"}, r"num_shards<=3, placement='SPREAD'"),
        ({"num_shards": 2, "placement": "SPREAD", "shard_resources": {"TPU": 1}}, "no node"),
        ({"num_shards": 5, "placement": "SPREAD", "shard_resources": {"GPU": 1}}, "holds 4"),
        ({"num_shards": 2, "placement": "STRICT_PACK", "shard_resources": {"CPU": 3}}, "<=1"),
        ({"num_shards": 13, "placement": "PACK"}, "holds 12 such bundles"),
    ],
)
def test_placement_the_cluster_cannot_satisfy_says_what_to_change(name, options, message):
    with pytest.raises(shardopt.PlacementError, match=message):
        shardopt.AdamW(make_model().parameters(), lr=0.1, group=name, world_size=1, rank=0,
                       **options)  # fmt: skip
    assert name not in shardopt.list_groups()
    assert not [
        pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"
        and pg["name"] == f"shardopt/{name}"
    ]  # fmt: skip


@pytest.mark.parametrize("world_size", [2, 4])
def test_sync_actor_workers_on_several_nodes_equal_one_worker(name, workers, world_size):
    x, y = make_data(16)
    per = 16 // world_size
    ranks = workers[:world_size]
    ray.get([
        w.attach.remote(0, group=name, world_size=world_size, rank=r, num_shards=3,
                        placement="SPREAD", timeout=60, **HYPER)
        for r, w in enumerate(ranks)
    ])  # fmt: skip
    assert len({ray.get(w.node_id.remote()) for w in ranks}) == min(world_size, NODES)
    results = ray.get([
        w.train.remote(x[r * per : (r + 1) * per], y[r * per : (r + 1) * per], 6)
        for r, w in enumerate(ranks)
    ])  # fmt: skip
    expected = reference_run(6, x, y, **HYPER)
    for params in results:
        for got, first, want in zip(params, results[0], expected):
            assert torch.equal(got, first)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ray.get([w.close.remote() for w in ranks])


def test_async_actor_workers_respect_the_staleness_bound(name, workers):
    x, y = make_data(16)
    ray.get([
        w.attach.remote(0, group=name, world_size=4, rank=r, num_shards=2, mode="async",
                        max_staleness=2, timeout=60, **HYPER)
        for r, w in enumerate(workers)
    ])  # fmt: skip
    ray.get([
        w.train.remote(x[r * 4 : (r + 1) * 4], y[r * 4 : (r + 1) * 4], 6, True)
        for r, w in enumerate(workers)
    ])  # fmt: skip
    log = [e for w in workers for e in ray.get(w.push_log.remote())]
    assert len(log) == 4 * 6 * 2 and all(a is not None for (_, _, a, _) in log)
    assert all(0 <= a - read <= 2 for (_, read, a, _) in log)
    for shard in (0, 1):
        assert sorted(a for (s, _, a, _) in log if s == shard) == list(range(24))
    ray.get([w.close.remote() for w in workers])


def test_late_joiner_on_another_node_gets_current_parameters(name, workers):
    x, y = make_data(8)
    first, late = workers[0], workers[1]
    ray.get(first.attach.remote(0, group=name, world_size=2, rank=0, num_shards=2,
                                mode="async", **HYPER))  # fmt: skip
    trained = ray.get(first.train.remote(x, y, 3))
    adopted = ray.get(late.attach.remote(7, group=name, world_size=2, rank=1, num_shards=2,
                                         mode="async", **HYPER))  # fmt: skip
    for got, want in zip(adopted, trained):
        assert torch.equal(got, want)
    assert not torch.equal(adopted[0], make_model(7)[0].weight.detach())
    ray.get([first.close.remote(), late.close.remote()])


def _close_push_lane(host, rank):
    host._lanes[rank].close()


def _last_put_version(host):
    """The last version whose parameters the host put in the object store (None: none)."""
    return None if host._params is None else host._params.version


def test_workers_on_another_node_push_over_network_lanes(name):
    """Both shards on one node (a GPU node: STRICT_PACK of logical GPUs; they run on CPU), both
    workers on the head: every push goes over a network lane, gradients in and parameters back
    inline, nothing in the object store, bit-identical to torch on the averaged gradient. A
    lane the host closes sends that rank's pushes through Ray, with the same bits. Async
    workers over network lanes get every push applied."""
    head = ray.get_runtime_context().get_node_id()
    ranks = [
        ray.remote(GroupWorker)
        .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False))
        .remote()
        for _ in range(2)
    ]
    x, y = make_data(8)
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    options = dict(num_shards=2, placement="STRICT_PACK", shard_resources={"GPU": 1}, timeout=60)
    ray.get([w.attach.remote(0, group=name, world_size=2, rank=r, **options, **HYPER)
             for r, w in enumerate(ranks)])  # fmt: skip
    nodes = set(shardopt.list_groups()[name]["node_ids"])
    assert len(nodes) == 1 and head not in nodes
    assert ray.get([w.lanes.remote() for w in ranks]) == [(2, 2)] * 2
    train = [w.train.remote(*halves[r], 3) for r, w in enumerate(ranks)]
    results = ray.get(train)
    expected, _ = sync_reference(3, halves, **HYPER)
    assert all(torch.equal(p, q) for p, q in zip(results[0], expected))
    assert all(torch.equal(p, q) for p, q in zip(results[1], results[0]))
    hosts, _ = ray.get(group_registry().primary_hosts.remote(name))
    puts = [h.__ray_call__.remote(_last_put_version) for h in hosts]
    assert ray.get(puts) == [0, 0]  # the workers' first pull only: the steps put nothing
    ray.get(hosts[0].__ray_call__.remote(_close_push_lane, 0))
    results = ray.get([w.train.remote(*halves[r], 2) for r, w in enumerate(ranks)])
    expected, _ = sync_reference(5, halves, **HYPER)
    assert all(torch.equal(p, q) for p, q in zip(results[0], expected))
    assert all(torch.equal(p, q) for p, q in zip(results[1], results[0]))
    assert ray.get([w.lanes.remote() for w in ranks]) == [(1, 1), (2, 2)]
    assert ray.get([h.version.remote() for h in hosts]) == [5, 5]
    assert ray.get([h.__ray_call__.remote(_last_put_version) for h in hosts]) == [5, 0]
    ray.get([w.close.remote() for w in ranks])
    group = f"{name}-async"
    try:
        ray.get([w.attach.remote(0, group=group, world_size=2, rank=r, mode="async", **options,
                                 **HYPER) for r, w in enumerate(ranks)])  # fmt: skip
        assert ray.get([w.lanes.remote() for w in ranks]) == [(2, 2)] * 2
        ray.get([w.train.remote(*halves[r], 4) for r, w in enumerate(ranks)])
        log = [e for w in ranks for e in ray.get(w.push_log.remote())]
        for shard in (0, 1):
            assert sorted(a for (s, _, a, _) in log if s == shard) == list(range(8))
        ray.get([w.close.remote() for w in ranks])
    finally:
        shardopt.close_group(group)


def _node_of(actor: object) -> str:
    return ray.get_runtime_context().get_node_id()


def test_shards_without_placement_go_beside_the_creating_worker(name, workers):
    """Without a placement the shards go to the node of the worker that creates the group
    (which then reaches them through shared memory), not to the registry's node; a closed
    group's idle hosts serve the next group created on their node only; and the files of a
    host that died there are removed on that node when its group ends."""
    registry_node = ray.get(group_registry().__ray_call__.remote(_node_of))
    nodes = ray.get([w.node_id.remote() for w in workers[:NODES]])
    creator = next(r for r in range(NODES) if nodes[r] != registry_node)
    other = next(r for r in range(NODES) if nodes[r] != nodes[creator])
    first, second = workers[creator], workers[other]
    x, y = make_data(8)
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    options = dict(world_size=2, num_shards=2, timeout=60, **HYPER)
    ray.get(first.attach.remote(0, group=name, rank=0, **options))
    ray.get(second.attach.remote(0, group=name, rank=1, **options))
    assert list(shardopt.list_groups()[name]["node_ids"]) == [nodes[creator]] * 2
    assert ray.get([first.lanes.remote(), second.lanes.remote()]) == [(2, 0), (2, 2)]
    results = ray.get([w.train.remote(*halves[r], 3) for r, w in enumerate((first, second))])
    expected, _ = sync_reference(3, halves, **HYPER)
    assert all(torch.equal(p, q) for p, q in zip(results[0], expected))
    assert all(torch.equal(p, q) for p, q in zip(results[1], results[0]))
    hosts, _ = ray.get(group_registry().primary_hosts.remote(name))
    pooled = {h._actor_id.hex() for h in hosts}
    ray.get([first.close.remote(), second.close.remote()])
    assert name not in shardopt.list_groups()

    elsewhere = f"{name}-elsewhere"  # created on another node: not the idle hosts
    try:
        ray.get(second.attach.remote(0, group=elsewhere, world_size=1, rank=0, num_shards=2))
        assert list(shardopt.list_groups()[elsewhere]["node_ids"]) == [nodes[other]] * 2
        hosts, _ = ray.get(group_registry().primary_hosts.remote(elsewhere))
        assert not {h._actor_id.hex() for h in hosts} & pooled
        assert ray.get(second.lanes.remote()) == (2, 0)
    finally:
        ray.get(second.close.remote())
        shardopt.close_group(elsewhere)

    again = f"{name}-again"  # created on the first node: its idle hosts, files there
    ray.get(first.attach.remote(0, group=again, world_size=1, rank=0, num_shards=2))
    try:
        hosts, _ = ray.get(group_registry().primary_hosts.remote(again))
        assert {h._actor_id.hex() for h in hosts} == pooled
        info = ray.get(hosts[0].info.remote())
        assert info["node_id"] == nodes[creator] != registry_node
        assert len(info["shm_files"]) == 2 and all(os.path.exists(p) for p in info["shm_files"])
        os.kill(info["pid"], signal.SIGKILL)
    finally:
        ray.get(first.close.remote())
        shardopt.close_group(again)
    assert again not in shardopt.list_groups()
    assert not any(os.path.exists(p) for p in info["shm_files"])


def test_shards_without_placement_spread_over_the_workers_placement_group(name):
    """Workers in a placement group, one bundle each (as Ray Train's are): a group without a
    placement spreads its shards over the bundles' nodes (shard ``s`` beside bundle
    ``s * bundles // shards``), so each worker here has one shard beside it and one away."""
    pg = placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")
    ray.get(pg.ready(), timeout=60)
    bundles = [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i) for i in (0, 1)]
    ranks = [
        ray.remote(GroupWorker).options(num_cpus=1, scheduling_strategy=bundle).remote()
        for bundle in bundles
    ]
    try:
        nodes = ray.get([w.node_id.remote() for w in ranks])
        assert nodes[0] != nodes[1]
        x, y = make_data(8)
        halves = [(x[:4], y[:4]), (x[4:], y[4:])]
        ray.get([w.attach.remote(0, group=name, world_size=2, rank=r, num_shards=2, timeout=60,
                                 **HYPER) for r, w in enumerate(ranks)])  # fmt: skip
        assert list(shardopt.list_groups()[name]["node_ids"]) == nodes
        assert ray.get([w.lanes.remote() for w in ranks]) == [(2, 1), (2, 1)]
        results = ray.get([w.train.remote(*halves[r], 3) for r, w in enumerate(ranks)])
        expected, _ = sync_reference(3, halves, **HYPER)
        assert all(torch.equal(p, q) for p, q in zip(results[0], expected))
        assert all(torch.equal(p, q) for p, q in zip(results[1], results[0]))
        ray.get([w.close.remote() for w in ranks])
    finally:
        for w in ranks:
            ray.kill(w)
        remove_placement_group(pg)
