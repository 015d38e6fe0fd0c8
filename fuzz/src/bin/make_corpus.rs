//! Writes the seed corpora (fuzz/corpus/<target>/) from the project's fixtures and its own
//! writers. Not a fuzz target: run once, `cargo run --release --bin make_corpus`, and commit.
use std::path::{Path, PathBuf};

use probe_cascade::import::stored_zip::StoredZip;
use probe_cascade_server::convert::encode_f32;
use probe_cascade_server::proto::v1 as pb;
use prost::Message;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let fixtures = root().join("tests/fixtures/hatcat");

    // The tiny pack's manifest and shard, as the manifest and safetensors targets use them.
    let pack = tempfile_dir();
    probe_cascade_fuzz::targets::tiny_pack(&pack);
    for entry in std::fs::read_dir(&pack).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => put("manifest", "tiny.json", &bytes),
            Some("safetensors") => put("safetensors", "tiny.safetensors", &bytes),
            _ => {}
        }
    }
    std::fs::remove_dir_all(&pack).unwrap();

    // A v2 manifest over the same shard: two lenses, the first of two calibrated probes.
    let tiny: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/manifest/tiny.json")).unwrap(),
    )
    .unwrap();
    put("manifest", "lenses_v2.json", lenses_v2(&tiny).to_string().as_bytes());
    // The same with a simplex of one pole (probe 2) and concept calibration.
    put("manifest", "lenses_v2_simplex.json", lenses_v2_simplex(&tiny).to_string().as_bytes());

    // headspace calibration files: the fixture's, and defects.
    let calibration = std::fs::read(root().join("tests/fixtures/headspace/pack/probe_calibration.json")).unwrap();
    put("headspace_calibration", "fixture.json", &calibration);
    put("headspace_calibration", "descending.json", br#"{"probes": {"layer0/A@L4": {"quantiles": [0.9, 0.1]}}}"#);
    put("headspace_calibration", "no_quantiles.json", br#"{"probes": {"layer0/A@L4": {}}}"#);
    let concept = std::fs::read(root().join("tests/fixtures/headspace/calibration.json")).unwrap();
    put("headspace_calibration", "concept_fixture.json", &concept);
    put("headspace_calibration", "concept_not_number.json", br#"{"calibration": {"A_L0": {"self_mean": "x"}}}"#);

    // torch.save files, good and bad, and the pickles inside the good ones.
    for (dir, name) in [
        ("lenses", "Entity_classifier.pt"),
        ("bad", "not_state_dict.pt"),
        ("bad", "tensor.pt"),
        ("bad", "wrong_shape.pt"),
        ("bad", "legacy.pt"),
        ("bad", "truncated.pt"),
    ] {
        let bytes = std::fs::read(fixtures.join(dir).join(name)).unwrap();
        put("torch_zip", name, &bytes);
        if let Ok(zip) = StoredZip::parse(&bytes) {
            let names: Vec<String> = zip.names().map(str::to_string).collect();
            for n in names.iter().filter(|n| n.ends_with(".pkl")) {
                put("pickle", &format!("{}.pkl", name.trim_end_matches(".pt")), zip.read(n).unwrap());
            }
        }
    }

    // HatCat hierarchy files of both schemas; the old one with its hierarchy.json after a NUL.
    for (dir, file) in [
        ("hierarchy", "layer0.json"),
        ("hierarchy", "layer1.json"),
        ("hierarchy_ln", "layer0.json"),
        ("hierarchy_bad", "layer1.json"),
    ] {
        put("hatcat_json", &format!("{dir}-{file}"), &std::fs::read(fixtures.join(dir).join(file)).unwrap());
    }
    let mut old = std::fs::read(fixtures.join("hierarchy_old/layer0.json")).unwrap();
    old.push(0);
    old.extend(std::fs::read(fixtures.join("hierarchy_old/hierarchy.json")).unwrap());
    put("hatcat_json", "hierarchy_old-layer0-and-hierarchy.json", &old);

    // A small trace, as `trace synth` writes them.
    let m = probe_cascade::npy::Matrix { rows: 3, cols: 4, data: (0..12).map(|i| i as f32 * 0.5 - 2.0).collect() };
    let npy = tempfile_dir().join("t.npy");
    probe_cascade::npy::write(&npy, &m).unwrap();
    put("npy", "3x4.npy", &std::fs::read(&npy).unwrap());
    std::fs::remove_dir_all(npy.parent().unwrap()).unwrap();

    // The shipped configs.
    for name in ["realtime", "offline", "decompose"] {
        put(
            "config_toml",
            &format!("{name}.toml"),
            &std::fs::read(root().join(format!("config/{name}.toml"))).unwrap(),
        );
    }

    // Service messages: the kind byte, then the encoding.
    let options = pb::SessionOptions {
        mode: Some("pipelined".into()),
        latency_budget_us: Some(500),
        cascade_json: r#"{"pruning": {"top_k": {"keep_top_k": 20}}}"#.into(),
        label: "seed".into(),
    };
    let hidden = encode_f32(&[0.5, -1.0, 2.0, 0.0]);
    let bf16 = pb::HiddenState { dtype: pb::Dtype::Bf16 as i32, len: 2, data: vec![0x80, 0x3f, 0x00, 0xc0].into() };
    let with_kind = |kind: u8, m: Vec<u8>| [vec![kind], m].concat();
    let open = pb::SessionRequest { kind: Some(pb::session_request::Kind::Open(options.clone())), text: None };
    put("service", "open.bin", &with_kind(0, open.encode_to_vec()));
    let h = pb::SessionRequest { kind: Some(pb::session_request::Kind::Hidden(hidden.clone())), text: None };
    put("service", "hidden-f32.bin", &with_kind(0, h.encode_to_vec()));
    let h = pb::SessionRequest { kind: Some(pb::session_request::Kind::Hidden(bf16.clone())), text: None };
    put("service", "hidden-bf16.bin", &with_kind(0, h.encode_to_vec()));
    // One state per model layer (the target checks them against model layers 4 and 7).
    let layers = vec![
        pb::LayerState { model_layer: 7, hidden: Some(bf16.clone()) },
        pb::LayerState { model_layer: 4, hidden: Some(hidden.clone()) },
    ];
    let h = pb::SessionRequest {
        kind: Some(pb::session_request::Kind::Layers(pb::LayerStates { layers: layers.clone() })),
        text: Some(" token".into()),
    };
    put("service", "layers.bin", &with_kind(0, h.encode_to_vec()));
    let batch = pb::BatchRequest {
        items: vec![
            pb::BatchItem { session_id: 1, hidden: Some(hidden), layers: Vec::new(), text: None },
            pb::BatchItem { session_id: 2, hidden: Some(bf16), layers: Vec::new(), text: None },
            pb::BatchItem { session_id: 3, hidden: None, layers, text: Some(" text".into()) },
        ],
    };
    put("service", "batch.bin", &with_kind(1, batch.encode_to_vec()));
    put("service", "options.bin", &with_kind(2, options.encode_to_vec()));
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("probe-cascade-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny v1 manifest as a v2 one: concept 0 reads probes 0 and 1 (model layers 3 and 5,
/// calibrated), concept 1 probe 2; the third concept is gone.
fn lenses_v2(tiny: &serde_json::Value) -> serde_json::Value {
    let c = tiny["concepts"].as_array().unwrap();
    let probe = |i: usize, m: u32, q: bool| {
        let mut p = serde_json::json!({"id": i, "model_layer": m, "weights": c[i]["weights"], "crc32": c[i]["crc32"]});
        if q {
            p["quantiles"] = serde_json::json!([0.05, 0.4, 0.9]);
        }
        p
    };
    let mut v = tiny.clone();
    v["format_version"] = serde_json::json!(2);
    v["model_layers"] = serde_json::json!([3, 5]);
    v["lens_score"] = serde_json::json!("calibrated_max_else_raw_mean");
    v["concepts"] = serde_json::json!([
        {"id": 0, "name": c[0]["name"], "layer": 0, "parents": [], "children": [1],
         "probes": [probe(0, 3, true), probe(1, 5, true)]},
        {"id": 1, "name": c[1]["name"], "layer": 1, "parents": [0], "children": [],
         "probes": [probe(2, 5, false)]}
    ]);
    v
}

/// [`lenses_v2`] with one probe per lens, the third probe a simplex's pole, and concept 0's
/// calibration statistics.
fn lenses_v2_simplex(tiny: &serde_json::Value) -> serde_json::Value {
    let c = tiny["concepts"].as_array().unwrap();
    let mut v = lenses_v2(tiny);
    v["concepts"][0]["probes"] = serde_json::json!([v["concepts"][0]["probes"][0]]);
    v["concepts"][1]["probes"][0]["id"] = serde_json::json!(1);
    v["concepts"][1]["probes"][0]["weights"] = c[1]["weights"].clone();
    v["concepts"][1]["probes"][0]["crc32"] = c[1]["crc32"].clone();
    v["concept_calibration"] = serde_json::json!("three_stage");
    v["concepts"][0]["calibration"] = serde_json::json!({"self_mean": 0.9, "cross_mean": 0.3,
        "cross_fire_rate": 0.1, "gen_fire_rate": 0.2, "noise_fire_rate": 0.0});
    v["simplexes"] = serde_json::json!([{"name": "Drive", "poles": [
        {"pole": "positive", "id": 2, "model_layer": 3, "weights": c[2]["weights"], "crc32": c[2]["crc32"]}]}]);
    v
}
