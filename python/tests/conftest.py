"""Fixtures: a small synthetic pack and trace, and the Rust runtime's answers on them.

The reference answers come from the command line (`probe-cascade run --engine runtime`),
the same Rust runtime the package wraps, so a test that compares them checks the binding:
conversion, zero-copy reads, token order, report fields. The binary is the one `cargo test
--release` builds (target/release/probe-cascade), or $PROBE_CASCADE_BIN.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def binary() -> Path:
    b = Path(os.environ.get("PROBE_CASCADE_BIN", REPO / "target" / "release" / "probe-cascade"))
    if not b.exists():
        pytest.fail(f"{b} not found: build it first (cargo build --release, or make test)")
    return b


def cli(*args: str) -> str:
    out = subprocess.run([str(binary()), *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"probe-cascade {' '.join(map(str, args))} failed:\n{out.stderr}")
    return out.stdout


EXACT = REPO / "config" / "realtime.toml"  # mode = "exact": answers do not depend on timing


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny synthetic pack (D=32) and a 60-token trace."""
    d = tmp_path_factory.mktemp("tiny")
    cli("pack", "synth", "--preset", "tiny", "--out", d / "pack")
    cli("trace", "synth", "--pack", d / "pack", "--tokens", "60", "--out", d / "trace.npy")
    return {"pack": d / "pack", "trace": np.load(d / "trace.npy"), "dir": d}


def rust_reports(pack: Path, trace: np.ndarray, work: Path, name: str) -> list:
    """The Rust runtime's per-token reports on `trace` (float32 [T, D])."""
    path = work / f"{name}.npy"
    np.save(path, np.ascontiguousarray(trace, dtype=np.float32))
    out = work / f"{name}.json"
    cli("run", "--engine", "runtime", "--config", EXACT, "--pack", pack, "--trace", path, "--json", out)
    return json.loads(out.read_text())["tokens"]


def assert_same(py_reports, rust_tokens) -> None:
    """Bit-identical: names, layers, and the f32 logits and probabilities."""
    assert len(py_reports) == len(rust_tokens)
    for r, want in zip(py_reports, rust_tokens):
        assert r.token == want["index"]
        got = [(d.name, d.layer, np.float32(d.logit), np.float32(d.prob)) for d in r.top]
        exp = [(e["name"], e["layer"], np.float32(e["logit"]), np.float32(e["prob"])) for e in want["top"]]
        assert got == exp, f"token {r.token}"
        for key in ("children", "loaded", "unloaded", "scored", "active", "skipped_by_cap"):
            assert getattr(r, key) == want[key], f"token {r.token}: {key}"


class Served:
    """`probe-cascade serve` in a child process, on loopback ports and a Unix socket."""

    def __init__(self, pack: Path, work: Path, config: Path = EXACT, token: str | None = None) -> None:
        import signal  # noqa: F401  (used in stop)

        self.unix = work / "serve.sock"
        args = [str(binary()), "serve", "--pack", str(pack), "--config", str(config)]
        args += ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--unix", str(self.unix)]
        if token is not None:
            (work / "token").write_text(token + "\n")
            args += ["--token-file", str(work / "token")]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("serving "):
            self.proc.kill()
            raise AssertionError(f"serve did not start: {line!r}\n{self.proc.stderr.read()}")
        fields = dict(w.split("=", 1) for w in line.split()[1:])
        self.grpc, self.http = fields["grpc"], fields["http"]

    def stop(self) -> int:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    s = Served(tiny["pack"], tmp_path_factory.mktemp("serve"))
    yield s
    rc = s.stop()
    assert rc == 0, f"serve exited {rc} after SIGTERM:\n{s.proc.stderr.read()}"
