"""Shared fixtures: one real local Ray for the whole test session.

Starting Ray takes seconds and each shard host actor a few more, so every test shares one Ray
(and shardopt's pool of shard hosts). Tests that need a multi-node ``ray.cluster_utils.Cluster``
(marked ``cluster``) run last, after this one is shut down.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import ray
import torch

TESTS_DIR = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    """Multi-node tests replace the session's Ray with a Cluster: they run after all others."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    """One local Ray per test session; shard actors can import the test modules."""
    paths = [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster(ray_session):
    """A ``ray.cluster_utils.Cluster`` of three raylets (a head and two nodes with two logical
    GPUs each), replacing the local Ray for the rest of the session (``cluster`` tests run
    last). Tests may add nodes of their own and remove those."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "object_store_memory": 150 * 2**20},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=4, num_gpus=2, object_store_memory=150 * 2**20)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
