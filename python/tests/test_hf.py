"""probe_cascade.hf.monitor on the real small model (SmolLM2-135M-Instruct, D=576) with a tiny
pack trained on it by examples/train_pack.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import probe_cascade as pc
from conftest import EXACT, REPO

sys.path.insert(0, str(REPO / "examples"))
transformers = pytest.importorskip("transformers")
import smollm2  # noqa: E402
import train_pack  # noqa: E402

from probe_cascade import hf  # noqa: E402

PROMPTS = ["The dog chased the", "In spring I planted a small tree and a rose bush in"]


@pytest.fixture(scope="module")
def model_tok():
    torch.manual_seed(0)
    return smollm2.load()


@pytest.fixture(scope="module")
def trained(model_tok, tmp_path_factory):
    model, tok = model_tok
    out = tmp_path_factory.mktemp("smollm2") / "pack"
    stats = train_pack.train(model, tok, out, log=lambda m: print(m), **train_pack.TINY)
    assert stats["tpr"] > 0.5 and stats["tnr"] > 0.8, stats  # the probes learned something
    return out


def generate(model, tok, rt, max_new_tokens=5, **monitor_options):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    seen = []  # what the monitor should have read: the final norm's last position, per step
    handle = model.get_decoder().norm.register_forward_hook(lambda m, a, o: seen.append(o[:, -1, :].clone()))
    try:
        with hf.monitor(model, rt, layer="last", **monitor_options) as mon:
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        handle.remove()
    return enc, out, mon, seen


def generated(out, enc, eos):
    """Each sequence's generated ids, up to and including its first end-of-sequence token."""
    rows = []
    for i in range(out.shape[0]):
        ids = out[i, enc["input_ids"].shape[1] :].tolist()
        cut = next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))
        rows.append(ids[:cut])
    return rows


def test_monitor_reports_align_with_tokens(model_tok, trained):
    model, tok = model_tok
    rt = pc.Runtime(trained, config=EXACT)
    enc, out, mon, seen = generate(model, tok, rt)
    steps = mon.steps(out, tok)
    assert len(steps) == 2 and len(mon.generations) == 1 and mon.generations[0].steps == len(seen)
    for i, ids in enumerate(generated(out, enc, hf._eos_ids(model))):
        assert [tid for tid, _, _ in steps[i]] == ids
        assert [r.token for _, _, r in steps[i]] == list(range(len(ids)))
        assert all(text == tok.decode([tid]) for tid, text, _ in steps[i])
        # Replayed on a fresh session, the states the hook saw give the same reports, bit for bit.
        with rt.session() as s:
            for k, (_, _, r) in enumerate(steps[i]):
                again = s.observe(seen[k][i])
                assert [(d.name, d.logit) for d in again.top] == [(d.name, d.logit) for d in r.top]
    # Sessions are closed when the block ends.
    assert rt.open_sessions == 0
    rt.close()


def test_a_generation_is_recorded_in_headspaces_trace_format(model_tok, trained, tmp_path):
    model, tok = model_tok
    rt = pc.Runtime(trained, config=EXACT)
    enc, out, mon, seen = generate(model, tok, rt)
    steps = mon.steps(out, tok)
    runs = [{"prompt": p, "title": f"prompt {i}", "tokens": [(text, r) for _, text, r in steps[i]]}
            for i, p in enumerate(PROMPTS)]
    path = tmp_path / "trace.json"
    pc.trace.write(path, runs, model="SmolLM2-135M-Instruct")
    doc = json.loads(path.read_text())
    assert doc["model"] == "SmolLM2-135M-Instruct" and doc["total_lenses"] == rt.concepts
    assert [r["prompt"] for r in doc["runs"]] == PROMPTS
    for i, run in enumerate(doc["runs"]):
        assert [t["t"] for t in run["tokens"]] == [text for _, text, _ in steps[i]]
        assert [[row[0] for row in t["top"]] for t in run["tokens"]] == [[d.name for d in r.top[:8]] for _, _, r in steps[i]]
        assert all(len(t["fields"]) == len(doc["fields"]) for t in run["tokens"])
    rt.close()


def page_data(page: str) -> dict:
    """The data a viewer page carries."""
    start = page.index('<script type="application/json" id="pc-data">')
    start = page.index(">", start) + 1
    return json.loads(page[start : page.index("</script>", start)].replace("<\\/", "</"))


