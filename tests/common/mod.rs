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
