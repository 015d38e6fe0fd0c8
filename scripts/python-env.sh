#!/usr/bin/env bash
# A small Python environment (numpy + safetensors) for tests that check packs written the way a
# Python user would write them. Cached outside the clone; the repo gets a `.venv` symlink.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${PROBE_CASCADE_CACHE:-$HOME/.cache/probe-cascade}
venv="$cache/venv-numpy2.4.6-safetensors0.8.0"
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check numpy==2.4.6 safetensors==0.8.0
  touch "$venv/.complete"
fi
ln -sfn "$venv" "$repo/.venv"
