"""headspace's JSON trace format, so that headspace's viewer (its `demo/viewer.html`) opens
runs recorded here.

    from probe_cascade import hf, trace
    with hf.monitor(model, rt) as mon:
        out = model.generate(**enc, max_new_tokens=64)
    steps = mon.steps(out, tokenizer)[0]
    trace.write("run.json", [{"prompt": prompt, "tokens": [(text, r) for _, text, r in steps]}],
                model="SmolLM2-135M-Instruct")

The document is written by the same Rust code as `probe-cascade run --trace-json`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence

from ._native import headspace_trace

__all__ = ["dumps", "document", "write"]


def dumps(runs: Sequence[Dict[str, Any]], model: Optional[str] = None, top: int = 8) -> str:
    """The trace as JSON text. `runs`: dicts with "prompt", "tokens" (a list of (text, Report)
    pairs, every report from one pack) and optional "title", "note" and "seconds"."""
    return headspace_trace(list(runs), model, top)


def document(runs: Sequence[Dict[str, Any]], model: Optional[str] = None, top: int = 8) -> Dict[str, Any]:
    """The trace as a dict: {created, model, pack, total_lenses, calibrated, fields, concepts, runs}."""
    return json.loads(dumps(runs, model, top))


def write(path: "os.PathLike[str] | str", runs: Sequence[Dict[str, Any]], model: Optional[str] = None,
          top: int = 8) -> None:
    """Writes the trace to `path`."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(runs, model, top))
