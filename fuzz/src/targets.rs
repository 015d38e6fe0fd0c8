//! The fuzz targets' bodies: what each does with one input. Plain functions of the project's
//! crates (no AFL here), so that server/tests/fuzz_corpus.rs replays every committed corpus
//! and regression input through the very same code in `make test`.
//!
//! The parsers that take a file or a directory get their input written to `dir` (a scratch
//! directory) and are called through their real entry points (`Pack::open`, `npy::read`,
//! `read_hierarchy`), not a copy of their logic.

use std::path::Path;

use probe_cascade_server::convert::decode_states;
use probe_cascade_server::proto::v1 as pb;
use probe_cascade_server::state::{Live, Requested};
use prost::Message;

/// The targets, by name (each `fuzz/src/bin/<name>.rs` and `fuzz/corpus/<name>/`).
pub const NAMES: [&str; 9] = [
    "manifest",
    "safetensors",
    "torch_zip",
    "pickle",
    "hatcat_json",
    "headspace_calibration",
    "npy",
    "config_toml",
    "service",
];

/// Prepares `dir` for target `name` (once per process): the tiny pack the pack targets
/// replace one file of.
pub fn prepare(name: &str, dir: &Path) {
    if matches!(name, "manifest" | "safetensors") {
        tiny_pack(dir);
    }
}

/// Runs target `name` on one input. `live` is the shipped realtime config (the service target
/// applies session options to it).
pub fn run(name: &str, dir: &Path, live: &Live, data: &[u8]) {
    match name {
        "manifest" => manifest(dir, data),
        "safetensors" => safetensors(dir, data),
        "torch_zip" => torch_zip(data),
        "pickle" => pickle(data),
        "hatcat_json" => hatcat_json(dir, data),
        "headspace_calibration" => headspace_calibration(data),
        "npy" => npy(dir, data),
        "config_toml" => config_toml(data),
        "service" => service(live, data),
        other => panic!("no fuzz target `{other}`"),
    }
}

/// The shipped realtime config, as the server reads it.
pub fn realtime() -> Live {
    const CONFIG: &str = include_str!("../../config/realtime.toml");
    Live::parse(CONFIG, Path::new("config/realtime.toml")).expect("the shipped config")
}

/// A tiny valid pack (3 concepts, D=1, bf16) in `dir`.
pub fn tiny_pack(dir: &Path) {
    let params = probe_cascade::synth::SynthParams {
        concepts: 3,
        roots: 1,
        layers: 2,
        branching: None,
        hidden_dim: 1,
        dtype: probe_cascade::pack::DType::Bf16,
        probes_per_shard: 8,
        ..probe_cascade::synth::SynthParams::demo()
    };
    probe_cascade::synth::write_synth_pack(dir, &params, |_| {}).expect("writing the tiny pack");
}

/// Opens a pack and reads every probe (checking lengths and CRCs): what a runtime does first.
fn open_and_read(dir: &Path) {
    if let Ok(pack) = probe_cascade::pack::Pack::open(dir) {
        for p in 0..pack.probe_count() as u32 {
            let _ = pack.read_probe(probe_cascade::pack::ProbeId(p));
        }
    }
}

/// The pack manifest (manifest.json): JSON, the format checks, the hierarchy it declares and
/// the shard locations, on a pack whose shard is valid, so that a manifest that parses goes
/// on to the probe reads.
fn manifest(dir: &Path, data: &[u8]) {
    std::fs::write(dir.join("manifest.json"), data).expect("writing the input");
    open_and_read(dir);
}

/// A safetensors shard: its header (length prefix, JSON, names, dtypes, shapes,
/// `data_offsets`) against the manifest's byte ranges, then every probe's read (bounds,
/// CRC), on a pack whose manifest is valid and whose shard is the input.
fn safetensors(dir: &Path, data: &[u8]) {
    std::fs::write(dir.join("weights-00000.safetensors"), data).expect("writing the input");
    open_and_read(dir);
}

/// A `torch.save` file as HatCat publishes them: the zip container, the pickle inside, the
/// tensors it describes, and their reading as a trained probe.
fn torch_zip(data: &[u8]) {
    if let Ok(tensors) = probe_cascade::import::torch_file::parse_state_dict(data, Path::new("input.pt")) {
        if let Ok(probe) = probe_cascade::import::hatcat::trained_probe(tensors) {
            let _ = probe.folded();
        }
    }
}

