#!/usr/bin/env bash
# Everything that needs a GPU, in one go (about 10 minutes; every stage has a time limit):
#
#   bash scripts/gpu.sh                 # results and logs in $OUT if set, else benchmarks/results
#   GPU_PYTHON=/opt/py/bin/python bash scripts/gpu.sh   # an interpreter with a CUDA torch
#
# 1. the interpreter: $GPU_PYTHON, else ./.venv (created by scripts/venv.sh if missing), else
#    python3 on the PATH: the first whose torch sees CUDA. torch==2.13.0 from a local wheel may
#    be a CPU build: then no interpreter qualifies, and the script says so and exits 3.
#    With a bundle (.gpu/MANIFEST.txt, or $GPU_BUNDLE/MANIFEST.txt; built by
#    scripts/gpu_bundle.sh for a machine without internet, docs/GPU_RUN.md): no venv is made;
#    the candidates are $GPU_PYTHON, /opt/torch/.venv/bin/python3, python3; the bundle is
#    installed into $GPU_SITE (default /tmp/site) and PYTHONPATH is that plus this checkout;
#    then the imports shardopt needs and a one-actor Ray start are checked (-> bundle.log; exit
#    4 if they fail), before the CUDA check, so a dry run without CUDA checks them too.
# 2. nvidia-smi and torch's view of the device          -> env.log
# 3. the tests marked gpu (tests/test_gpu.py and the gpu tests of other files), at most
#    TESTS_S seconds (default 240)                       -> tests.log, tests.xml
# 4. benchmarks/gpu_bench.py (AdamW, 50M and 500M), at most BENCH_S seconds (default 300)
#                                                        -> bench.log, gpu_bench_<device>.json
# Exit status: 0 when every stage passed, else the first failing stage's (tests: pytest's;
# 124 for a stage that ran out of time). summary.txt says how each stage ended.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=${OUT:-benchmarks/results}
mkdir -p "$out"
tests_s=${TESTS_S:-240}
bench_s=${BENCH_S:-300}
summary="$out/summary.txt"
: >"$summary"
: >"$out/env.log"
note() { echo "$*" | tee -a "$summary"; }
started=$(date +%s)

cuda_python() {  # prints the interpreter's torch version and CUDA; succeeds if it sees a GPU
  "$1" - <<'EOF'
import sys
try:
    import torch
except Exception as err:
    print(f"{sys.executable}: no torch ({err})")
    sys.exit(1)
print(f"{sys.executable}: torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}")
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
}

bundle=${GPU_BUNDLE:-.gpu}
candidates=()
[[ -n "${GPU_PYTHON:-}" ]] && candidates+=("$GPU_PYTHON")
if [[ -f "$bundle/MANIFEST.txt" ]]; then
  note "bundle: $bundle ($(head -n 1 "$bundle/MANIFEST.txt"))"
  [[ -x /opt/torch/.venv/bin/python3 ]] && candidates+=(/opt/torch/.venv/bin/python3)
else
  bundle=""
  if [[ ! -x .venv/bin/python ]]; then
    echo "+ creating .venv (scripts/venv.sh)"
    (extra=test; source scripts/venv.sh) >"$out/venv.log" 2>&1 || note "venv: failed (see venv.log)"
  fi
  [[ -x .venv/bin/python ]] && candidates+=(.venv/bin/python)
fi
command -v python3 >/dev/null && candidates+=("$(command -v python3)")

python=""
for candidate in "${candidates[@]}"; do
  if cuda_python "$candidate" >>"$out/env.log"; then
    python=$candidate
    break
  fi
done

{
  echo "--- nvidia-smi"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
} >>"$out/env.log"

if [[ -n "$bundle" ]]; then
  # the interpreter to install into: the CUDA one, else (a dry run) the first with a torch
  target=$python
  if [[ -z "$target" ]]; then
    for candidate in "${candidates[@]}"; do
      if "$candidate" -c "import torch" >/dev/null 2>&1; then
        target=$candidate
        break
      fi
    done
  fi
  if ! bash scripts/gpu_bundle_install.sh "$bundle" "${GPU_SITE:-/tmp/site}" "${target:-python3}" \
    >"$out/bundle.log" 2>&1; then
    cat "$out/bundle.log"
    note "bundle: FAILED to install or import (see bundle.log); nothing else was run"
    exit 4
  fi
  cat "$out/bundle.log"
  export PYTHONPATH="${GPU_SITE:-/tmp/site}:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  note "bundle: installed and checked with ${target:-python3}; PYTHONPATH=$PYTHONPATH"
fi
cat "$out/env.log"
if [[ -z "$python" ]]; then
  note "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  note "!!! NO CUDA: no interpreter here has a torch that sees a GPU (tried: ${candidates[*]})."
  note "!!! The venv's torch==2.13.0 is probably the CPU wheel. Install a CUDA build of torch"
  note "!!! 2.13.0 in .venv, or point GPU_PYTHON at an interpreter that has one (with this"
  note "!!! project's dependencies: pip install -e '.[test]'). Nothing was run."
  [[ -n "$bundle" ]] && note "!!! (The bundle's imports and Ray start passed: see bundle.log.)"
  note "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  exit 3
fi
note "python: $python"

status=0
stage() {  # stage NAME SECONDS LOG COMMAND...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0 rc
  t0=$(date +%s)
  echo "+ [$name, at most ${limit}s] $*"
  timeout --kill-after=20 "$limit" "$@" >"$log" 2>&1
  rc=$?
  tail -n 40 "$log"
  note "$name: exit $rc after $(($(date +%s) - t0)) s (log: $log)"
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
  fi
}

# -v: a line per test as it ends; a test past 90 s dumps every thread's stack (a hang shows)
stage tests "$tests_s" "$out/tests.log" "$python" -m pytest -m gpu -v -rA --durations=0 \
  -o faulthandler_timeout=90 --junitxml="$out/tests.xml" \
  tests/test_gpu.py tests/test_optimizer.py tests/test_step_failures.py
stage bench "$bench_s" "$out/bench.log" "$python" benchmarks/gpu_bench.py --out "$out"

note "total: $(($(date +%s) - started)) s; exit $status; results and logs in $out"
exit $status
