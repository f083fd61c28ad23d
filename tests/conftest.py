"""Shared fixtures: one real local Ray for the whole test session.

Starting Ray takes seconds and each shard host actor a few more, so every test shares one Ray
(and shardopt's pool of shard hosts). Tests that need a multi-node ``ray.cluster_utils.Cluster``
(marked ``cluster``) run first, on a Cluster; the local Ray starts after it has ended, for
the first other test.

Under pytest-xdist (``scripts/test.sh`` runs ``-n 2 --dist loadgroup --no-loadscope-reorder``)
each worker process is such a session with its own Ray: a test file's tests go to one worker
together (its module fixtures are set up once) and the ``cluster`` tests all to one worker,
which runs them before any file, while the other runs files: the longest group starts first
instead of running alone at the end (:func:`pytest_xdist_make_scheduler`).
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


MULTI_NODE_FILES = "_cluster.py"
"""How the name of a file of multi-node tests ends (and no other test file's name)."""


def _multi_node(item: pytest.Item) -> bool:
    return item.get_closest_marker("cluster") is not None


def pytest_collection_modifyitems(items):
    """Multi-node tests run first (see the module's docstring); they are the tests of the
    ``*_cluster.py`` files, which the scheduler below knows them by."""
    for item in items:
        if _multi_node(item) != item.path.name.endswith(MULTI_NODE_FILES):
            raise pytest.UsageError(
                f"{item.nodeid}: tests marked 'cluster' go in files named *{MULTI_NODE_FILES}, "
                "and only those (tests/conftest.py schedules them by file name)"
            )
    items.sort(key=lambda item: not _multi_node(item))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown without it
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` sends each test file to one worker as a whole (its module fixtures
    are set up once) and the multi-node files together to one worker, in collection order.
    xdist's own loadgroup appends ``xdist_group`` marks to node ids through ``item._nodeid``,
    where pytest 9.2 no longer keeps them: every test became a group of its own (tests of one
    file on both workers, both starting a Cluster). This groups by the node id's file."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "multi-node" if path.endswith(MULTI_NODE_FILES) else path

    return ByFile(config, log)


class _Cluster:
    """The session's ``ray.cluster_utils.Cluster`` while it replaces the local Ray."""

    current = None
    ended = False

    @classmethod
    def end(cls) -> None:
        """Shuts the Cluster down (once; later calls do nothing)."""
        if cls.current is not None:
            ray.shutdown()
            cls.current.shutdown()
            cls.current, cls.ended = None, True


@pytest.hookimpl(tryfirst=True)  # before this test's fixtures, module-scoped ones included
def pytest_runtest_setup(item):
    """A test that is not multi-node finds the session's local Ray, started at the first such
    test: after the multi-node tests (and their own fixtures' teardown) the Cluster ends."""
    if _multi_node(item):
        assert not _Cluster.ended, "multi-node tests run before the others (see the ordering)"
        return
    _Cluster.end()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)


def pytest_configure(config):
    """Ray's processes, all started later, inherit this environment: shard actors can import
    the test modules and reach the session's S3 server (its endpoint and test credentials)."""
    paths = [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    os.environ.update(S3.env)  # never a real store: every s3:// URL goes to the local server


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    """Shuts the session's Ray down at its end (local, or the multi-node tests' Cluster: each
    started as tests need it, see above)."""
    yield
    ray.shutdown()
    _Cluster.end()  # where only multi-node tests ran


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
    GPUs each), replacing the local Ray while the ``cluster`` tests run (they run first, see
    :func:`pytest_runtest_setup`). Tests may add nodes of their own and remove those."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "object_store_memory": 150 * 2**20},
    )
    _Cluster.current = cluster
    for _ in range(2):
        cluster.add_node(num_cpus=4, num_gpus=2, object_store_memory=150 * 2**20)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster


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
