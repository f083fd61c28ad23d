#!/usr/bin/env bash
# Installs a bundle made by scripts/gpu_bundle.sh and checks it; scripts/gpu.sh runs it.
#
#   bash scripts/gpu_bundle_install.sh BUNDLE SITE PYTHON    # e.g. .gpu /tmp/site python3
#
# Installs the bundle's wheels into SITE (pip --no-index --no-deps --target: no network), unpacks
# its pruned ray there, and puts its generated shardopt/v1 into this checkout if missing. Reuses
# SITE when it holds this very bundle (same MANIFEST.txt). Then, with PYTHONPATH=SITE:checkout:
# imports ray, grpc, protobuf, jsonschema, the Ray parts shardopt uses and every shardopt module
# (reporting each failure), and runs one Ray actor on a local Ray (at most 120 s). Exits non-zero
# when the bundle's Python version is not PYTHON's, or anything fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bundle=$1
site=$2
python=$3

want=$(cat "$bundle/PYTHON_VERSION")
have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ "$want" != "$have" ]]; then
  echo "error: the bundle is for Python $want, $python is Python $have" >&2
  exit 1
fi

if cmp -s "$bundle/MANIFEST.txt" "$site/.shardopt-bundle"; then
  echo "+ $site already holds this bundle"
else
  echo "+ installing $bundle into $site with $python"
  rm -rf "$site"
  mkdir -p "$site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$bundle"/wheels/*.whl
  # Python's tarfile, not tar -J: the machine may have no xz
  "$python" -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    tar.extractall(sys.argv[2], **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))' \
    "$bundle"/ray-*-pruned.tar.xz "$site"
  cp "$bundle/MANIFEST.txt" "$site/.shardopt-bundle"
fi
if [[ ! -f shardopt/v1/optimizer_pb2.py ]]; then
  echo "+ shardopt/v1 from the bundle"
  mkdir -p shardopt/v1
  cp "$bundle"/v1/* shardopt/v1/
fi

export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "+ import check and one Ray actor (PYTHONPATH=$PYTHONPATH)"
timeout --kill-after=10 120 "$python" - <<'EOF'
import importlib
import importlib.metadata
import pkgutil
import sys

import google.protobuf
import grpc
import jsonschema
import ray
import ray.cluster_utils
import ray.experimental
import ray.util.metrics
import torch

import shardopt

print(f"python {sys.version.split()[0]}; torch {torch.__version__}; ray {ray.__version__} from "
      f"{ray.__file__}; grpc {grpc.__version__}; protobuf {google.protobuf.__version__}; "
      f"jsonschema {importlib.metadata.version('jsonschema')}")
# demo needs scikit-learn, testing's S3 server moto: neither is needed on the GPU machine
optional = {"sklearn", "moto", "s3fs"}
failed = []
for module in pkgutil.walk_packages(shardopt.__path__, "shardopt."):
    if module.name.endswith("__main__"):  # runs the CLI
        continue
    try:
        importlib.import_module(module.name)
    except Exception as err:  # report every module that does not import, then fail
        missing = getattr(err, "name", None)
        if isinstance(err, ImportError) and missing and missing.split(".")[0] in optional:
            print(f"  {module.name}: needs {missing} (optional, not in the bundle)")
        else:
            failed.append(f"{module.name}: {type(err).__name__}: {err}")
for line in failed:
    print("  FAILED", line)


@ray.remote(num_cpus=0)
class Echo:
    def ping(self, x):
        import shardopt.core.proto  # the workers see the checkout and the bundle too

        return x + 1, shardopt.core.proto.SERVICE_NAME


ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
try:
    print("ray actor:", ray.get(Echo.remote().ping.remote(41), timeout=90))
finally:
    ray.shutdown()
sys.exit(1 if failed else 0)
EOF
