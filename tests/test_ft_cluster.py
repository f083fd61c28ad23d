"""A whole node lost: its shards' replicas on other nodes take over, nothing is lost.

Uses conftest's ``cluster`` (these tests run last) and adds a node of its own, the one it
removes, so the other cluster tests keep their three nodes.
"""

from __future__ import annotations

import pytest
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import shardopt

pytestmark = pytest.mark.cluster


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def train(opt, model, steps, on_step=None):
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        x = torch.randn(5, 8, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


def test_losing_a_node_loses_nothing(cluster):
    doomed = cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20)
    cluster.wait_for_nodes()
    on_doomed = {"scheduling_strategy": NodeAffinitySchedulingStrategy(doomed.node_id, soft=False)}

    def optimizer(model):
        return shardopt.AdamW(model.parameters(), lr=0.01, num_shards=2, replicate=True,
                              actor_options=on_doomed)  # fmt: skip

    reference_model = make_model()
    reference = optimizer(reference_model)
    expected = train(reference, reference_model, 6)
    reference.close()

    model = make_model()
    opt = optimizer(model)
    assert set(opt.backend.host_nodes) == {doomed.node_id}  # both primaries on the doomed node
    assert doomed.node_id not in opt.backend.replicas.nodes  # their replicas elsewhere

    def lose_the_node(step):
        if step == 3:
            cluster.remove_node(doomed)

    got = train(opt, model, 6, lose_the_node)
    assert opt.backend.replicas.recoveries == 2
    assert doomed.node_id not in opt.backend.host_nodes
    for a, b in zip(expected[0], got[0]):
        assert torch.equal(a, b)
    for pid, state in expected[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(got[1]["state"][pid][key], value)
    opt.close()
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert doomed.node_id not in alive
