"""How the suite is run (tests/conftest.py, scripts/test.sh): checked on a small suite of its own.

A real pytest with pytest-xdist runs, in a subprocess, a copy of this directory's conftest with
three small test files, as ``scripts/test.sh`` runs the suite: each file's tests go to one worker
together (module fixtures set up once), the multi-node files all to one worker, before any other
test there. pytest 9.2 silently broke xdist's own grouping (every test became a group of its own),
which nothing noticed for a whole stop.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

TESTS_DIR = pathlib.Path(__file__).resolve().parent

RECORDING = """
import os, time
import pytest
{mark}

@pytest.mark.parametrize("i", range(4))
def test_records(i):
    with open(os.environ["ORDER_LOG"], "a") as log:
        print(os.environ.get("PYTEST_XDIST_WORKER", "main"), __name__, i, file=log)
    time.sleep(0.2)  # the other worker asks for work meanwhile
"""


def _suite(tmp_path: pathlib.Path) -> pathlib.Path:
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(TESTS_DIR / "conftest.py", suite / "conftest.py")
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    cluster: multi-node\n")
    for name, mark in [
        ("test_alpha", ""),
        ("test_beta", ""),
        ("test_one_cluster", "pytestmark = pytest.mark.cluster"),
        ("test_two_cluster", "pytestmark = pytest.mark.cluster"),
    ]:
        (suite / f"{name}.py").write_text(RECORDING.format(mark=mark))
    return suite


def _run(suite: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ORDER_LOG": str(suite / "order.log")}
    env.pop("PYTEST_XDIST_WORKER", None)  # this suite may itself run under xdist
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=suite, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _order(suite: pathlib.Path) -> list[tuple[str, str]]:
    lines = (suite / "order.log").read_text().split()
    return [(worker, module) for worker, module, _ in zip(lines[::3], lines[1::3], lines[2::3])]


def test_files_stay_together_and_the_multi_node_ones_run_first(tmp_path):
    suite = _suite(tmp_path)
    run = _run(suite, "-n", "2", "--dist", "loadgroup", "--no-loadscope-reorder")
    assert run.returncode == 0, run.stdout + run.stderr
    order = _order(suite)
    assert len(order) == 16
    workers = {}
    for worker, module in order:
        workers.setdefault(module, set()).add(worker)
    assert all(len(w) == 1 for w in workers.values()), workers  # a file on one worker
    assert workers["test_one_cluster"] == workers["test_two_cluster"]  # multi-node together
    (multi_node,) = workers["test_one_cluster"]
    on_it = [module for worker, module in order if worker == multi_node]
    assert all("cluster" in m for m in on_it[:8]), on_it  # first there


def test_a_multi_node_test_outside_a_cluster_file_is_refused(tmp_path):
    """The scheduler knows the multi-node tests by their files' names (it sees node ids only)."""
    suite = _suite(tmp_path)
    (suite / "test_gamma.py").write_text(RECORDING.format(mark="pytestmark = pytest.mark.cluster"))
    run = _run(suite, "-p", "no:xdist", "--collect-only")
    assert run.returncode != 0
    assert "test_gamma.py::test_records[0]: tests marked 'cluster' go in files named" in (
        run.stdout + run.stderr
    )