def test_a_monitor_with_a_tokenizer_keeps_each_tokens_text_and_writes_an_html_report(model_tok, trained, tmp_path):
    model, tok = model_tok
    rt = pc.Runtime(trained, config=EXACT)
    enc, out, mon, _ = generate(model, tok, rt, tokenizer=tok)
    g = mon.generations[0]
    steps = mon.steps(out, tok)
    for i in range(len(PROMPTS)):
        # The text of the token each report's state was read at: the prompt's last real
        # token, then each generated token but the last.
        last = int(torch.nonzero(enc["attention_mask"][i]).flatten()[-1])
        want = [tok.decode([int(enc["input_ids"][i, last])])] + [text for _, text, _ in steps[i][:-1]]
        assert g.texts[i] == want
    page = Path(mon.to_html(tmp_path / "gen.html")).read_text()
    data = page_data(page)
    assert [s["label"] for s in data["sessions"]] == [f"generation 0 · sequence {i}" for i in range(len(PROMPTS))]
    for i, s in enumerate(data["sessions"]):
        assert [e["text"] for e in s["events"]] == g.texts[i]
        assert [[d["name"] for d in e["top"]] for e in s["events"]] == [[d.name for d in r.top] for r in g.reports[i]]
        assert [[d["path"] for d in e["top"]] for e in s["events"]] == [[d.path for d in r.top] for r in g.reports[i]]
    assert data["pack"]["concepts"] == rt.concepts
    # In Jupyter: the monitor as the page in an iframe, a report as a table of its concepts.
    assert mon._repr_html_().startswith("<iframe srcdoc=")
    r = g.reports[0][0]
    assert all(d.name in r._repr_html_() for d in r.top)
    rt.close()


def test_prompt_observation_skips_padding(model_tok, trained):
    model, tok = model_tok
    rt = pc.Runtime(trained, config=EXACT)
    enc, out, mon, _ = generate(model, tok, rt, max_new_tokens=2, observe_prompt=True)
    mask = enc["attention_mask"]
    assert mask[0].sum() < mask[1].sum()  # the first prompt is shorter: left-padded
    for i in range(2):
        real = int(mask[i].sum())
        # Every real prompt position but the last (whose state makes generated token 0).
        assert len(mon.prompt_reports[i]) == real - 1
        assert [r.token for r in mon.prompt_reports[i]] == list(range(real - 1))
        assert mon.reports[i][0].token == real - 1
    rt.close()


def test_finished_sequences_are_not_observed(model_tok, trained):
    model, tok = model_tok
    rt = pc.Runtime(trained, config=EXACT)
    enc, out, _, _ = generate(model, tok, rt, max_new_tokens=4)
    # Make sequence 0's second generated token count as end-of-sequence, and generate again:
    # sequence 0 stops there (generate pads it on), sequence 1 goes on.
    stop = out[0, enc["input_ids"].shape[1] + 1].item()
    config = model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = stop
    try:
        enc, out, mon, _ = generate(model, tok, rt, max_new_tokens=4)
    finally:
        config.eos_token_id = saved
    ids = generated(out, enc, {stop})
    assert len(ids[0]) <= 2 and ids[0][-1] == stop
    assert [len(r) for r in mon.reports] == [len(x) for x in ids]
    rt.close()


def test_monitor_refuses_a_bad_layer(model_tok, trained):
    model, _ = model_tok
    with pc.Runtime(trained, config=EXACT) as rt:
        with pytest.raises(pc.ProbeCascadeError, match=r"layer 99 is out of range: the model has 30"):
            with hf.monitor(model, rt, layer=99):
                pass
        # A decoder layer's output works too (the same width as the pack's D).
        _, tok = model_tok
        with hf.monitor(model, rt, layer=-1) as mon:
            with torch.no_grad():
                model.generate(**tok(PROMPTS[:1], return_tensors="pt"), max_new_tokens=2, do_sample=False)
        assert len(mon.reports[0]) == 2


def test_monitor_takes_a_client_of_a_server_with_the_same_reports(model_tok, trained, tmp_path):
    from conftest import Served

    model, tok = model_tok
    rt = pc.Runtime(trained, config=str(EXACT))
    _, out, local, _ = generate(model, tok, rt)
    rt.close()
    served = Served(trained, tmp_path)
    try:
        with pc.Client(served.grpc) as client:
            # With a tokenizer, each observe_batch also carries the tokens' texts.
            _, out_remote, remote, _ = generate(model, tok, client, tokenizer=tok)
    finally:
        assert served.stop() == 0
    assert torch.equal(out, out_remote)
    assert all(t is not None for seq in remote.generations[0].texts for t in seq)
    assert [len(r) for r in remote.reports] == [len(r) for r in local.reports]
    for seq_l, seq_r in zip(local.reports, remote.reports):
        for a, b in zip(seq_l, seq_r):
            assert [(d.name, d.path, d.logit) for d in a.top] == [(d.name, d.path, d.logit) for d in b.top]


