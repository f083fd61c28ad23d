#!/usr/bin/env bash
# Runs shardopt's training demo (`shardopt demo`) in ./.venv, creating the venv on first use.
#
#   bash scripts/demo.sh               # the default demo (well under a minute once installed)
#   bash scripts/demo.sh --epochs 5    # arguments are passed on to `shardopt demo`
#
# PYTHON (default: python3) creates the venv. torch==2.13.0 is installed before the project so
# that pip keeps that build; pip's own settings (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, pip.conf)
# choose where it comes from. The install is redone when pyproject.toml changes.
# The venv set-up is the same as in scripts/test.sh; change both together.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=.venv
extra=demo
python=${PYTHON:-python3}
pip_flags=()
if [[ -n "${CI:-}" ]]; then
  pip_flags+=(--progress-bar off --no-input)
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "+ $python -m venv $venv" >&2
  if ! "$python" -m venv "$venv"; then
    rm -rf "$venv"
    echo "error: '$python -m venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2
    exit 1
  fi
fi
stamp="$venv/.shardopt-installed-$extra"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  echo "+ pip install torch==2.13.0, then -e .[$extra]" >&2
  "$venv/bin/python" -m pip install ${pip_flags[@]+"${pip_flags[@]}"} "torch==2.13.0"
  "$venv/bin/python" -m pip install ${pip_flags[@]+"${pip_flags[@]}"} -e ".[$extra]"
  touch "$stamp"
fi

exec "$venv/bin/shardopt" demo "$@"
