# shellcheck shell=bash
# Sourced by scripts/demo.sh and scripts/test.sh with $extra set (demo or test): creates (or
# reuses) ./.venv, installs torch==2.13.0 first so that pip keeps that CPU build, then this
# project with that extra. The install is redone when pyproject.toml changes.

venv=.venv
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

