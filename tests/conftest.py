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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
