#!/usr/bin/env python3
"""Offline scoring throughput: `probe-cascade run --traces --parquet` (one process) against
`probe_cascade.ray.score` on a local Ray cluster with 1 and 2 actors, on the same recordings,
in alternating rounds (A B C A B C ...), so drift falls on every side alike. Each figure is what
a user waits for: from the command's start (or the `score` call) until the dataset is on disk,
so the process start, the pack's opening and the actors' start-up are in it. Prints tokens/s
per side (median over rounds) and the ratios.

    .venv/bin/python python/bench/offline_scale.py                    # demo pack, calm and busy
    .venv/bin/python python/bench/offline_scale.py --recordings 64 --tokens 250 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / "target" / "release" / "probe-cascade"
CONFIG = REPO / "config" / "realtime.toml"


def cli(*args) -> str:
    out = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, check=True)
    return out.stdout


def run_cli(pack: Path, recs: Path, out: Path, concurrency: int) -> float:
    t = time.perf_counter()
    cli("run", "--config", CONFIG, "--pack", pack, "--traces", recs, "--parquet", out, "--concurrency", concurrency)
    return time.perf_counter() - t


def run_ray(pack: Path, recs: Path, out: Path, actors: int, batch: int, threads: int = 0) -> float:
    """`threads`: the config's device.threads for each actor's kernel (0: the config's own, all
    cores)."""
    import probe_cascade.ray as pcr
    from probe_cascade import _native

    config = _native.resolve_config(str(CONFIG))
    if threads:
        config.setdefault("device", {})["threads"] = threads
    t = time.perf_counter()
    pcr.score(pcr.read_recordings(recs), pack, out, config, actors=actors, batch_size=batch)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recordings", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=200, help="tokens per recording")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="recordings scored at once: --concurrency, Ray batch_size")
    ap.add_argument("--presets", default="demo,busy", help="trace presets (calm `demo`, `busy`)")
    args = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="offline-scale-"))
    pack = work / "pack"
    cli("pack", "synth", "--preset", "demo", "--out", pack)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results = {}
    for preset in args.presets.split(","):
        recs = work / f"recs-{preset}"
        recs.mkdir()
        for i in range(args.recordings):
            cli("trace", "synth", "--preset", preset, "--pack", pack, "--tokens", args.tokens, "--seed", i, "--out", recs / f"r{i:03d}.npy")
        tokens = args.recordings * args.tokens
        sides = {
            "run --parquet": lambda o: run_cli(pack, recs, o, args.batch),
            "ray, 1 actor": lambda o: run_ray(pack, recs, o, 1, args.batch),
            "ray, 2 actors": lambda o: run_ray(pack, recs, o, 2, args.batch),
            # Two actors on two cores, each kernel on one thread (no oversubscription).
            "ray, 2 × 1 thr": lambda o: run_ray(pack, recs, o, 2, args.batch, threads=1),
        }
        walls = {k: [] for k in sides}
        for r in range(args.rounds):
            for name, fn in sides.items():
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                walls[name].append(fn(out))
                print(f"{preset} round {r}: {name}: {walls[name][-1]:.2f} s", flush=True)
        base = statistics.median(walls["run --parquet"])
        print(f"\n{preset} trace: {args.recordings} recordings × {args.tokens} tokens = {tokens} tokens, {args.batch} at once")
        for name, w in walls.items():
            m = statistics.median(w)
            print(f"  {name:14} {tokens / m:8.0f} tokens/s  (median wall {m:.2f} s of {w}; {base / m:.2f}× run --parquet)")
        results[preset] = {k: statistics.median(v) for k, v in walls.items()}
    print(json.dumps({"tokens": args.recordings * args.tokens, "walls_s": results}))
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
