"""hf.monitor with the runtime on the model's device: a random-weight Llama (built from a
config, no download: it runs on a GPU machine that has no model files) whose hidden states the
runtime's resident store reads where they lie, on the CPU store here and on cuda:0 where a GPU
is present, beside the CPU kernel on the same states."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
import torch

import probe_cascade as pc
from conftest import EXACT

transformers = pytest.importorskip("transformers")
from probe_cascade import hf  # noqa: E402

def tiny_llama(device: str):
    """A random-weight Llama with D=32 (the tiny pack's width), built from a config: no download."""
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(config).to(device).eval()


STORE_DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("side_stream", [False, True])
@pytest.mark.parametrize("device", STORE_DEVICES)
def test_a_monitor_on_the_stores_device_scores_the_models_tensors_where_they_lie(tiny, device, side_stream):
    if side_stream and not device.startswith("cuda"):
        pytest.skip("streams are CUDA's")
    model = tiny_llama(device)
    config = tomllib.loads(EXACT.read_text())
    config.setdefault("device", {}).update(cpu_kernel="torch", device=device)
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(2)).to(device)
    seen = []
    # Copied on the device (no host sync in the loop), read back after the generation.
    handle = model.get_decoder().norm.register_forward_hook(lambda m, a, o: seen.append(o[:, -1, :].clone()))
    with pc.Runtime(tiny["pack"], config=config) as rt:
        assert rt.store_device == device
        # On a side stream, the generation's kernels run there: the runtime orders its reads
        # after them with an event, and nothing here synchronises before the monitor reads.
        stream = torch.cuda.Stream() if side_stream else None
        try:
            with hf.monitor(model, rt, layer="last") as mon, torch.no_grad():
                if stream is not None:
                    with torch.cuda.stream(stream):
                        out = model.generate(ids, max_new_tokens=6, do_sample=False)
                else:
                    out = model.generate(ids, max_new_tokens=6, do_sample=False)
        finally:
            handle.remove()
        store = rt.stats()["steps"]["traffic"]["store"]
    steps = sum(len(r) for r in mon.reports)
    assert steps > 0 and out.shape[1] > ids.shape[1]
    assert store["states_in_place"] >= steps, store
    # The same states, replayed in host memory on the CPU kernel, give the same reports.
    with pc.Runtime(tiny["pack"], config=EXACT) as cpu:
        for i, reports in enumerate(mon.reports):
            with cpu.session() as s:
                for k, r in enumerate(reports):
                    want = s.observe(seen[k][i].cpu().numpy())
                    assert [d.name for d in r.top] == [d.name for d in want.top], (i, k)
                    assert np.allclose([d.logit for d in r.top], [d.logit for d in want.top], atol=1e-4), (i, k)
