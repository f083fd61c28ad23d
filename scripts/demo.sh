#!/usr/bin/env bash
# Runs shardopt's training demo (`shardopt demo`) in ./.venv, creating the venv on first use.
#
#   bash scripts/demo.sh               # the default demo (well under a minute once installed)
#   bash scripts/demo.sh --epochs 5    # arguments are passed on to `shardopt demo`
#
# PYTHON (default: python3) creates the venv. torch==2.13.0 is installed before the project so
# that pip keeps that build; pip's own settings (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, pip.conf)
# choose where it comes from. The install is redone when pyproject.toml changes.
# The venv set-up is in scripts/venv.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extra=demo
source scripts/venv.sh

exec "$venv/bin/shardopt" demo "$@"
