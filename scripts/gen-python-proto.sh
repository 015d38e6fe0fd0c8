#!/usr/bin/env bash
# Generates the Python client's messages and stubs from proto/ into python/probe_cascade/v1/
# (committed, so that `pip install ./python` needs no protoc; python/tests/test_client.py
# checks that they match the proto). Usage: scripts/gen-python-proto.sh [OUT_DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/python}
py=${PYTHON:-$repo/.venv/bin/python}
mkdir -p "$out/probe_cascade/v1"
"$py" -m grpc_tools.protoc -I"$repo/proto" --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  probe_cascade/v1/probe_cascade.proto
touch "$out/probe_cascade/v1/__init__.py"
