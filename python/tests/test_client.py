"""probe_cascade.Client against a real `probe-cascade serve` child process: the same answers as
the Rust runtime, over TCP and a Unix socket, batches, errors, auth, and generated stubs that
match the proto."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import probe_cascade as pc
from conftest import EXACT, REPO, Served, assert_same, rust_reports

grpc = pytest.importorskip("grpc")


def test_reports_match_the_rust_runtime_over_tcp_and_unix(tiny, served, tmp_path):
    want = rust_reports(tiny["pack"], tiny["trace"], tmp_path, "client")
    for address in (served.grpc, f"unix:{served.unix}"):
        with pc.Client(address) as client:
            assert client.hidden_dim == tiny["trace"].shape[1]
            with client.session() as s:
                got = [s.observe(row) for row in tiny["trace"]]
            assert_same(got, want)
            # Torch f32 and f64 inputs give the same answers too.
            with client.session() as s:
                got = [s.observe(torch.from_numpy(row.astype(np.float64))) for row in tiny["trace"]]
            assert_same(got, want)


def test_paths_stages_and_dicts_match_the_in_process_report(tiny, served):
    rt = pc.Runtime(tiny["pack"], config=str(EXACT))
    row = tiny["trace"][0]
    with pc.Client(served.grpc) as client, client.session() as remote, rt.session() as local:
        r, l = remote.observe(row), local.observe(row)
        assert [d.path for d in r.top] == [d.path for d in l.top]
        assert set(r.stages) == set(l.stages)
        d = r.to_dict()
        assert d["top"][0] == l.to_dict()["top"][0] and d["token"] == 0
    rt.close()


def test_alerts_match_the_in_process_runtime(tiny, served):
    rt = pc.Runtime(tiny["pack"], config=str(EXACT))
    root = next(c for c in pc.pack.open(tiny["pack"]).concepts if c.layer == 0).name
    watch = [{"name": "remote", "concepts": [root], "threshold": 0.1}]
    raised = 0
    with pc.Client(served.grpc) as client, client.session(watch=watch) as remote, rt.session(watch=watch) as local:
        for row in tiny["trace"]:
            r, l = remote.observe(row), local.observe(row)
            assert [a.to_dict() for a in r.alerts] == [a.to_dict() for a in l.alerts]
            raised += len(r.alerts)
    assert raised > 0
    rt.close()


def test_pack_info_is_the_same_in_process_and_over_grpc(tiny, served):
    with pc.Runtime(tiny["pack"], config=str(EXACT)) as rt, pc.Client(served.grpc) as client:
        local, remote = rt.pack_info(), client.pack_info()
        assert local == remote
        assert set(local) == {"model", "pack", "total_lenses", "calibrated", "alert_threshold", "fields", "concepts",
                              "watch"}
        info = pc.pack.open(tiny["pack"])
        assert local["total_lenses"] == len(info) and local["alert_threshold"] == 0.5 and not local["calibrated"]
        assert local["fields"] == sorted(c.name for c in info.concepts if c.layer == 0)
        # The trace's header is the same metadata.
        with rt.session() as s:
            doc = pc.trace.document([{"prompt": "p", "tokens": [("a", s.observe(tiny["trace"][0]))]}])
        assert doc["fields"] == local["fields"] and doc["concepts"] == local["concepts"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_the_in_process_runtime(tiny, served, dtype):
    rt = pc.Runtime(tiny["pack"], config=str(EXACT))
    rows = torch.from_numpy(tiny["trace"][:20]).to(dtype)
    with pc.Client(served.grpc) as client, client.session() as remote, rt.session() as local:
        for row in rows:
            r, l = remote.observe(row), local.observe(row)
            assert [(d.name, np.float32(d.logit)) for d in r.top] == [(d.name, np.float32(d.logit)) for d in l.top]
    rt.close()


def test_observe_batch_matches_the_in_process_runtime(tiny, served):
    rt = pc.Runtime(tiny["pack"], config=str(EXACT))
    trace = tiny["trace"]
    with pc.Client(served.grpc) as client:
        remote = [client.session(), client.session(report_top_k=3), client.session()]
        local = [rt.session(), rt.session(report_top_k=3), rt.session()]
        for t in range(0, len(trace) - 3):
            batch = torch.from_numpy(np.stack([trace[t], trace[t + 1], trace[t + 2]]))
            got = client.observe_batch(remote, batch)
            exp = rt.observe_batch(local, batch)
            for g, e in zip(got, exp):
                assert [(d.name, np.float32(d.logit)) for d in g.top] == [(d.name, np.float32(d.logit)) for d in e.top]
                assert (g.token, g.scored, g.active) == (e.token, e.scored, e.active)
        assert len(got[1].top) == 3
        for s in remote:
            s.close()
    rt.close()


def test_errors_are_the_package_exceptions_and_name_the_thing(tiny, served):
    d = tiny["trace"].shape[1]
    with pc.Client(served.grpc) as client:
        with client.session() as s:
            with pytest.raises(pc.BadHiddenState, match=f"{d}") as e:
                s.observe(np.zeros(d + 1, np.float32))
            bad = np.zeros(d, np.float32)
            bad[3] = np.nan
            with pytest.raises(pc.BadHiddenState, match="3") as e:
                s.observe(bad)
            assert e.value.token is not None
            with pytest.raises(pc.BadHiddenState, match="1-D"):
                s.observe(np.zeros((2, d), np.float32))
            # The session goes on after bad input.
            assert s.observe(tiny["trace"][0]).top
            out = client.observe_batch([s, s], [np.zeros(3, np.float32), tiny["trace"][1]], errors="return")
            assert isinstance(out[0], pc.BadHiddenState) and out[0].position == 0
            assert out[1].top
        with pytest.raises(pc.ConfigError, match="cascade.report_top_k"):
            client.session(report_top_k="many")
        with pytest.raises(pc.ConfigError, match="mode"):
            client.session(mode="fast")
        s = client.session()
        s.close()
        with pytest.raises(pc.ProbeCascadeError, match="closed"):
            s.observe(tiny["trace"][0])
    with pytest.raises(pc.ProbeCascadeError, match="127.0.0.1:1"):
        pc.Client("127.0.0.1:1", timeout=2)


def test_a_bearer_token_is_required_when_set(tiny, tmp_path):
    served = Served(tiny["pack"], tmp_path, token="py-secret")
    try:
        with pytest.raises(pc.ProbeCascadeError, match="bearer token"):
            pc.Client(served.grpc)
        with pytest.raises(pc.ProbeCascadeError, match="wrong"):
            pc.Client(served.grpc, token="nope")
        with pc.Client(served.grpc, token="py-secret") as client, client.session() as s:
            assert s.observe(tiny["trace"][0]).top
        metrics = urllib.request.urlopen(f"http://{served.http}/metrics").read().decode()
        assert 'probe_cascade_errors_total{kind="unauthenticated"}' in metrics
    finally:
        assert served.stop() == 0


def test_token_text_reaches_the_live_viewer_with_the_report(tiny, served):
    """The client's token text travels with the hidden state (observe and observe_batch) and
    comes out in the session's server-sent events, beside the report's top concepts."""
    import json

    with pc.Client(served.grpc) as client, client.session() as s, client.session() as other:
        events = urllib.request.urlopen(f"http://{served.http}/v1/sessions/{s.id}/events", timeout=10)
        r = s.observe(tiny["trace"][0], text=" Hello")
        client.observe_batch([s, other], np.stack([tiny["trace"][1], tiny["trace"][2]]), texts=[" world", None])
        got = []
        while len(got) < 2:
            line = events.readline().decode()
            if line.startswith("data: "):
                got.append(json.loads(line[len("data: "):]))
        assert [e["text"] for e in got] == [" Hello", " world"]
        assert [e["token"] for e in got] == [0, 1]
        assert [d["name"] for d in got[0]["top"]] == [d.name for d in r.top]
        events.close()


def test_sessions_are_listed_and_closed(tiny, served):
    import json

    with pc.Client(served.grpc) as client:
        s = client.session(label="py-test")
        views = json.loads(urllib.request.urlopen(f"http://{served.http}/v1/sessions").read())
        assert any(v["label"] == "py-test" and v["kind"] == "unary" for v in views)
        s.close()
        views = json.loads(urllib.request.urlopen(f"http://{served.http}/v1/sessions").read())
        assert not any(v["label"] == "py-test" for v in views)


CACHE = Path(os.environ.get("PROBE_CASCADE_CACHE", Path.home() / ".cache" / "probe-cascade"))
# The oldest grpcio and protobuf the `client` extra allows (python/pyproject.toml), which
# scripts/python-env.sh installs apart.
OLDEST = {"grpcio": "1.62.3", "protobuf": "4.25.1"}


def test_generated_stubs_match_the_proto(tmp_path):
    """python/probe_cascade/v1/ is what scripts/gen-python-proto.sh makes from proto/ now."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PROBE_CASCADE_CACHE": str(CACHE)}
    subprocess.run(["bash", str(REPO / "scripts" / "gen-python-proto.sh"), str(tmp_path)], check=True, env=env)
    for name in ("probe_cascade_pb2.py", "probe_cascade_pb2.pyi", "probe_cascade_pb2_grpc.py"):
        fresh = (tmp_path / "probe_cascade" / "v1" / name).read_text()
        committed = (REPO / "python" / "probe_cascade" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run scripts/gen-python-proto.sh"


def test_lenses_over_model_layers_over_grpc_match_the_in_process_runtime(tmp_path):
    """A pack of lenses over model layers 4 and 7: the client sends {model_layer: state} per
    token (in a session and in a batch) and gets the in-process reports, probes and the simplex
    lens's readings included."""
    src = tmp_path / "headspace"
    shutil.copytree(REPO / "tests/fixtures/headspace/pack", src)
    shutil.copytree(REPO / "tests/fixtures/headspace/simplex", src / "simplex")
    summary = pc.pack.import_headspace(src, tmp_path / "hs")
    assert "simplex lenses (always on, 3 poles each): Autonomy" in summary
    s = Served(tmp_path / "hs", tmp_path)
    try:
        rng = np.random.default_rng(9)
        tokens = [{m: rng.normal(0, 2, 16).astype(np.float32) for m in (7, 4)} for _ in range(10)]
        rt = pc.Runtime(tmp_path / "hs", config=EXACT)
        with pc.Client(s.grpc) as client, client.session() as remote, rt.session() as local:
            for token in tokens:
                r, l = remote.observe(token), local.observe(token)
                assert [(d.name, d.logit, d.prob) for d in r.top] == [(d.name, d.logit, d.prob) for d in l.top]
                assert [[p.to_dict() for p in d.probes] for d in r.top] == [
                    [p.to_dict() for p in d.probes] for d in l.top
                ]
                assert [x.pole for x in l.simplex] == ["positive", "neutral", "negative"]
                assert [x.to_dict() for x in r.simplex] == [x.to_dict() for x in l.simplex]
                assert r.to_dict()["simplex"] == l.to_dict()["simplex"]
            # From the tenth token on, each pole has a deviation from its baseline.
            assert all(x.deviation is not None for x in l.simplex)
            with client.session() as other:
                batch = {m: np.stack([tokens[0][m], tokens[1][m]]) for m in (4, 7)}
                a, b = client.observe_batch([remote, other], batch)
                assert [d.name for d in b.top] == [d.name for d in local.observe(tokens[1]).top]
            with pytest.raises(pc.BadHiddenState, match=r"model layers \[4, 7\]"):
                remote.observe(tokens[0][4])
        rt.close()
    finally:
        assert s.stop() == 0


def test_every_client_test_passes_on_the_oldest_grpcio_and_protobuf_it_claims():
    """GPU images carry older grpcio and protobuf than ours (the CUDA PyTorch image had grpcio
    1.84.0): the client's tests run again in a fresh interpreter whose grpcio and protobuf are
    the oldest the `client` extra allows."""
    oldest = CACHE / f"py-client-oldest-grpcio-{OLDEST['grpcio']}-protobuf-{OLDEST['protobuf']}"
    assert (oldest / ".complete").exists(), f"{oldest} is missing: scripts/python-env.sh (make pyenv) makes it"
    env = dict(os.environ, PYTHONPATH=str(oldest))
    probe = "import grpc, google.protobuf as p; print(grpc.__version__, p.__version__)"
    versions = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert versions.stdout.split() == [OLDEST["grpcio"], OLDEST["protobuf"]], versions.stdout
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "not oldest and not generated_stubs"],
        env=env, cwd=REPO, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]


def test_client_reports_render_in_jupyter_like_in_process_ones(tiny, served):
    from probe_cascade import viewer

    with pc.Runtime(tiny["pack"], config=str(EXACT)) as rt, rt.session() as local:
        want = local.observe(tiny["trace"][0])
        with pc.Client(served.grpc) as client, client.session() as s:
            got = s.observe(tiny["trace"][0])
    assert got._repr_html_() == want._repr_html_() == viewer.report_html(want.to_dict())
    assert all(d.name in got._repr_html_() for d in got.top)