/// The pickle reader on its own (inside a zip, mutated pickles mostly fail the container's
/// checks first). It knows a fixed set of opcodes and globals and never executes anything.
fn pickle(data: &[u8]) {
    if let Ok(v) = probe_cascade::import::pickle::parse(data) {
        let _ = v.describe();
    }
}

/// HatCat's hierarchy JSON: `layer0.json` (either schema), and `hierarchy.json` after the
/// input's first NUL byte if it has one, through `read_hierarchy`, then their links.
fn hatcat_json(dir: &Path, data: &[u8]) {
    let (layer, hierarchy) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    std::fs::write(dir.join("layer0.json"), layer).expect("writing the input");
    match hierarchy {
        Some(h) => std::fs::write(dir.join("hierarchy.json"), h).expect("writing the input"),
        None => {
            let _ = std::fs::remove_file(dir.join("hierarchy.json"));
        }
    }
    if let Ok(files) = probe_cascade::import::hatcat::read_hierarchy(dir) {
        let _ = probe_cascade::import::hatcat::resolve_links(&files);
    }
}

/// headspace's `probe_calibration.json`: JSON, the probes object, each entry's quantiles and
/// their checks (count, finiteness, order), through `parse_calibration`.
fn headspace_calibration(data: &[u8]) {
    if let Ok(q) = probe_cascade::import::headspace::parse_calibration(data) {
        for (_, v) in q {
            let _ = probe_cascade::policy::lens::calibrate(0.5, &v);
        }
    }
    // The older per-concept calibration.json, a JSON file of the same pack.
    if let Ok(stats) = probe_cascade::import::headspace::parse_concept_calibration(data) {
        for (_, c) in stats {
            for p in [0.0, 0.3, 1.0] {
                assert!(
                    !probe_cascade::policy::lens::normalize(&c, p).is_nan(),
                    "finite statistics normalize to a number"
                );
            }
        }
    }
}

/// `.npy` traces: the preamble, the header dict, the shape and the data, through `npy::read`.
fn npy(dir: &Path, data: &[u8]) {
    let path = dir.join("trace.npy");
    std::fs::write(&path, data).expect("writing the input");
    if let Ok(m) = probe_cascade::npy::read(&path) {
        if m.rows > 0 {
            let _ = m.row(m.rows - 1);
        }
    }
}

/// Config files: TOML, every key's type and range (`Config::parse` validates), and the raw
/// table the server keeps for per-session overrides (`Live::parse`).
fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(live) = Live::parse(text, Path::new("config.toml")) {
        let _ = probe_cascade::config::cascade_with(&live.raw, &Default::default());
    }
}

/// The model layers the service target's layered states are checked against.
const MODEL_LAYERS: [u32; 2] = [4, 7];

/// The service's messages as they come off the wire: the first byte picks the message (a
/// stream's `SessionRequest`, a unary `BatchRequest`, or `SessionOptions`), the rest is its
/// protobuf encoding. What the server does with a message before it reaches the runtime runs
/// too: hidden states decoded and checked, session options read and applied to the config.
fn service(live: &Live, data: &[u8]) {
    let options = |o: &pb::SessionOptions| {
        if let Ok(requested) = Requested::from_proto(o) {
            let _ = requested.options(live);
        }
    };
    let Some((&kind, bytes)) = data.split_first() else { return };
    match kind % 3 {
        0 => match pb::SessionRequest::decode(bytes).map(|m| m.kind) {
            Ok(Some(pb::session_request::Kind::Open(o))) => options(&o),
            Ok(Some(pb::session_request::Kind::Hidden(h))) => {
                let _ = decode_states(Some(&h), &[], &[]);
            }
            Ok(Some(pb::session_request::Kind::Layers(l))) => {
                let _ = decode_states(None, &l.layers, &MODEL_LAYERS);
            }
            _ => {}
        },
        1 => {
            if let Ok(m) = pb::BatchRequest::decode(bytes) {
                for item in &m.items {
                    let _ = decode_states(item.hidden.as_ref(), &item.layers, &MODEL_LAYERS);
                }
            }
        }
        _ => {
            if let Ok(o) = pb::SessionOptions::decode(bytes) {
                options(&o);
            }
        }
    }
}
