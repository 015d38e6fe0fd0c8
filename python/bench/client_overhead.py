#!/usr/bin/env python3
"""What `probe_cascade.Client` adds per token: `s.observe(x)` through a `probe-cascade serve`
child process (loopback TCP and a Unix socket) against an in-process `Runtime` on the same pack
and config, the same hidden states, back to back with no gap, in alternating blocks (ABAB...).
Prints medians and p95s per path and the added median.

    .venv/bin/python python/bench/client_overhead.py --pack demo/pack --trace demo/trace.npy
"""

from __future__ import annotations

import argparse
import json
import signal
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


def timed(session, rows):
    times = []
    for x in rows:
        t = time.perf_counter_ns()
        session.observe(x)
        times.append(time.perf_counter_ns() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--config", default=str(REPO / "config" / "realtime.toml"))
    ap.add_argument("--tokens", type=int, default=200, help="tokens per block")
    ap.add_argument("--rounds", type=int, default=6, help="ABAB rounds")
    ap.add_argument("--json")
    args = ap.parse_args()
    trace = torch.from_numpy(np.load(args.trace).astype(np.float32))
    work = Path(tempfile.mkdtemp())
    sock = work / "serve.sock"
    binary = REPO / "target" / "release" / "probe-cascade"
    proc = subprocess.Popen(
        [binary, "serve", "--pack", args.pack, "--config", args.config, "--listen", "127.0.0.1:0", "--no-http",
         "--unix", sock],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    fields = dict(w.split("=", 1) for w in line.split()[1:])
    rt = pc.Runtime(args.pack, config=args.config)
    tcp, unix = pc.Client(fields["grpc"]), pc.Client(f"unix:{sock}")
    sides = {"in-process Runtime": rt.session(), "Client over TCP": tcp.session(), "Client over Unix socket": unix.session()}
    times = {k: [] for k in sides}
    t = 0
    for name, s in sides.items():  # warm-up
        timed(s, trace[:32])
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(list(sides)))
        for name in order:
            rows = [trace[(t + i) % len(trace)] for i in range(args.tokens)]
            times[name] += timed(sides[name], rows)
        t += args.tokens
    base = percentile(times["in-process Runtime"], 0.5) / 1e3
    out = {"cpu": pc.cpu_info(), "tokens_per_side": args.tokens * args.rounds, "hidden_dim": int(trace.shape[1])}
    print(out["cpu"])
    print(f"{'path':26} {'p50 µs':>8} {'p95 µs':>8} {'added p50 µs':>13}")
    for name, ts in times.items():
        p50, p95 = percentile(ts, 0.5) / 1e3, percentile(ts, 0.95) / 1e3
        out[name] = {"p50_us": p50, "p95_us": p95, "added_p50_us": p50 - base}
        print(f"{name:26} {p50:8.0f} {p95:8.0f} {p50 - base:+13.0f}")
    for s in sides.values():
        s.close()
    tcp.close()
    unix.close()
    rt.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
