"""Shared fixtures: one real local Ray for the whole test session.

Starting Ray takes seconds and each shard host actor a few more, so every test shares one Ray
(and shardopt's pool of shard hosts). Tests that need a multi-node ``ray.cluster_utils.Cluster``
(marked ``cluster``) run last, after this one is shut down.

Under pytest-xdist (``scripts/test.sh`` runs ``-n 2 --dist loadgroup --no-loadscope-reorder``)
each worker process is such a session with its own Ray: a test file's tests go to one worker
together (its module fixtures are set up once) and the ``cluster`` tests all to one worker,
after the files it ran.
"""

from __future__ import annotations

import gc
import os
import pathlib

import pytest
import ray
import torch

from shardopt.testing import LocalS3

TESTS_DIR = pathlib.Path(__file__).resolve().parent
S3 = LocalS3()
"""The session's S3 server (started by the ``s3`` fixture, when a test first asks for it)."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the xdist_group marks
def pytest_collection_modifyitems(items):
    """Multi-node tests replace the session's Ray with a Cluster: they run after all others.
    For ``--dist loadgroup``: a file's tests form one group, the multi-node ones another."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)
    for item in items:
        multi_node = item.get_closest_marker("cluster") is not None
        group = "cluster" if multi_node else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    """One local Ray per test session; shard actors can import the test modules and reach the
    session's S3 server (its endpoint and test credentials are in their environment)."""
    paths = [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    os.environ.update(S3.env)  # never a real store: every s3:// URL goes to the local server
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(ray_session):
    """The session's S3-compatible server (moto) on loopback; the tests that use it are
    skipped, with the reason, where it cannot start (moto[server] or s3fs missing, ...)."""
    try:
        S3.start()
    except RuntimeError as err:
        pytest.skip(f"no local S3 server: {err}")
    yield S3
    S3.stop()


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


@pytest.fixture(scope="module", autouse=True)
def _collected():
    """Optimizers of earlier modules caught in reference cycles release their shard hosts
    before a module starts (their finalizers run when collected), so what a module finds in
    the host pool does not depend on which modules ran before it in this process (under xdist,
    any of them): a gateway test counts the hosts a session starts and ends."""
    gc.collect()
    yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def address(gateway):
    """``host:port`` of the module's ``gateway`` fixture (a real server on 127.0.0.1)."""
    return f"127.0.0.1:{gateway.port}"


@pytest.fixture
def stub(address):
    """A raw stub on a channel to the module's gateway, closed after the test."""
    import grpc

    from shardopt.core.proto import rpc

    with grpc.insecure_channel(address) as channel:
        yield rpc.OptimizerServiceStub(channel)
