#!/usr/bin/env bash
# Runs the test suite (`python -m pytest -q`) in ./.venv, creating the venv on first use.
#
#   bash scripts/test.sh                       # every test
#   bash scripts/test.sh tests/test_demo.py -x  # arguments are passed on to pytest
#
# PYTHON (default: python3) creates the venv. torch==2.13.0 is installed before the project so
# that pip keeps that build; pip's own settings (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, pip.conf)
# choose where it comes from. The install is redone when pyproject.toml changes.
# The venv set-up is in scripts/venv.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extra=test
source scripts/venv.sh

exec "$venv/bin/python" -m pytest -q "$@"
