#![allow(dead_code)]
//! Helpers shared by the integration tests: small real packs on disk.

use std::path::Path;

use probe_cascade::pack::{Manifest, MANIFEST_FILE};
use probe_cascade::synth::{write_synth_pack, SynthParams};

/// Writes the `tiny` synthetic pack (60 concepts, D=32, f32, 16 probes per shard).
pub fn tiny_pack(dir: &Path) -> Manifest {
    write_synth_pack(dir, &SynthParams::tiny(), |_| {}).expect("tiny pack writes")
}

pub fn read_manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap()
}

pub fn write_manifest(dir: &Path, v: &serde_json::Value) {
    std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(v).unwrap()).unwrap();
}

/// Applies `edit` to the manifest JSON of a fresh tiny pack and returns the pack's directory.
pub fn tiny_pack_with(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny_pack(dir.path());
    let mut v = read_manifest(dir.path());
    edit(&mut v);
    write_manifest(dir.path(), &v);
    dir
}

/// A 400-concept pack (D=128, bf16) and four traces of `tokens` tokens each (different seeds;
/// the odd ones busy).
pub struct Streams {
    pub _dir: tempfile::TempDir,
    pub pack: std::sync::Arc<probe_cascade::pack::Pack>,
    pub traces: Vec<probe_cascade::npy::Matrix>,
}

pub fn streams(tokens: usize) -> Streams {
    use probe_cascade::synth::{concept_geometry, synth_trace, TraceParams};
    let dir = tempfile::tempdir().unwrap();
    let params =
        SynthParams { concepts: 400, hidden_dim: 128, dtype: probe_cascade::pack::DType::Bf16, ..SynthParams::demo() };
    write_synth_pack(dir.path(), &params, |_| {}).unwrap();
    let pack = std::sync::Arc::new(probe_cascade::pack::Pack::open(dir.path()).unwrap());
    let geometry = concept_geometry(&pack, |_| {}).unwrap();
    let traces = (0..4)
        .map(|seed| {
            let base = if seed % 2 == 0 { TraceParams::default() } else { TraceParams::busy() };
            synth_trace(&pack, &geometry, &TraceParams { tokens, seed, ..base })
        })
        .collect();
    Streams { _dir: dir, pack, traces }
}
