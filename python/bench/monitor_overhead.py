#!/usr/bin/env python3
"""What `hf.monitor` adds to a decode step: `model.generate` of a random-weight Llama (built
from a config, no download) with and without the monitor, on the same prompts, in alternating
blocks (ABAB...) so that drift falls on both sides alike. The runtime scores on `--device`
(a CUDA runtime reads the model's tensors where they lie). Prints, per batch size, the median
time per generated token of each side and the added median, in ms.

    .venv/bin/python python/bench/monitor_overhead.py --pack demo/pack --device cuda:0
    .venv/bin/python python/bench/monitor_overhead.py --pack tiny/pack --device cpu --tokens 8 --rounds 2

The model's width is the pack's D; `--layers` decoder layers (4), intermediate size 2.7 D.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tomllib
from pathlib import Path

import torch
import transformers

import probe_cascade as pc
from probe_cascade import hf

REPO = Path(__file__).resolve().parents[2]


def llama(d: int, layers: int, device: str) -> transformers.LlamaForCausalLM:
    heads = max(1, d // 128) if d >= 128 else 4
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=d,
        intermediate_size=int(2.7 * d),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def per_token(model, ids, tokens, device, rt=None) -> float:
    """Seconds per generated token of one `generate` (monitored when `rt` is given)."""
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        if rt is None:
            model.generate(ids, **kwargs)
        else:
            with hf.monitor(model, rt, layer="last"):
                model.generate(ids, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", required=True)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default=str(REPO / "config" / "realtime.toml"))
    ap.add_argument("--batch", default="1,16", help="batch sizes, comma-separated")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per block")
    ap.add_argument("--rounds", type=int, default=6, help="blocks per side")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    config = tomllib.loads(Path(args.config).read_text())
    dev = config.setdefault("device", {})
    dev["device"] = args.device
    if args.device == "cpu":
        dev.setdefault("cpu_kernel", "auto")
    rt = pc.Runtime(args.pack, config=config)
    model = llama(rt.hidden_dim, args.layers, args.device)
    print(f"model: random Llama, D={rt.hidden_dim}, {args.layers} layers, on {args.device}; "
          f"runtime: store on {rt.store_device or 'none (CPU kernel)'}")
    results = {}
    for b in [int(x) for x in args.batch.split(",")]:
        ids = torch.randint(3, 32000, (b, 8), generator=torch.Generator().manual_seed(b)).to(args.device)
        per_token(model, ids, 4, args.device)  # warm-up: kernels, allocator, cuBLAS handles
        per_token(model, ids, 4, args.device, rt)
        plain, monitored = [], []
        for _ in range(args.rounds):
            plain.append(per_token(model, ids, args.tokens, args.device))
            monitored.append(per_token(model, ids, args.tokens, args.device, rt))
        p, m = statistics.median(plain) * 1e3, statistics.median(monitored) * 1e3
        results[b] = {"plain_ms": p, "monitored_ms": m, "added_ms": m - p}
        print(f"B={b:>3}: model alone {p:.3f} ms/token, monitored {m:.3f} ms/token, added {m - p:+.3f} ms "
              f"({args.rounds} blocks of {args.tokens} tokens per side)")
    rt.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "batches": results}, indent=1))


if __name__ == "__main__":
    main()
