#!/usr/bin/env bash
# Builds probe-cascade against a full (CUDA) torch 2.11.0, for GPU machines.
#
# The default build links the CPU-only libtorch from scripts/fetch-libtorch.sh, which sees no
# CUDA device. This one links libtorch_cuda.so too (build.rs keeps it with --no-as-needed) and
# builds into target/gpu, so switching between the two never rebuilds torch-sys in place.
#
#   TORCH_DIR=/path/to/site-packages/torch scripts/build-gpu.sh   # an existing torch 2.11.0
#   scripts/build-gpu.sh                                          # or a cached venv (~4.7 GB)
#
# Output: target/gpu/release/probe-cascade and, without debug info (small enough to copy to a
# GPU machine), target/gpu/probe-cascade-gpu. There, put that machine's torch/lib on
# LD_LIBRARY_PATH: the rpath baked in points at this machine's install.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${PROBE_CASCADE_CACHE:-$HOME/.cache/probe-cascade}

if [ -z "${TORCH_DIR:-}" ]; then
  venv="$cache/venv-torch-2.11.0"
  if [ ! -f "$venv/.complete" ]; then
    python3 -m venv "$venv"
    # torch pins its CUDA 13 wheels (cublas, cudnn, ...) exactly; the torch wheel itself is
    # reused from fetch-libtorch.sh's download when present.
    "$venv/bin/pip" install --quiet --find-links "$cache/wheels" torch==2.11.0
    touch "$venv/.complete"
  fi
  TORCH_DIR=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
fi

version=$(sed -n 's/^__version__ = .\([^+"'"'"']*\).*/\1/p' "$TORCH_DIR/version.py" 2>/dev/null || true)
if [ "$version" != "2.11.0" ]; then
  echo "error: $TORCH_DIR is torch '${version:-?}', but tch 0.24.0 needs 2.11.0" >&2
  exit 1
fi
if [ ! -f "$TORCH_DIR/lib/libtorch_cuda.so" ]; then
  echo "error: $TORCH_DIR/lib has no libtorch_cuda.so (a CPU-only torch?)" >&2
  exit 1
fi

# The CUDA graph shim (the core's `cuda-graphs` feature) includes CUDA 13's runtime headers,
# which torch's nvidia-cuda-runtime wheel carries, and their crt/ headers, which it does not:
# those come from the pinned nvidia-cuda-crt wheel (headers only, 0.1 MB), cached.
crt_version=13.0.88
crt="$cache/cuda-crt-$crt_version/include"
if [ ! -f "$crt/crt/host_config.h" ]; then
  mkdir -p "$cache/wheels"
  python3 -m pip download --quiet --no-deps "nvidia-cuda-crt==$crt_version" -d "$cache/wheels"
  tmp=$(mktemp -d)
  python3 -m zipfile -e "$(ls "$cache"/wheels/nvidia_cuda_crt-"$crt_version"-*.whl | head -1)" "$tmp"
  mkdir -p "$crt"
  cp -r "$tmp/nvidia/cu13/include/crt" "$crt/"
  rm -rf "$tmp"
fi
export PROBE_CASCADE_CUDA_INCLUDE="$crt${PROBE_CASCADE_CUDA_INCLUDE:+:$PROBE_CASCADE_CUDA_INCLUDE}"

cd "$repo"
features=(--features probe-cascade/cuda-graphs)
cargo build --release --bin probe-cascade --target-dir target/gpu "${features[@]}" \
  --config "env.LIBTORCH.value=\"$TORCH_DIR\"" --config 'env.LIBTORCH.force=true'
objcopy --strip-debug target/gpu/release/probe-cascade target/gpu/probe-cascade-gpu
# For scripts/gpu-bundle.sh, which builds the CUDA test binaries against the same torch and
# headers, with the same features.
echo "$TORCH_DIR" >target/gpu/torch-dir
echo "$PROBE_CASCADE_CUDA_INCLUDE" >target/gpu/cuda-include
echo "built target/gpu/probe-cascade-gpu against $TORCH_DIR"
