#!/usr/bin/env bash
# One prepared run on a GPU machine: is the device path right, and every figure of the
# resident-store targets (docs/benchmarks.md "On a GPU") in one table.
#
#   make gpu-bundle                  # on the build machine: target/gpu-bundle (< 64 MiB)
#   bash target/gpu-bundle/gpu-check.sh OUT=dir    # on the GPU machine, from the repo root
#
# Environment: BIN (default: the bundle's probe-cascade-gpu), DEVICE (cuda:0; `cpu` runs the
# same on the CPU with device.cpu_kernel = "torch", to test the script where there is no GPU),
# OUT (where results go), TOKENS (200), BIG (concepts of the large pack, 8000), WORK (scratch).
# Nothing is downloaded: the packs and traces are synthesized there.
#
# It runs, in order (each step's output in OUT/<step>.txt, the table in OUT/table.md):
#   1. the bundle's CUDA tests (the test binaries in tests/, each filtered to `cuda` and `store`);
#   2. `run` of the demo pack (1,000 concepts, D=2560, bf16) on DEVICE against the reference
#      engine on the CPU: top-10 lists and logits token by token;
#   3. seed top-30 and decompose, back to back, with CUDA graphs and eagerly; host-to-device
#      weight bytes per token;
#   4. 1, 8 and 32 sessions at seed top-30 (tokens/s);
#   5. a BIG-concept bf16 pack with a 2,000-probe store, base [0], threshold 0.3, top-100;
#   6. exhaustive on both packs;
#   7. `tune`: exhaustive beside the cascade, latency against recall (OUT/tune/tune.md);
#   8. the Python package (the bundle's wheel, beside the machine's own torch): the tests
#      that hand tensors over on the device (hf.monitor on a random-weight Llama included),
#      then what hf.monitor adds to a decode step at B=1 and B=16 (python/bench/monitor_overhead.py).
#      Skipped where the machine's Python has no pytest or transformers.
set -uo pipefail
for kv in "$@"; do export "${kv?}"; done
here=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-$here/probe-cascade-gpu}
DEVICE=${DEVICE:-cuda:0}
OUT=${OUT:?where results go: OUT=dir}
TOKENS=${TOKENS:-200}
BIG=${BIG:-8000}
work=${WORK:-/tmp/pc-gpu-check}
mkdir -p "$OUT" "$work"
start=$SECONDS
if [ "$DEVICE" != cpu ]; then
  # The binary's rpath names the build machine's torch: this machine's comes first.
  torch_lib=$(python3 -c 'import os,torch;print(os.path.dirname(torch.__file__))')/lib
  export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1 || true
"$BIN" cpu >"$OUT/cpu.txt" 2>&1 || true

step() { # $1: name, then a command; prints ok/FAILED with the time
  local name=$1 t0=$SECONDS
  shift
  if "$@" >"$OUT/$name.txt" 2>&1; then
    echo "$name: ok ($((SECONDS - t0)) s)"
  else
    echo "$name: FAILED ($((SECONDS - t0)) s)"
    tail -5 "$OUT/$name.txt"
  fi
}

