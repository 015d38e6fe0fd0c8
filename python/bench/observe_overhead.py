#!/usr/bin/env python3
"""What the Python binding adds per token: `Session.observe(t)` from Python against the same
runtime's `Session::observe` called from Rust (Runtime._time_rust_observe), on the same hidden
states, back to back with no gap, in alternating blocks (ABAB...) so that drift and noise fall
on both sides alike. Prints medians and p95s per side and the added median.

    .venv/bin/python python/bench/observe_overhead.py --pack demo/pack --trace demo/trace.npy
    .venv/bin/python python/bench/observe_overhead.py --tiny      # a D=32 pack: the binding's floor
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import probe_cascade as pc

REPO = Path(__file__).resolve().parents[2]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def python_side(rt, rows):
    times = []
    with rt.session() as s:
        for x in rows:
            t = time.perf_counter_ns()
            s.observe(x)
            times.append(time.perf_counter_ns() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack")
    ap.add_argument("--trace")
    ap.add_argument("--tiny", action="store_true", help="synthesize a tiny pack and trace (D=32)")
    ap.add_argument("--config", default=str(REPO / "config" / "realtime.toml"))
    ap.add_argument("--tokens", type=int, default=200, help="tokens per block")
    ap.add_argument("--rounds", type=int, default=10, help="ABAB rounds")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.tiny:
        tmp = Path(tempfile.mkdtemp())
        b = REPO / "target" / "release" / "probe-cascade"
        subprocess.run([b, "pack", "synth", "--preset", "tiny", "--out", tmp / "pack"], check=True, capture_output=True)
        subprocess.run([b, "trace", "synth", "--pack", tmp / "pack", "--tokens", "400", "--out", tmp / "t.npy"],
                       check=True, capture_output=True)
        args.pack, args.trace = tmp / "pack", tmp / "t.npy"
    trace = np.load(args.trace).astype(np.float32)
    rows = np.ascontiguousarray(trace[: args.tokens])
    inputs = {
        "torch f32": [torch.from_numpy(r) for r in rows],
        "numpy f32": list(rows),
        "torch bf16": [torch.from_numpy(r).to(torch.bfloat16) for r in rows],
    }
    bf16_rows = torch.from_numpy(rows).to(torch.bfloat16).float().numpy()
    rt = pc.Runtime(args.pack, config=args.config)
    print(f"{rt}\ncpu: {pc.cpu_info()}")
    results = {}
    for name, xs in inputs.items():
        ref = bf16_rows if "bf16" in name else rows
        rust, py = [], []
        for i in range(args.rounds):
            # Alternate which side goes first, so that neither always runs on a warmer machine.
            if i % 2 == 0:
                rust += rt._time_rust_observe(ref)
                py += python_side(rt, xs)
            else:
                py += python_side(rt, xs)
                rust += rt._time_rust_observe(ref)
        r50, p50 = percentile(rust, 0.5) / 1e3, percentile(py, 0.5) / 1e3
        results[name] = {
            "rust_p50_us": r50, "python_p50_us": p50, "added_p50_us": p50 - r50,
            "rust_p95_us": percentile(rust, 0.95) / 1e3, "python_p95_us": percentile(py, 0.95) / 1e3,
            "tokens": len(py),
        }
        print(f"{name:>11}: rust p50 {r50:8.1f} µs  python p50 {p50:8.1f} µs  added {p50 - r50:+6.1f} µs"
              f"   (p95 {results[name]['rust_p95_us']:.1f} / {results[name]['python_p95_us']:.1f} µs, "
              f"{len(py)} tokens each)")
    rt.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"pack": str(args.pack), "cpu": pc.cpu_info(), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
