#!/usr/bin/env bash
# Generates the Python client's messages and stubs from proto/ into python/probe_cascade/v1/
# (committed, so that `pip install ./python` needs no protoc; python/tests/test_client.py
# checks that they match the proto). Usage: scripts/gen-python-proto.sh [OUT_DIR]
#
# The generator is grpcio-tools 1.62.3 (protoc 25), in a venv of its own that
# scripts/python-env.sh makes: its code runs on every grpcio from 1.62.3 and every protobuf from
# 4.25.1 up to today's (python/tests/test_client.py runs the client's tests on the oldest), where
# newer generators' code refuses any grpcio or protobuf older than themselves.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/python}
cache=${PROBE_CASCADE_CACHE:-$HOME/.cache/probe-cascade}
py=${GRPC_TOOLS_PYTHON:-$cache/venv-grpc-tools-1.62.3/bin/python}
if [ ! -x "$py" ]; then
  echo "gen-python-proto: $py is missing: scripts/python-env.sh (make pyenv) makes it" >&2
  exit 1
fi
mkdir -p "$out/probe_cascade/v1"
"$py" -m grpc_tools.protoc -I"$repo/proto" --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  probe_cascade/v1/probe_cascade.proto
touch "$out/probe_cascade/v1/__init__.py"
