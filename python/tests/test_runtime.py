"""The Python API against the Rust runtime: inputs, sessions, batches, errors, resources."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch

import probe_cascade as pc
from conftest import EXACT, assert_same, cli, rust_reports


def observe_all(rt, rows):
    with rt.session() as s:
        return [s.observe(x) for x in rows]


def test_cpu_and_path_are_reported():
    info = pc.cpu_info()
    print(f"\ncpu: {info}")
    assert "kernel paths" in info and "default" in info


def test_numpy_input_matches_rust(tiny):
    want = rust_reports(tiny["pack"], tiny["trace"], tiny["dir"], "f32")
    with pc.Runtime(tiny["pack"], config=EXACT) as rt:
        assert_same(observe_all(rt, list(tiny["trace"])), want)


def test_torch_inputs_match_rust(tiny):
    trace = tiny["trace"]
    want = rust_reports(tiny["pack"], trace, tiny["dir"], "f32")
    t = torch.from_numpy(trace.copy())
    # A row of a wider tensor whose last dimension is strided: made contiguous, same answers.
    wide = torch.zeros(t.shape[0], t.shape[1] * 2)
    wide[:, ::2] = t
    with pc.Runtime(tiny["pack"], config=EXACT) as rt:
        assert_same(observe_all(rt, list(t)), want)
        assert_same(observe_all(rt, [wide[i, ::2] for i in range(len(t))]), want)
        assert_same(observe_all(rt, list(t.double())), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_widened_exactly(tiny, dtype):
    # The runtime widens bf16/f16 exactly; Rust on the same values, stored as f32, agrees.
    t = torch.from_numpy(tiny["trace"].copy()).to(dtype)
    want = rust_reports(tiny["pack"], t.float().numpy(), tiny["dir"], f"half-{dtype}")
    with pc.Runtime(tiny["pack"], config=EXACT) as rt:
        assert_same(observe_all(rt, list(t)), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_input_matches_rust(tiny):
    want = rust_reports(tiny["pack"], tiny["trace"], tiny["dir"], "f32")
    t = torch.from_numpy(tiny["trace"].copy()).cuda()
    with pc.Runtime(tiny["pack"], config=EXACT) as rt:
        assert_same(observe_all(rt, list(t)), want)


def store_config(device="cpu"):
    """EXACT on the resident store of `device` (the tch backend; on the CPU, cpu_kernel = "torch")."""
    import tomllib

    c = tomllib.loads(EXACT.read_text())
    c.setdefault("device", {}).update(cpu_kernel="torch", device=device)
    return c


STORE_DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", STORE_DEVICES)
def test_tensors_on_the_stores_device_are_scored_where_they_lie(tiny, device):
    trace = tiny["trace"]
    t = torch.from_numpy(trace.copy()).to(device)
    with pc.Runtime(tiny["pack"], config=store_config(device)) as rt:
        assert rt.store_device == device
        want = observe_all(rt, list(trace))  # numpy arrays: host memory, sent each round
        before = rt.stats()["steps"]["traffic"]["store"]
        got = observe_all(rt, list(t))  # tensors on the store's device: read where they lie
        batch = []
        with rt.session() as a, rt.session() as b:
            for k in range(len(t)):  # [2, D] on the device: its rows are views, no copy
                batch.append(rt.observe_batch([a, b], torch.stack([t[k], t[k]])))
        after = rt.stats()["steps"]["traffic"]["store"]
    assert after["states_in_place"] - before["states_in_place"] >= 3 * len(trace)
    # Nothing from host memory: a new session's base install scores nothing until its first token.
    assert after["states_sent"] == before["states_sent"], "no state of a tensor came from host memory"
    for k, (g, w) in enumerate(zip(got, want)):
        assert [d.name for d in g.top] == [d.name for d in w.top], k
        assert np.allclose([d.logit for d in g.top], [d.logit for d in w.top], atol=1e-5), k
        for r in batch[k]:  # two states per round: another matmul shape, the same scores to 1e-5
            assert [d.name for d in r.top] == [d.name for d in g.top], k
            assert np.allclose([d.logit for d in r.top], [d.logit for d in g.top], atol=1e-5), k


def test_a_bad_tensor_on_the_stores_device_is_refused_naming_what_is_wrong(tiny):
    row = torch.from_numpy(tiny["trace"][0].copy())
    with pc.Runtime(tiny["pack"], config=store_config()) as rt, rt.session() as s:
        bad = row.clone()
        bad[3] = float("nan")
        with pytest.raises(pc.BadHiddenState, match=r"\[3\] is NaN"):
            s.observe(bad)
        with pytest.raises(pc.BadHiddenState, match="D=32"):
            s.observe(row[:31])
        with pytest.raises(pc.BadHiddenState, match="dtype"):
            s.observe(row.to(torch.int32))
        assert s.observe(row).token == 3


def test_report_fields_and_dict(tiny):
    with pc.Runtime(tiny["pack"], config=EXACT) as rt, rt.session() as s:
        r = s.observe(tiny["trace"][0])
    d = r.to_dict()
    assert d["token"] == 0 and len(d["top"]) == len(r.top) > 0
    assert set(d["stages"]) == {"initial_scoring", "expansion_lookup", "loading", "new_scoring", "pruning", "sorting"}
    assert r.elapsed_us > 0 and r.in_flight == [] and r.failed_loads == []
    top = r.top[0]
    assert top.path[-1] == top.name and 0 <= top.prob <= 1
    assert np.float32(top.prob) == np.float32(1 / (1 + np.exp(-np.float64(top.logit)))) or abs(
        top.prob - 1 / (1 + np.exp(-top.logit))
    ) < 1e-6
    # The path walks first parents up to a root (layer 0).
    info = pc.pack.open(tiny["pack"])
    root = info.concept(top.path[0])
    assert root.layer == 0 and root.parents == ()
    for parent, child in zip(top.path, top.path[1:]):
        assert info.concept(child).parents[0] == parent


def test_watch_profiles_raise_the_alerts_rust_raises_whatever_the_report_size(tiny, tmp_path):
    # headspace's profile format: two base concepts, a comment, a blank line.
    manifest = json.loads((tiny["pack"] / "manifest.json").read_text())
    roots = [c["name"] for c in manifest["concepts"] if c["layer"] == 0][:2]
    profile = tmp_path / "watched.txt"
    profile.write_text(f"# two subtrees\n{roots[0]}\n\n{roots[1]}\n")
    out = tmp_path / "watched.json"
    np.save(tmp_path / "t.npy", tiny["trace"])
    cli("run", "--engine", "runtime", "--config", EXACT, "--pack", tiny["pack"], "--trace", tmp_path / "t.npy",
        "--watch", profile, "--watch-threshold", "0.2", "--json", out)
    want = [[(a["profile"], a["concept"], a["layer"], a["watched"], np.float32(a["score"])) for a in t["alerts"]]
            for t in json.loads(out.read_text())["tokens"]]
    watch = [{"name": "watched", "file": str(profile), "threshold": 0.2}]
    with pc.Runtime(tiny["pack"], config=EXACT) as rt, rt.session(watch=watch) as s, \
            rt.session(watch=watch, report_top_k=1) as one:
        got, outside = [], 0
        for row in tiny["trace"]:
            r, small = s.observe(row), one.observe(row)
            got.append([(a.profile, a.concept, a.layer, a.watched, np.float32(a.score)) for a in r.alerts])
            assert [a.to_dict() for a in small.alerts] == [a.to_dict() for a in r.alerts], "the report size changes no alert"
            outside += sum(a.concept not in {d.name for d in small.top} for a in small.alerts)
            for a in r.alerts:
                assert a.watched in roots and a.path[-1] == a.concept and a.score >= 0.2
    assert got == want
    assert sum(map(len, got)) > 0 and outside > 0
    alerted = next(a for alerts in got for a in alerts)
    assert alerted[0] == "watched"
    # A profile naming no concept of the pack is a ConfigError naming the concept.
    with pc.Runtime(tiny["pack"], config=EXACT) as rt, pytest.raises(pc.ConfigError, match="NoSuchConcept"):
        rt.session(watch=[{"name": "x", "concepts": ["NoSuchConcept"]}])


def test_a_headspace_trace_from_python_is_the_one_run_writes(tiny, tmp_path):
    np.save(tmp_path / "t.npy", tiny["trace"])
    texts = [f" word{i}" for i in range(len(tiny["trace"]))]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    out = tmp_path / "rust.json"
    cli("run", "--engine", "runtime", "--config", EXACT, "--pack", tiny["pack"], "--trace", tmp_path / "t.npy",
        "--trace-json", out, "--token-text", tmp_path / "texts.json")
    want = json.loads(out.read_text())
    with pc.Runtime(tiny["pack"], config=EXACT) as rt, rt.session() as s:
        tokens = [(texts[i], s.observe(row)) for i, row in enumerate(tiny["trace"])]
    path = tmp_path / "py.json"
    pc.trace.write(path, [{"prompt": "p", "title": "t", "tokens": tokens}], model="m")
    got = json.loads(path.read_text())
    for key in ("pack", "total_lenses", "calibrated", "fields", "concepts"):
        assert got[key] == want[key], key
    assert got["model"] == "m" and got["runs"][0]["title"] == "t"
    strip = lambda toks: [{k: v for k, v in t.items() if k != "ms"} for t in toks]  # noqa: E731
    assert strip(got["runs"][0]["tokens"]) == strip(want["runs"][0]["tokens"])
    # Bad input names what is wrong.
    with pytest.raises(TypeError, match=r"runs\[0\]\[\"tokens\"\]\[1\]"):
        pc.trace.dumps([{"prompt": "p", "tokens": [tokens[0], ("x", 3)]}])
    with pytest.raises(ValueError, match="no \"prompt\""):
        pc.trace.dumps([{"tokens": tokens}])


def test_observe_batch_matches_separate_runs(tiny):
    trace = tiny["trace"]
    half = len(trace) // 2
    a_want = rust_reports(tiny["pack"], trace[:half], tiny["dir"], "a")
    b_want = rust_reports(tiny["pack"], trace[half : 2 * half], tiny["dir"], "b")
    with pc.Runtime(tiny["pack"], config=EXACT) as rt:
        a, b = rt.session(), rt.session()
        got_a, got_b = [], []
        for k in range(half):
            rows = np.stack([trace[k], trace[half + k]])  # [2, D], rows read in place
            ra, rb = rt.observe_batch([a, b], rows)
            got_a.append(ra)
            got_b.append(rb)
        assert_same(got_a, a_want)
        assert_same(got_b, b_want)
        # A list of 1-D tensors works too; so does a session opened later.
        c = rt.session()
        rc, ra = rt.observe_batch([c, a], [torch.from_numpy(trace[0]), torch.from_numpy(trace[0])])
        assert rc.token == 0 and ra.token == half
        assert rt.stats()["steps"]["requests"] >= 2 * half
        a.close(), b.close(), c.close()


def test_threads_share_a_runtime(tiny):
    trace = tiny["trace"]
    want = rust_reports(tiny["pack"], trace, tiny["dir"], "f32")
    errors, results = [], {}
    with pc.Runtime(tiny["pack"], config=EXACT) as rt:

        def work(i):
            try:
                results[i] = observe_all(rt, list(trace))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors
    for i in range(4):
        assert_same(results[i], want)


def test_bad_hidden_states_raise(tiny):
    x = tiny["trace"][0]
    with pc.Runtime(tiny["pack"], config=EXACT) as rt, rt.session() as s:
        with pytest.raises(pc.BadHiddenState, match=r"token 0: the hidden state has 5 values .* D=32") as e:
            s.observe(x[:5])
        assert e.value.token == 0
        bad = x.copy()
        bad[7] = np.nan
        with pytest.raises(pc.BadHiddenState, match=r"token 1: hidden state value \[7\] is NaN"):
            s.observe(bad)
        with pytest.raises(pc.BadHiddenState, match=r"must be 1-D"):
            s.observe(np.stack([x, x]))
        with pytest.raises(pc.BadHiddenState, match=r"dtype"):
            s.observe(torch.zeros(32, dtype=torch.int64))
        with pytest.raises(pc.BadHiddenState, match=r"torch.Tensor or a numpy.ndarray, not list"):
            s.observe(list(x))
        # The session still works after bad input. Tokens 0 and 1 reached the runtime (and
        # were refused there); the last three were refused before, and took no number.
        assert s.observe(x).token == 2
        t2 = rt.session()
        bad_rows = np.stack([x, bad])
        with pytest.raises(pc.BadHiddenState, match=r"observe_batch item 1: .*NaN") as e:
            rt.observe_batch([s, t2], bad_rows)
        assert e.value.position == 1
        ok, err = rt.observe_batch([s, t2], bad_rows, errors="return")
        assert isinstance(ok, pc.Report) and isinstance(err, pc.BadHiddenState)
        with pytest.raises(pc.BadHiddenState, match=r"3 hidden states for 2 sessions"):
            rt.observe_batch([s, t2], np.stack([x, x, x]))
        t2.close()


def test_errors_are_one_hierarchy():
    for cls in (pc.BadHiddenState, pc.ProbeLoadError, pc.ConfigError):
        assert issubclass(cls, pc.ProbeCascadeError)
    assert issubclass(pc.ProbeCascadeError, Exception)


def test_pack_errors_name_the_file(tiny, tmp_path):
    with pytest.raises(pc.ProbeLoadError, match=r"nowhere/manifest.json") as e:
        pc.Runtime(tmp_path / "nowhere")
    assert e.value.path.endswith("manifest.json")
    # A corrupt probe in the base layer: its checksum fails when the runtime loads it.
    import json
    import shutil

    pack = tmp_path / "corrupt"
    shutil.copytree(tiny["pack"], pack)
    manifest = json.loads((pack / "manifest.json").read_text())
    victim = manifest["concepts"][0]
    assert victim["layer"] == 0
    shard = pack / manifest["shards"][victim["weights"]["shard"]]
    data = bytearray(shard.read_bytes())
    data[victim["weights"]["offset"] + 16] ^= 0xFF
    shard.write_bytes(bytes(data))
    defects = pc.pack.verify(pack)
    assert len(defects) == 1 and victim["name"] in defects[0], defects
    with pytest.raises(pc.ProbeLoadError, match=victim["name"]):
        pc.pack.verify(pack, raise_on_defect=True)
    # Sessions load the base layer when they open.
    rt = pc.Runtime(pack, config=EXACT)
    with pytest.raises(pc.ProbeLoadError) as e:
        rt.session()
    rt.close()
    assert victim["name"] in str(e.value) and shard.name in str(e.value), str(e.value)


def test_config_errors_name_the_key(tiny, tmp_path):
    with pytest.raises(pc.ConfigError, match=r"`cascade.max_loded`: unknown field") as e:
        pc.Runtime(tiny["pack"], config={"cascade": {"max_loded": 3}})
    assert e.value.key == "cascade.max_loded"
    with pytest.raises(pc.ConfigError, match=r"`cascade.report_top_k`: invalid type"):
        pc.Runtime(tiny["pack"], config={"cascade": {"report_top_k": "ten"}})
    with pytest.raises(pc.ConfigError, match=r"no-such.toml"):
        pc.Runtime(tiny["pack"], config=str(tmp_path / "no-such.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[cascade]\nbase_layers = []\n")
    with pytest.raises(pc.ConfigError, match=r"bad.toml: `cascade.base_layers` must name at least one layer") as e:
        pc.Runtime(tiny["pack"], config=bad)
    assert e.value.key == "cascade.base_layers"
    with pc.Runtime(tiny["pack"], config="realtime") as rt:
        assert rt.config_source == 'preset "realtime"'
        with pytest.raises(pc.ConfigError, match=r"`cascade.report_top_k`"):
            rt.session(report_top_k=-1)
        with pytest.raises(pc.ConfigError, match=r"`mode`"):
            rt.session(mode="fast")
        with pytest.raises(pc.ConfigError, match=r"cascade.pruning.*top_k.*keep_top_k|session options"):
            rt.session(pruning={"top_k": {"keep_top_k": 0}})
        s = rt.session(report_top_k=2)
        assert len(s.observe(np.zeros(32, np.float32) + 0.1).top) <= 2


def test_limits_closing_and_context_managers(tiny):
    config = {"cascade": {"max_loaded": 40}, "runtime": {"max_sessions": 2, "cache_bytes": 1 << 24}}
    with pc.Runtime(tiny["pack"], config=config) as rt:
        with rt.session() as a:
            b = rt.session()
            with pytest.raises(pc.ProbeCascadeError, match=r"runtime.max_sessions = 2"):
                rt.session()
            b.close()
            assert b.closed
            with pytest.raises(pc.ProbeCascadeError, match=r"session \d+ is closed"):
                b.observe(tiny["trace"][0])
            c = rt.session()  # b's place is free again
            c.close()
            assert rt.open_sessions == 1
        assert a.closed and rt.open_sessions == 0
    assert rt.closed
    with pytest.raises(pc.ProbeCascadeError, match=r"Runtime is closed"):
        rt.session()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_rss_stays_flat_over_ten_thousand_observes(tiny):
    trace = [torch.from_numpy(r.copy()) for r in tiny["trace"]]
    with pc.Runtime(tiny["pack"], config=EXACT) as rt, rt.session() as s:
        for i in range(2000):  # warm up: caches, arenas, allocator pools
            s.observe(trace[i % len(trace)])
        before = rss_bytes()
        for i in range(10_000):
            s.observe(trace[i % len(trace)])
        grown = rss_bytes() - before
    print(f"\nRSS grew {grown / 1e6:.2f} MB over 10,000 observes")
    assert grown < 8e6, f"RSS grew {grown / 1e6:.1f} MB over 10,000 observes"


def test_a_forked_child_gets_an_error_not_a_hang(tiny):
    rt = pc.Runtime(tiny["pack"], config=EXACT)
    s = rt.session()
    s.observe(tiny["trace"][0])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: must not touch the parent's threads
        os.close(r)
        try:
            s.observe(tiny["trace"][1])
            msg = "no error"
        except pc.ProbeCascadeError as e:
            msg = "ok: " + str(e)
        except BaseException as e:  # noqa: BLE001
            msg = f"wrong error: {e!r}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    msg = os.read(r, 4096).decode()
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert msg.startswith("ok: ") and "fork" in msg, msg
    # The parent carries on.
    assert s.observe(tiny["trace"][1]).token == 1
    s.close()
    rt.close()


def test_type_stubs_match_the_module():
    """Every name the stubs declare exists in the native module, and every public name of the
    module is declared (so editors see what is there)."""
    import ast
    from pathlib import Path

    from probe_cascade import _native

    stub = ast.parse((Path(pc.__file__).parent / "_native.pyi").read_text())
    declared = {}
    for node in stub.body:
        if isinstance(node, ast.ClassDef):
            members = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AnnAssign)) and hasattr(n, "name")}
            members |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
            declared[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            declared[node.name] = set()
        elif isinstance(node, ast.AnnAssign):
            declared[node.target.id] = set()
    public = {n for n in dir(_native) if not n.startswith("_") or n == "__version__"}
    assert public == set(declared), (public ^ set(declared))
    for cls, members in declared.items():
        obj = getattr(_native, cls)
        if isinstance(obj, type) and not issubclass(obj, BaseException):
            for m in members - {"__init__"}:
                assert hasattr(obj, m), f"{cls}.{m}"


def test_a_viewer_report_holds_each_stream_and_names_one_with_too_few_texts(tiny, tmp_path):
    import json

    from probe_cascade import viewer

    with pc.Runtime(tiny["pack"], config=str(EXACT)) as rt, rt.session() as a, rt.session() as b:
        ra = [a.observe(row) for row in tiny["trace"][:5]]
        rb = [b.observe(row) for row in tiny["trace"][5:8]]
        page = viewer.page({"first": ra, "second": rb}, texts={"first": list("abcde")}, runtime=rt)
        with pytest.raises(ValueError, match="stream 'second': 2 texts for 3 reports"):
            viewer.page({"first": ra, "second": rb}, texts={"second": ["x", "y"]})
    start = page.index(">", page.index('id="pc-data"')) + 1
    data = json.loads(page[start : page.index("</script>", start)].replace("<\\/", "</"))
    assert [(s["label"], len(s["events"])) for s in data["sessions"]] == [("first", 5), ("second", 3)]
    assert [e["text"] for e in data["sessions"][0]["events"]] == list("abcde")
    assert [e["text"] for e in data["sessions"][1]["events"]] == [None] * 3
    assert [e["top"][0]["name"] for e in data["sessions"][1]["events"]] == [r.top[0].name for r in rb]
    assert len(data["pack"]["hierarchy"]) == rt.concepts
