#!/usr/bin/env bash
# Writes target/gpu-bundle: what a GPU machine needs for scripts/gpu-check.sh, small enough to
# carry there (the device tool takes 64 MiB in all, working tree included):
#
#   probe-cascade-gpu   the CUDA binary (scripts/build-gpu.sh), without debug info
#   tests/              the test binaries that have CUDA tests, built against the same torch
#   wheel/              the Python package (scripts/build-python.sh): abi3, so the CPython 3.12
#                       of CUDA PyTorch images imports it; it links torch 2.11.0's libraries by
#                       name, and finds the machine's own (CUDA) ones once torch is imported
#   gpu-check.sh        the script (run it from the repo root: it reads config/ and python/)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash scripts/build-gpu.sh
torch_dir=$(cat target/gpu/torch-dir)
PROBE_CASCADE_CUDA_INCLUDE=$(cat target/gpu/cuda-include)
export PROBE_CASCADE_CUDA_INCLUDE
out=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out/tests"
cp target/gpu/probe-cascade-gpu scripts/gpu-check.sh "$out/"
make --no-print-directory python >/dev/null
mkdir -p "$out/wheel"
cp target/python/wheels/probe_cascade-*.whl "$out/wheel/"
# The integration tests with a CUDA case (they skip it where no GPU is present).
for t in $(grep -l 'Cuda::device_count\|cuda:0' tests/*.rs); do
  name=$(basename "$t" .rs)
  cargo test --release --test "$name" --no-run --target-dir target/gpu --features cuda-graphs \
    --config "env.LIBTORCH.value=\"$torch_dir\"" --config 'env.LIBTORCH.force=true' 2>&1 | tail -1
  bin=$(ls -t target/gpu/release/deps/"$name"-* | grep -v '\.d$' | head -1)
  objcopy --strip-debug "$bin" "$out/tests/$name"
done
size=$(du -sb "$out" | cut -f1)
echo "wrote $out: $((size / 1024 / 1024)) MiB"
if [ "$size" -gt $((60 * 1024 * 1024)) ]; then
  echo "error: $out is over 60 MiB, too large to carry with the working tree" >&2
  exit 1
fi
