#!/usr/bin/env bash
# Runs the test suite (`python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder`) in
# ./.venv, creating the venv on first use.
#
#   bash scripts/test.sh                       # every test
#   bash scripts/test.sh tests/test_demo.py -x  # arguments are passed on to pytest
#   SHARDOPT_TEST_WORKERS=0 bash scripts/test.sh  # in this one process (-n 0)
#
# The suite runs in SHARDOPT_TEST_WORKERS (default 2) pytest-xdist processes, each with its own
# local Ray (tests/conftest.py): a test file's tests run in one process, in order, and the
# multi-node tests (tests/*_cluster.py) all in one process, first. Most of the suite's CPU goes to
# starting processes (shard hosts, gateways, Ray nodes), and a single test process leaves about
# a third of two cores idle while it waits on them: a second one uses it.
#
# PYTHON (default: python3) creates the venv. torch==2.13.0 is installed before the project so
# that pip keeps that build; pip's own settings (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, pip.conf)
# choose where it comes from. The install is redone when pyproject.toml changes.
# The venv set-up is in scripts/venv.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extra=test
source scripts/venv.sh

workers=${SHARDOPT_TEST_WORKERS:-2}
exec "$venv/bin/python" -m pytest -q -n "$workers" --dist loadgroup --no-loadscope-reorder "$@"