def test_monitor_hooks_several_model_layers_in_one_forward_pass(model_tok, tmp_path):
    """A pack of lenses over model layers 3 and 7 (random probes, D=576): the monitor hooks both
    decoder layers in each forward pass, and its reports are what observing transformers'
    hidden_states[m + 1] at each generated position directly gives (to rounding: one forward
    over the whole sequence is not the cached decode step by step)."""
    model, tok = model_tok
    rng = np.random.default_rng(5)
    d = model.config.hidden_size
    concepts = [("Low", 0, []), ("High", 0, []), ("Both", 1, [0])]
    probes = [[(3, None)], [(7, None)], [(3, None), (7, None)]]
    p = 4
    w = {
        "w1": rng.normal(0, 0.05, (p, 128, d)).astype(np.float32),
        "b1": np.zeros((p, 128), np.float32),
        "w2": rng.normal(0, 0.1, (p, 64, 128)).astype(np.float32),
        "b2": np.zeros((p, 64), np.float32),
        "w3": rng.normal(0, 0.5, (p, 1, 64)).astype(np.float32),
        "b3": np.zeros((p, 1), np.float32),
    }
    pc.pack.write(tmp_path / "lenses", concepts, w, input_normalization="layer_norm", probes=probes)
    config = {"cascade": {"base_layers": [0, 1], "report_top_k": 3}}
    with pc.Runtime(tmp_path / "lenses", config=config) as rt:
        enc = tok(PROMPTS[:1], return_tensors="pt")
        with hf.monitor(model, rt, layers=[7, 3]) as mon:
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        reports = mon.reports[0]
        assert len(reports) == 4
        # The same tokens, forward again with every hidden state returned.
        with torch.no_grad():
            hs = model(out[:, :-1], output_hidden_states=True).hidden_states
        start = enc["input_ids"].shape[1] - 1
        with rt.session() as s:
            for k, r in enumerate(reports):
                states = {m: hs[m + 1][0, start + k].float().numpy() for m in (3, 7)}
                again = s.observe(states)
                assert [x.name for x in again.top] == [x.name for x in r.top]
                assert [x.prob for x in again.top] == pytest.approx([x.prob for x in r.top], abs=1e-3)
        both = next(x for x in reports[0].top if x.name == "Both")
        assert [pr.model_layer for pr in both.probes] == [3, 7]
        with pytest.raises(pc.ProbeCascadeError, match="model layer numbers"):
            with hf.monitor(model, rt, layers=[-1]):
                pass


def test_generation_in_ray_actors_writes_what_a_monitor_reports_in_process(model_tok, trained, tmp_path):
    """examples/ray_generate.py (SmolLM2 and a runtime in a Ray actor, a local cluster) writes
    the detections the same generation reports under hf.monitor here, bit for bit."""
    pytest.importorskip("ray")
    import subprocess

    import probe_cascade.dataset as pds

    prompts = ["Which fruits grow on trees?", "How do birds build their nests?"]
    out = tmp_path / "gen"
    args = [sys.executable, str(REPO / "examples" / "ray_generate.py"), "--pack", str(trained), "--out", str(out)]
    args += ["--config", str(EXACT), "--actors", "1", "--batch-size", "2", "--tokens", "4"]
    for p in prompts:
        args += ["--prompt", p]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "prompt-0" in run.stdout and "prompt-1" in run.stdout, run.stdout
    got = pds.read(out)["detections"]

    model, tok = model_tok
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(chats, return_tensors="pt", padding=True)
    rt = pc.Runtime(trained, config=EXACT)
    with hf.monitor(model, rt, layer="last") as mon:
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=4, do_sample=False)
    want = pds.from_reports({f"prompt-{i}": r for i, r in enumerate(mon.reports)})["detections"]
    rt.close()
    assert want.num_rows > 0
    key = [("recording", "ascending"), ("token", "ascending"), ("rank", "ascending")]
    assert got.sort_by(key).to_pylist() == want.sort_by(key).to_pylist()