# 1. The CUDA tests, where the bundle has them.
for t in "$here"/tests/*; do
  [ -x "$t" ] && step "test-$(basename "$t")" "$t" cuda store --test-threads 1
done

# Packs and traces.
[ -f "$work/demo/manifest.json" ] || step pack-demo "$BIN" pack synth --preset demo --out "$work/demo"
[ -f "$work/demo.npy" ] || step trace-demo "$BIN" trace synth --pack "$work/demo" --preset busy --tokens 210 --out "$work/demo.npy"
[ -f "$work/big/manifest.json" ] || step pack-big "$BIN" pack synth --preset demo --concepts "$BIG" --out "$work/big"
[ -f "$work/big.npy" ] || step trace-big "$BIN" trace synth --pack "$work/big" --preset busy --tokens 210 --out "$work/big.npy"

# Configs: a shipped one with keys set (python: tomllib reads, a small writer writes).
cfg() { # $1: out name, $2: shipped config, then key=value (TOML values)
  python3 - "$@" <<'PY'
import sys, tomllib
name, base, *sets = sys.argv[1:]
c = tomllib.load(open(f"config/{base}.toml", "rb"))
for kv in sets:
    key, value = kv.split("=", 1)
    *path, last = key.split(".")
    d = c
    for p in path:
        d = d.setdefault(p, {})
    if value == "{}":
        d[last] = {}
    else:
        d[last] = tomllib.loads(f"v = {value}")["v"]
def dump(d, prefix=""):
    plain = {k: v for k, v in d.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in d.items() if isinstance(v, dict)}
    out = [f"[{prefix}]"] if prefix and (plain or not tables) else []
    for k, v in plain.items():
        out.append(f"{k} = {v!r}".replace("'", '"').replace("True", "true").replace("False", "false"))
    for k, v in tables.items():
        out += dump(v, f"{prefix}.{k}" if prefix else k)
    return out
import os
open(f"{os.environ['work']}/{name}.toml", "w").write("\n".join(dump(c)) + "\n")
PY
}
export work
dev=("device.device=\"$DEVICE\"")
[ "$DEVICE" = cpu ] && dev+=('device.cpu_kernel="torch"')
cfg cpu realtime
cfg seed realtime "${dev[@]}"
cfg decompose decompose "${dev[@]}"
# The same with every round eager (no CUDA graphs), side by side.
cfg seed-eager realtime "${dev[@]}" device.cuda_graphs=false
cfg decompose-eager decompose "${dev[@]}" device.cuda_graphs=false
cfg exhaustive realtime "${dev[@]}" 'cascade.expansion="exhaustive"' 'cascade.pruning="none"' \
  cascade.max_loaded=1000 runtime.pool_slots=1000
row_bytes=$(( (128 * 2560 + 128 + 64 * 128 + 64 + 64 + 1) * 4 ))
cfg big offline "${dev[@]}" 'cascade.base_layers=[0]' 'cascade.expansion={}' \
  'cascade.expansion.threshold.load_threshold=0.3' 'cascade.pruning={}' 'cascade.pruning.top_k.keep_top_k=100' \
  cascade.max_loaded=2000 runtime.pool_slots=2000 'runtime.mode="exact"' "device.store_bytes=$((2000 * row_bytes))"
cfg exhaustive-big realtime "${dev[@]}" 'cascade.expansion="exhaustive"' 'cascade.pruning="none"' \
  "cascade.max_loaded=$BIG" "runtime.pool_slots=$BIG"
# Exhaustive reads every row each token: in bf16 the store is half the bytes (HBM-bound).
for c in exhaustive exhaustive-big; do
  sed 's/^compute_dtype = .*/compute_dtype = "bf16"/' "$work/$c.toml" >"$work/$c-bf16.toml"
done

run() { # $1: name, $2: pack, then run's arguments
  local name=$1 pack=$2
  shift 2
  step "$name" "$BIN" run --pack "$work/$pack" --trace "$work/$pack.npy" --tokens "$TOKENS" --json "$OUT/$name.json" "$@"
}
# 2–3. Correctness and single-stream latency (run scores tokens back to back).
run reference demo --engine reference --config "$work/cpu.toml"
run seed demo --engine runtime --config "$work/seed.toml"
run seed-eager demo --engine runtime --config "$work/seed-eager.toml"
run decompose demo --engine runtime --config "$work/decompose.toml"
run decompose-eager demo --engine runtime --config "$work/decompose-eager.toml"
run exhaustive demo --engine runtime --config "$work/exhaustive.toml"
# 4. Sessions.
for n in 1 8 32; do
  run "sessions-$n" demo --engine runtime --config "$work/seed.toml" --sessions "$n"
done
# 5–6. The large pack.
run big big --engine runtime --config "$work/big.toml" --skip-bad-tokens
run exhaustive-big big --engine runtime --config "$work/exhaustive-big.toml"
run exhaustive-bf16 demo --engine runtime --config "$work/exhaustive-bf16.toml"
run exhaustive-big-bf16 big --engine runtime --config "$work/exhaustive-big-bf16.toml"
# 7. Where exhaustive beats the cascade, at what recall: `tune` on the demo pack, exhaustive
# beside two thresholds, in both modes (OUT/tune/tune.md).
step tune "$BIN" tune --pack "$work/demo" --trace "$work/demo.npy" --base "$work/seed.toml" --no-presets \
  --grid 'cascade.expansion.threshold.load_threshold=0.1,0.3;cascade.expansion=exhaustive' \
  --tokens "$((TOKENS / 2))" --warmup 5 --out "$OUT/tune"

# 8. Python on the device.
wheel=$(ls "$here"/wheel/probe_cascade-*.whl 2>/dev/null | head -1)
if [ -n "$wheel" ] && python3 -c 'import pytest, transformers' 2>/dev/null; then
  # Installed beside the machine's packages (its torch), not into them.
  rm -rf "$work/pylib"
  step python-install python3 -m pip install --quiet --no-deps --no-index --target "$work/pylib" "$wheel"
  export PROBE_CASCADE_BIN=$BIN PYTHONPATH="$work/pylib${PYTHONPATH:+:$PYTHONPATH}"
  step python-tests python3 -m pytest -q -rs -p no:cacheprovider \
    python/tests/test_runtime.py python/tests/test_hf_device.py -k "cuda or store"
  quick=()
  [ "$DEVICE" = cpu ] && quick=(--batch 1 --tokens 4 --rounds 1) # a D=2560 model on a CPU is slow
  step monitor python3 python/bench/monitor_overhead.py --pack "$work/demo" --device "$DEVICE" \
    --json "$OUT/monitor.json" "${quick[@]}"
