#!/usr/bin/env bash
# Builds .gpu/: everything a GPU machine without internet lacks to run scripts/gpu.sh, carried
# to it as one ignored folder (docs/GPU_RUN.md says how). Run it HERE, where pip reaches an index:
#
#   bash scripts/gpu_bundle.sh                  # for the device image's Python 3.12 -> .gpu/
#   GPU_BUNDLE_PY=3.11 GPU_BUNDLE_DIR=/tmp/b311 bash scripts/gpu_bundle.sh   # same, for 3.11
#
# The device image (KINDS.md) has torch, numpy, pytest, tqdm, fsspec, prometheus-client, click,
# filelock, msgpack, packaging, pyyaml, requests, attrs, typing-extensions, aiohttp and its
# helpers, but no ray and no jsonschema, and a grpcio/protobuf of unknown version. The bundle holds:
#   wheels/     grpcio, grpcio-health-checking, grpcio-reflection, protobuf (the versions the
#               generated code checks at import) and jsonschema with its needs (ray's)
#   ray-<v>-<tag>-pruned.tar.xz   ray's wheel unpacked and pruned (the 79 MB wheel alone is over
#               the 64 MiB a device call carries): no Java jar, no dashboard web build, no
#               libraries shardopt does not use (rllib, tune, train, serve, data, llm, air)
#   v1/         the generated shardopt.v1 protobuf and gRPC modules (grpcio-tools is not there)
#   MANIFEST.txt  Python version, every file with its size and sha256
# Fails when the bundle is 60 MiB or more. Downloads are cached in $GPU_BUNDLE_CACHE.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pyver=${GPU_BUNDLE_PY:-3.12}
dest=${GPU_BUNDLE_DIR:-.gpu}
cache=${GPU_BUNDLE_CACHE:-/tmp/shardopt-gpu-bundle-cache/$pyver}
pip_python=${PIP_PYTHON:-python3}
ray_version=2.60.0
# the versions tested here (scripts/test.sh's venv); the generated code needs grpcio>=1.85.1,
# protobuf>=7.35
wheels=(
  grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
)
# ray's parts shardopt never imports (ray.init, actors, ray.util.metrics, ray.cluster_utils,
# ray.experimental and the dashboard/runtime-env agents stay)
prune=(
  ray/jars ray/dashboard/client/build ray/rllib ray/tune ray/train ray/serve ray/data ray/llm
  ray/air ray/cpp ray/tests
)
max_mib=60

tag=cp${pyver/./}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
download() {
  mkdir -p "$cache"
  "$pip_python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
    --implementation cp "${platforms[@]}" -d "$cache" "$@"
}

echo "+ downloading ray==$ray_version and ${wheels[*]} for Python $pyver into $cache"
download "ray==$ray_version" "${wheels[@]}"

rm -rf "$dest"
mkdir -p "$dest/wheels"
for spec in "${wheels[@]}"; do
  name=${spec%%==*}
  version=${spec##*==}
  file=$(find "$cache" -maxdepth 1 -iname "${name//-/[-_]}-${version}-*.whl" | head -n 1)
  [[ -n "$file" ]] || { echo "error: no wheel for $spec in $cache" >&2; exit 1; }
  cp "$file" "$dest/wheels/"
done

ray_wheel=$(find "$cache" -maxdepth 1 -name "ray-${ray_version}-${tag}-*.whl" | head -n 1)
[[ -n "$ray_wheel" ]] || { echo "error: no ray $ray_version wheel for $tag" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
echo "+ unpacking and pruning $(basename "$ray_wheel")"
"$pip_python" -m zipfile -e "$ray_wheel" "$stage"
for part in "${prune[@]}"; do
  rm -rf "${stage:?}/$part"
done
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
# the wheel's RECORD lists the pruned files; say so where pip would look
echo "pruned by shardopt scripts/gpu_bundle.sh: ${prune[*]}" >"$stage/ray-${ray_version}.dist-info/PRUNED"
# the unzipped executables lose their mode bits
chmod +x "$stage"/ray/core/src/ray/gcs/gcs_server "$stage"/ray/core/src/ray/raylet/raylet
tarball="$dest/ray-${ray_version}-${tag}-pruned.tar.xz"
echo "+ compressing -> $tarball (a minute or two)"
tar -C "$stage" -cf - ray "ray-${ray_version}.dist-info" | xz -9 -T1 >"$tarball"

if [[ ! -f shardopt/v1/optimizer_pb2.py ]]; then
  echo "+ generating shardopt/v1 (scripts/venv.sh installs the project, which generates it)"
  (extra=test; source scripts/venv.sh)
fi
mkdir -p "$dest/v1"
cp shardopt/v1/*.py shardopt/v1/*.pyi "$dest/v1/"

{
  echo "python $pyver ($tag), ray $ray_version, built $(date -u +%FT%TZ)"
  (cd "$dest" && find . -type f ! -name MANIFEST.txt -print0 | sort -z | xargs -0 sha256sum)
} >"$dest/MANIFEST.txt"
echo "$pyver" >"$dest/PYTHON_VERSION"
size_kib=$(du -sk "$dest" | cut -f1)
echo "+ $dest: $((size_kib / 1024)) MiB"
du -ak "$dest" | sort -n -r | head -n 8
if ((size_kib >= max_mib * 1024)); then
  echo "error: $dest is $((size_kib / 1024)) MiB, at least $max_mib MiB" >&2
  exit 1
fi
