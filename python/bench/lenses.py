"""What lenses over two model layers cost a token, against one probe per concept, through the
runtime (`probe-cascade run --engine runtime`, the same path as `serve` and Python).

Two packs share a hierarchy (600 concepts: 20 roots, 120, 460; D=576, bf16, layer_norm) and
each concept's first probe; in the v2 pack every lens adds a second probe at another model
layer, so it holds twice the probes. The traces share their first layer's states. Runs are
interleaved (v1, v2, v1, v2, ...) and medians are quoted:

    .venv/bin/python python/bench/lenses.py [--runs 5] [--tokens 300] [--config config/decompose.toml]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np

import probe_cascade as pc

REPO = Path(__file__).resolve().parents[2]


def make(out: Path, tokens: int) -> None:
    rng = np.random.default_rng(0)
    d, roots, mids, leaves = 576, 20, 120, 460
    concepts = [(f"R{i}", 0, []) for i in range(roots)]
    concepts += [(f"M{i}", 1, [i % roots]) for i in range(mids)]
    concepts += [(f"L{i}", 2, [roots + i % mids]) for i in range(leaves)]
    n = len(concepts)

    def weights():
        return {
            "w1": rng.normal(0, 0.05, (n, 128, d)).astype(np.float32),
            "b1": rng.normal(0, 0.1, (n, 128)).astype(np.float32),
            "w2": rng.normal(0, 0.1, (n, 64, 128)).astype(np.float32),
            "b2": rng.normal(0, 0.1, (n, 64)).astype(np.float32),
            "w3": rng.normal(0, 0.5, (n, 1, 64)).astype(np.float32),
            "b3": rng.normal(-1.0, 0.1, (n, 1)).astype(np.float32),
        }

    first, second = weights(), weights()
    pc.pack.write(out / "v1", concepts, first, dtype="bf16", input_normalization="layer_norm")
    both = {k: np.stack([first[k], second[k]], axis=1).reshape((2 * n,) + first[k].shape[1:]) for k in first}
    lenses = [[(12, None), (20, None)] for _ in range(n)]
    pc.pack.write(out / "v2", concepts, both, dtype="bf16", input_normalization="layer_norm", probes=lenses)
    a, b = rng.normal(0, 1, (tokens, d)).astype(np.float32), rng.normal(0, 1, (tokens, d)).astype(np.float32)
    np.save(out / "v1.npy", a)
    np.save(out / "v2.npy", np.concatenate([a, b], axis=1))


def run(binary: Path, out: Path, v: str, config: Path, tokens: int) -> dict:
    report = out / f"{v}.json"
    subprocess.run(
        [str(binary), "run", "--engine", "runtime", "--config", str(config), "--pack", str(out / v),
         "--trace", str(out / f"{v}.npy"), "--tokens", str(tokens), "--json", str(report)],
        check=True, capture_output=True,
    )
    toks = json.loads(report.read_text())["tokens"]
    ms = sorted(t["ms"] for t in toks)
    scored = statistics.mean(t["scored"] for t in toks)
    return {"p50": statistics.median(ms), "mean": statistics.mean(ms), "scored": scored}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--config", type=Path, default=REPO / "config" / "decompose.toml")
    a = ap.parse_args()
    binary = REPO / "target" / "release" / "probe-cascade"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        make(out, a.tokens)
        rows = {"v1": [], "v2": []}
        for _ in range(a.runs):
            for v in rows:
                rows[v].append(run(binary, out, v, a.config, a.tokens))
    print("| pack | probes per lens | lenses scored per token | probes scored per token | p50 ms | mean ms | µs per probe scored (p50) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v, k in (("v1", 1), ("v2", 2)):
        p50 = statistics.median(r["p50"] for r in rows[v])
        mean = statistics.median(r["mean"] for r in rows[v])
        scored = statistics.median(r["scored"] for r in rows[v])
        print(f"| {v} | {k} | {scored:.1f} | {scored * k:.1f} | {p50:.2f} | {mean:.2f} | {1000 * p50 / (scored * k):.1f} |")


if __name__ == "__main__":
    main()