else
  echo "python: skipped (no wheel in the bundle, or no pytest/transformers here)" | tee "$OUT/python-tests.txt"
fi

python3 - "$OUT" "$DEVICE" "$TOKENS" "$BIG" <<'PY' | tee "$OUT/table.md"
import json, sys
out, device, tokens, big = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def doc(name):
    try:
        return json.load(open(f"{out}/{name}.json"))
    except Exception:
        return None
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else float("nan")
WARM = 20  # tokens left out of the percentiles: the store fills as the first tokens run
def lat(name):
    d = doc(name)
    if d is None:
        return "missing"
    ms = [t["ms"] for t in d["tokens"] if "ms" in t and t["index"] >= WARM]
    errors = sum("error" in t for t in d["tokens"])
    return f"p50 {pct(ms, 50):.3f} ms, p99 {pct(ms, 99):.3f} ms" + (f", {errors} token errors" if errors else "")
def traffic(name):
    d = doc(name)
    t = d and d["summary"].get("weight_traffic")
    if not t:
        return "missing"
    st = t.get("store") or {}
    n = len(d["tokens"])
    return (f"{t['install_bytes_copied'] / n / 1e6:.2f} MB/token over {n} tokens "
            f"({st.get('uploads')} probes copied in, {st.get('prefetched')} of them prefetched and "
            f"{st.get('prefetch_used')} of those used, {st.get('hits')} resident hits, "
            f"{st.get('evictions')} evictions, {st.get('rows')} rows)")
def tps(name):
    d = doc(name)
    return f"{d['summary']['tokens_per_s']:,.0f} tokens/s" if d else "missing"
def states(name):
    d = doc(name)
    st = d and (d["summary"].get("weight_traffic") or {}).get("store")
    return f"{st.get('states_in_place')} / {st.get('states_sent')}" if st else "missing"
def monitor():
    d = doc("monitor")
    if not d:
        return "missing"
    return "; ".join(f"B={b}: {v['added_ms']:+.3f} ms (model alone {v['plain_ms']:.3f} ms/token)"
                     for b, v in d["batches"].items())
def check():
    ref, got = doc("reference"), doc("seed")
    if not ref or not got:
        return "missing"
    same, worst = 0, 0.0
    for a, b in zip(got["tokens"], ref["tokens"]):
        na, nb = [e["name"] for e in a.get("top", [])], [e["name"] for e in b.get("top", [])]
        same += na == nb
        for x, y in zip(a.get("top", []), b.get("top", [])):
            if x["name"] == y["name"]:
                worst = max(worst, abs(x["logit"] - y["logit"]))
    return f"{same} of {len(got['tokens'])} tokens' top-10 as the CPU reference; largest logit difference {worst:.1e}"
rows = [
    ("device run vs CPU reference (demo pack, seed top-30)", check()),
    ("scoring path", doc("seed") and doc("seed")["summary"].get("weight_traffic", {}).get("path") or "missing"),
    ("seed top-30, demo pack (1,000 bf16), back to back", lat("seed")),
    ("  the same, every round eager (device.cuda_graphs = false)", lat("seed-eager")),
    ("decompose, demo pack, back to back", lat("decompose")),
    ("  the same, every round eager", lat("decompose-eager")),
    ("weight bytes host-to-device, seed top-30", traffic("seed")),
    ("1 / 8 / 32 sessions, seed top-30", " / ".join(tps(f"sessions-{n}") for n in (1, 8, 32))),
    (f"{big}-concept bf16 pack, 2,000-probe store, base [0], threshold 0.3, top-100", lat("big")),
    (f"  its weight traffic", traffic("big")),
    ("exhaustive, demo pack, f32 / bf16 compute", lat("exhaustive") + " / " + lat("exhaustive-bf16")),
    (f"exhaustive, {big}-concept pack, f32 / bf16 compute", lat("exhaustive-big") + " / " + lat("exhaustive-big-bf16")),
    ("hidden states scored where they lay / sent from host (seed top-30)", states("seed")),
    ("hf.monitor, added per decode step (random Llama, D=2560, 4 layers, bf16)", monitor()),
]
print(f"| figure ({device}, {tokens} tokens, percentiles from token {WARM}) | measured |")
print("|---|---|")
for k, v in rows:
    print(f"| {k} | {v} |")
PY
echo "gpu-check: $((SECONDS - start)) s"
