//! What the command-line tests share: the binary, a tiny synthetic pack and trace, and
//! helpers that run a command and say what went wrong.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_probe-cascade"))
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed:\n{}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure, got:\n{}", text(&out.stdout));
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub pack: PathBuf,
    pub trace: PathBuf,
    pub root: PathBuf,
}

pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let pack = root.join("pack");
    let trace = root.join("trace.npy");
    run_ok(bin().args(["pack", "synth", "--preset", "tiny", "--out"]).arg(&pack));
    run_ok(bin().args(["trace", "synth", "--tokens", "12", "--pack"]).arg(&pack).arg("--out").arg(&trace));
    Fixture { _dir: dir, pack, trace, root }
}

pub fn config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/realtime.toml")
}
