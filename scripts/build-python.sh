#!/usr/bin/env bash
# Builds the probe_cascade wheel with maturin against the torch of the Python environment
# (scripts/python-env.sh) and installs it into the repo's .venv.
#
# The core crate links the lean CPU libtorch (LIBTORCH in .cargo/config.toml); the extension
# links the environment's torch (LIBTORCH_USE_PYTORCH=1, and tch's python-extension feature).
# Both are the same 2.11.0 build, but torch-sys built two ways in one target directory would
# rebuild every time, so the extension builds in target/python.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${PROBE_CASCADE_CACHE:-$HOME/.cache/probe-cascade}
deps="$cache/venv-torch-2.11.0"
venv="$repo/.venv"

export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
cd "$repo/python"
rm -rf "$repo/target/python/wheels"
# auditwheel skip: the extension links the libtorch of the installed torch, never a bundled copy.
"$deps/bin/maturin" build --release --quiet --strip --auditwheel skip --compatibility linux --interpreter "$venv/bin/python" \
  --target-dir "$repo/target/python" --out "$repo/target/python/wheels"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall \
  "$repo"/target/python/wheels/probe_cascade-*.whl
cd / && "$venv/bin/python" -c 'import probe_cascade as p; print("probe_cascade", p.__version__, "installed into .venv;", p.cpu_info())'
