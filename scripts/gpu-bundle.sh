#!/usr/bin/env bash
# Writes target/gpu-bundle: what a GPU machine needs for scripts/gpu-check.sh, small enough to
# carry there (the device tool takes 64 MiB in all, working tree included):
#
#   probe-cascade-gpu   the CUDA binary (scripts/build-gpu.sh), without debug info
#   tests/              the test binaries that have CUDA tests, built against the same torch
#   gpu-check.sh        the script (run it from the repo root: it reads config/)
#
# No wheel: the Python package builds against the machine's own torch (scripts/build-python.sh),
# and a cp312 wheel for torch 2.11.0+cu130 would need that torch here as well.
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
