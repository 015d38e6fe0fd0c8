#!/usr/bin/env bash
# Provisions a CPU libtorch 2.11.0 (what tch 0.24.0 binds) from PyPI wheels, with pinned hashes.
#
# Why wheels: PyPI ships torch 2.11.0 for Linux x86_64 only as the CUDA 13 build (2.11.0+cu130),
# the same build the project's GPU machines carry. Its libtorch_cpu.so needs libcudart.so.13 and
# libcupti.so.13 even on CPU, so those two come from the matching CUDA 13.0 runtime wheels.
# Leaving libtorch_cuda.so out makes torch-sys link CPU-only (~500 MB instead of 4.7 GB).
#
# The extracted tree lives in a cache outside the clone, so fresh clones (CI) reuse it;
# the repo only holds a symlink `.libtorch` that .cargo/config.toml points LIBTORCH at.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${PROBE_CASCADE_CACHE:-$HOME/.cache/probe-cascade}
dest="$cache/libtorch-2.11.0-cu130-cpu"
wheels="$cache/wheels"

link() {
  ln -sfn "$dest" "$repo/.libtorch"
}

if [ -f "$dest/.complete" ]; then
  link
  exit 0
fi

mkdir -p "$wheels"
req="$wheels/requirements.txt"
cat >"$req" <<'REQ'
torch==2.11.0 --hash=sha256:7aa2f9bbc6d4595ba72138026b2074be1233186150e9292865e04b7a63b8c67a
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-cupti==13.0.85 --hash=sha256:4eb01c08e859bf924d222250d2e8f8b8ff6d3db4721288cf35d14252a4d933c8
REQ

# The libraries are the same for every CPython; pin the wheel's tags so the hash is stable
# whatever python3 runs this. pip matches manylinux tags exactly, hence the list.
platforms=()
for tag in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_25_x86_64 \
  manylinux_2_27_x86_64 manylinux_2_28_x86_64; do
  platforms+=(--platform "$tag")
done
echo "fetch-libtorch: downloading torch 2.11.0 (+cu130) and CUDA 13.0 runtime wheels into $wheels" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
  --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" \
  -r "$req" -d "$wheels"

tmp=$(mktemp -d "$cache/extract.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
python3 - "$wheels" "$tmp" <<'PY'
import sys, zipfile, glob, os, shutil
wheels, out = sys.argv[1], sys.argv[2]
lib = os.path.join(out, "lib"); os.makedirs(lib)
def pick(pattern, wanted):
    (path,) = glob.glob(os.path.join(wheels, pattern))
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if name.startswith("torch/include/") and not name.endswith("/") and wanted is None:
                z.extract(name, out)
            elif wanted and base in wanted and "/lib/" in name:
                with z.open(name) as src, open(os.path.join(lib, base), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
pick("torch-2.11.0-*.whl", {"libtorch_cpu.so", "libtorch.so", "libc10.so", "libgomp.so.1", "libshm.so", "libtorch_global_deps.so"})
pick("torch-2.11.0-*.whl", None)
pick("nvidia_cuda_runtime-13.0.96-*.whl", {"libcudart.so.13"})
pick("nvidia_cuda_cupti-13.0.85-*.whl", {"libcupti.so.13"})
os.rename(os.path.join(out, "torch", "include"), os.path.join(out, "include"))
os.rmdir(os.path.join(out, "torch"))
# torch-sys checks this file against the version it binds.
open(os.path.join(out, "build-version"), "w").write("2.11.0+cu130\n")
PY
# libtorch_cpu.so finds its neighbours through $ORIGIN; gomp is linked as -lgomp by torch-sys.
ln -sf libgomp.so.1 "$tmp/lib/libgomp.so"
touch "$tmp/.complete"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
link
echo "fetch-libtorch: libtorch ready at $dest ($(du -sh "$dest" | cut -f1))" >&2
