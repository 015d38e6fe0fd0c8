#!/usr/bin/env bash
# One prepared run on a GPU machine (the device tool): is the session path right on the
# device, and what does it cost, beside an older binary when one is given.
#
#   NEW=target/gpu/probe-cascade-gpu [OLD=path/to/older/probe-cascade-gpu] \
#     DEVICE=cuda:0 OUT=dir scripts/gpu-check.sh
#
# It synthesizes the demo pack (1,000 concepts, D=2560, bf16) and a busy trace there (nothing
# is carried but the binaries), then:
#   1. `run` on the device, exact, against the reference engine on the CPU: top-10 lists and
#      logits compared token by token (check.json);
#   2. the same in pipelined mode with a long budget, and 8 sessions at once (`run --sessions`);
#   3. `bench` of the runtime on the device, OLD and NEW alternately, exact and pipelined, at
#      seed top-30 and decompose (bench-*/bench.md).
# DEVICE=cpu runs the same on the CPU (to test the script where there is no GPU); BENCH=0
# stops after the checks.
set -euo pipefail
NEW=${NEW:?the binary to check}
DEVICE=${DEVICE:-cuda:0}
OUT=${OUT:?where results go}
TOKENS=${TOKENS:-200}
work=${WORK:-/tmp/pc-gpu-check}
mkdir -p "$OUT" "$work"
if [ "$DEVICE" != cpu ]; then
  # The binary's rpath names the build machine's torch: this machine's comes first.
  torch_lib=$(python3 -c 'import os,torch;print(os.path.dirname(torch.__file__))')/lib
  export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1 || true
"$NEW" cpu >"$OUT/cpu.txt" 2>&1 || true
[ -f "$work/pack/manifest.json" ] || "$NEW" pack synth --preset demo --out "$work/pack" >/dev/null
[ -f "$work/busy.npy" ] || "$NEW" trace synth --pack "$work/pack" --preset busy --tokens 210 --out "$work/busy.npy" >/dev/null

config() { # $1: device, $2: mode, $3: latency budget
  sed -e "s/^device = \"cpu\"/device = \"$1\"/" -e "s/^mode = \"exact\"/mode = \"$2\"/" \
    -e "s/^latency_budget_us = 0/latency_budget_us = $3/" config/realtime.toml
}
config "$DEVICE" exact 0 >"$work/dev-exact.toml"
config "$DEVICE" pipelined 5000000 >"$work/dev-pipelined.toml"
config cpu exact 0 >"$work/cpu.toml"
# On a shared arena each session reserves its cap (max_loaded = 500) of runtime.pool_slots.
sed -e 's/^pool_slots = 512/pool_slots = 4096/' "$work/dev-exact.toml" >"$work/dev-sessions.toml"

run() { # $1: name, then run's arguments
  local name=$1
  shift
  local t0=$SECONDS
  if "$NEW" run --pack "$work/pack" --trace "$work/busy.npy" --tokens "$TOKENS" "$@" >"$OUT/$name.txt" 2>&1; then
    echo "$name: ok ($((SECONDS - t0)) s)"
  else
    echo "$name: FAILED ($((SECONDS - t0)) s)"
    tail -5 "$OUT/$name.txt"
  fi
}
run reference --engine reference --config "$work/cpu.toml" --json "$OUT/reference.json"
run device-exact --engine runtime --config "$work/dev-exact.toml" --json "$OUT/device-exact.json"
run device-pipelined --engine runtime --config "$work/dev-pipelined.toml" --json "$OUT/device-pipelined.json"
run device-sessions --engine runtime --config "$work/dev-sessions.toml" --sessions 8 --json "$OUT/device-sessions.json"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def tokens(name):
    try:
        return json.load(open(f"{out}/{name}.json"))["tokens"]
    except Exception as e:
        return None
ref = tokens("reference")
result = {}
for name in ["device-exact", "device-pipelined"]:
    got = tokens(name)
    if ref is None or got is None:
        result[name] = "missing"
        continue
    same, worst = 0, 0.0
    for a, b in zip(got, ref):
        na = [e["name"] for e in a.get("top", [])]
        nb = [e["name"] for e in b.get("top", [])]
        same += na == nb
        for x, y in zip(a.get("top", []), b.get("top", [])):
            if x["name"] == y["name"]:
                worst = max(worst, abs(x["logit"] - y["logit"]))
    result[name] = {"tokens": len(got), "same_top10": same, "max_logit_diff": worst}
json.dump(result, open(f"{out}/check.json", "w"), indent=1)
print(json.dumps(result))
PY

bench() { # $1: label, $2: binary
  local t0=$SECONDS
  "$2" bench --pack "$work/pack" --trace "$work/busy.npy" --out "$OUT/bench-$1" --device "$DEVICE" \
    --engines runtime-exact,runtime-pipelined --configs seed-top-30,decompose --tokens "$TOKENS" --warmup 10 \
    >"$OUT/bench-$1.log" 2>&1 && echo "bench $1: ok ($((SECONDS - t0)) s)" || { echo "bench $1: FAILED"; tail -5 "$OUT/bench-$1.log"; }
}
# BENCH=0: the checks only.
[ "${BENCH:-1}" = 0 ] && exit 0
for round in 1 2; do
  [ -n "${OLD:-}" ] && bench "old-$round" "$OLD"
  bench "new-$round" "$NEW"
done
for f in "$OUT"/bench-*/bench.md; do
  grep "^| seed\|^| decomp" "$f" | sed "s/^/$(basename "$(dirname "$f")") /" || true
done
