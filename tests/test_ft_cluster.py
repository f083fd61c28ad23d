"""A whole node lost: its shards' replicas on other nodes take over, nothing is lost.

Uses conftest's ``cluster`` (these tests run first) and adds a node of its own, the one it
removes, so the other cluster tests keep their three nodes.
"""

from __future__ import annotations

import pytest
import ray
from helpers import assert_same, make_model, run_steps
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import shardopt

pytestmark = pytest.mark.cluster

SIZES = (8, 16, 4)
"""The layer widths of the model (those of tests/test_ft.py)."""


def test_losing_a_node_loses_nothing(cluster):
    doomed = cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20)
    cluster.wait_for_nodes()
    on_doomed = {"scheduling_strategy": NodeAffinitySchedulingStrategy(doomed.node_id, soft=False)}

    def optimizer(model):
        return shardopt.AdamW(model.parameters(), lr=0.01, num_shards=2, replicate=True,
                              actor_options=on_doomed)  # fmt: skip

    reference_model = make_model(sizes=SIZES)
    reference = optimizer(reference_model)
    expected = run_steps(reference_model, reference, 6)
    reference.close()

    model = make_model(sizes=SIZES)
    opt = optimizer(model)
    assert set(opt.backend.host_nodes) == {doomed.node_id}  # both primaries on the doomed node
    assert doomed.node_id not in opt.backend.replicas.nodes  # their replicas elsewhere

    def lose_the_node(step):
        if step == 3:
            cluster.remove_node(doomed)

    got = run_steps(model, opt, 6, lose_the_node)
    assert opt.backend.replicas.recoveries == 2
    assert doomed.node_id not in opt.backend.host_nodes
    assert_same(got, expected)
    opt.close()
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert doomed.node_id not in alive
