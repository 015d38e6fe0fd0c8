#!/usr/bin/env python3
"""Generates from a few prompts with SmolLM2-135M-Instruct and prints the top concepts the
cascade reports, token by token.

    .venv/bin/python examples/train_pack.py --out smollm2-pack
    .venv/bin/python examples/generate_and_monitor.py --pack smollm2-pack

All prompts are generated as one batch: one session per sequence, one observe_batch per decode
step (probe_cascade.hf.monitor).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402

import probe_cascade  # noqa: E402
from probe_cascade import hf  # noqa: E402

PROMPTS = [
    "Tell me about the animals that live on a farm.",
    "What should I wear when it snows?",
    "Describe a tool you would use to fix a chair.",
]


def config_with_threads(config: str, threads: int) -> dict:
    """The preset or file as a dict, with device.threads set."""
    import tomllib

    path = Path(config)
    if not path.exists():
        path = Path(__file__).resolve().parents[1] / "config" / f"{config}.toml"
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    doc.setdefault("device", {})["threads"] = threads
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", required=True)
    ap.add_argument("--config", default="realtime", help="a preset name or a TOML file")
    ap.add_argument("--threads", type=int, default=1,
                    help="the CPU kernel's threads (device.threads; 0: all cores). The model computes on "
                         "the same cores between tokens, so one is cheaper here (docs/benchmarks.md)")
    ap.add_argument("--tokens", type=int, default=24, help="new tokens per prompt")
    ap.add_argument("--top", type=int, default=3, help="concepts printed per token")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: three built in")
    ap.add_argument("--baseline", type=int, default=0, metavar="N",
                    help="also time N generate calls without the monitor, and N with it, alternating")
    args = ap.parse_args()
    prompts = args.prompt or PROMPTS

    model, tok = smollm2.load()
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    enc = tok(chats, return_tensors="pt", padding=True)
    rt = probe_cascade.Runtime(args.pack, config=config_with_threads(args.config, args.threads))
    print(f"{rt}; cpu: {probe_cascade.cpu_info()}")

    with hf.monitor(model, rt, layer="last") as mon:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.tokens, do_sample=False)
        wall = time.perf_counter() - t

    if args.baseline:
        # What the monitor costs the user: whole generate calls, alternating with and without.
        plain, monitored = [], []
        for _ in range(args.baseline):
            for hooked, times in ((False, plain), (True, monitored)):
                t = time.perf_counter()
                with torch.no_grad():
                    if hooked:
                        with hf.monitor(model, rt, layer="last"):
                            model.generate(**enc, max_new_tokens=args.tokens, do_sample=False)
                    else:
                        model.generate(**enc, max_new_tokens=args.tokens, do_sample=False)
                times.append(time.perf_counter() - t)
        plain.sort()
        monitored.sort()
        n = len(prompts) * args.tokens
        a, b = plain[len(plain) // 2], monitored[len(monitored) // 2]
        print(f"generate, median of {args.baseline}: {a * 1e3 / n:.2f} ms per token without the monitor, "
              f"{b * 1e3 / n:.2f} ms with it ({(b - a) * 1e3 / n:+.2f} ms per token, batch of {len(prompts)})")

    steps = mon.steps(out, tok)
    for prompt, seq in zip(prompts, steps):
        print(f"\n### {prompt}")
        for _, text, report in seq:
            concepts = ", ".join(f"{d.name} {d.prob:.2f}" for d in report.top[: args.top])
            print(f"{text!r:>16}  {concepts}")
    reports = [r for seq in steps for _, _, r in seq]
    runtime_us = sorted(r.elapsed_us for r in reports)
    print(
        f"\n{len(reports)} tokens in {wall:.1f} s of generate; the runtime's time per token: "
        f"median {runtime_us[len(runtime_us) // 2]:.0f} µs"
    )
    rt.close()


if __name__ == "__main__":
    main()
