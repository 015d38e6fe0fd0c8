//! Pack formats v1 and v2: round trip, compatibility with the safetensors crate, and one test
//! per defect that opening or verifying must reject, each asserting on what the error names.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use common::{read_manifest, tiny_pack, tiny_pack_with};
use probe_cascade::pack::{ConceptId, DType, Pack, PackError, PackSpec, ProbeId, ProbeWeights};
use probe_cascade::synth::{synth_hierarchy, synth_probe, SynthParams};
use serde_json::json;

fn open_err(dir: &tempfile::TempDir) -> (PackError, String) {
    let e = Pack::open(dir.path()).expect_err("the pack must be rejected");
    let s = e.to_string();
    (e, s)
}

#[test]
fn round_trip_preserves_hierarchy_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let params = SynthParams::tiny();
    let synth = synth_hierarchy(&params);
    let manifest = tiny_pack(dir.path());
    let pack = Pack::open(dir.path()).unwrap();
    assert_eq!(pack.len(), params.concepts);
    assert_eq!(pack.hidden_dim(), 32);
    assert_eq!(pack.dtype(), DType::F32);
    assert_eq!(pack.shards().len(), manifest.shards.len());
    assert_eq!(pack.shards().len(), params.concepts.div_ceil(16));
    let h = pack.hierarchy();
    for (i, def) in synth.spec.concepts.iter().enumerate() {
        let id = ConceptId(i as u32);
        assert_eq!(h.name(id), def.name);
        assert_eq!(h.layer(id), def.layer);
        let mut parents = def.parents.clone();
        parents.sort();
        assert_eq!(h.parents(id), &parents[..]);
        for &p in h.parents(id) {
            assert!(h.children(ConceptId(p)).contains(&id.0));
        }
        assert_eq!(h.lookup(&def.name, def.layer), Some(id));
        let bytes = pack.read_probe(ProbeId::sole(id)).unwrap();
        let back = pack.decode_probe(ProbeId::sole(id), &bytes).unwrap();
        let want = synth_probe(params.seed, i as u32, &synth.directions[i], synth.thresholds[i]);
        assert_eq!(back, want, "f32 weights of concept {i} must round-trip exactly");
    }
    assert_eq!(h.lookup("NoSuchConcept", 0), None);
    let layer_total: usize = (0..h.layer_count() as u16).map(|l| h.layer_members(l).len()).sum();
    assert_eq!(layer_total, pack.len());
    assert!(pack.verify(|_| {}).is_empty());
}

#[test]
fn shards_are_valid_safetensors_with_pytorch_keys() {
    let dir = tempfile::tempdir().unwrap();
    tiny_pack(dir.path());
    let pack = Pack::open(dir.path()).unwrap();
    let bytes = std::fs::read(&pack.shards()[0].path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("the safetensors crate reads our shard");
    let w1 = st.tensor("0/net.0.weight").unwrap();
    assert_eq!(w1.shape(), &[128, 32]);
    assert_eq!(w1.dtype(), safetensors::Dtype::F32);
    assert_eq!(st.tensor("0/net.6.bias").unwrap().shape(), &[1]);
    // The manifest's byte range for probe 0 is exactly where its tensors sit.
    let loc = pack.location(ProbeId(0));
    let probe = &bytes[loc.offset as usize..(loc.offset + loc.length) as usize];
    let w1_start = probe.len() - pack.layout().byte_len() + pack.layout().byte_ranges()[1].start;
    assert_eq!(&probe[w1_start..w1_start + w1.data().len()], w1.data());
}

#[test]
fn bf16_packs_round_trip_to_rounded_values() {
    let dir = tempfile::tempdir().unwrap();
    let params = SynthParams { dtype: DType::Bf16, concepts: 10, ..SynthParams::tiny() };
    probe_cascade::synth::write_synth_pack(dir.path(), &params, |_| {}).unwrap();
    let synth = synth_hierarchy(&params);
    let pack = Pack::open(dir.path()).unwrap();
    assert_eq!(pack.layout().byte_len(), pack.layout().numel() * 2);
    let w = pack.decode_probe(ProbeId(3), &pack.read_probe(ProbeId(3)).unwrap()).unwrap();
    let want = synth_probe(params.seed, 3, &synth.directions[3], synth.thresholds[3]);
    for (a, b) in w.w1.iter().zip(&want.w1) {
        assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
    }
}

#[test]
fn rejects_a_cycle_and_names_it() {
    // Concept 4 is a child of root 0 (tiny pack: layer 1 starts after 4 roots). Make 0 a child of 4.
    let dir = tiny_pack_with(|v| {
        let c = &mut v["concepts"];
        let child = c[0]["children"][0].as_u64().unwrap() as usize;
        c[child]["children"].as_array_mut().unwrap().push(json!(0));
        c[0]["parents"].as_array_mut().unwrap().push(json!(child));
    });
    let (e, s) = open_err(&dir);
    assert!(matches!(e, PackError::Cycle { .. }), "{s}");
    assert!(s.contains("Entity@0"), "the error names a concept on the cycle: {s}");
    assert!(s.contains("manifest.json"), "{s}");
}

#[test]
fn rejects_a_dangling_reference() {
    let dir = tiny_pack_with(|v| v["concepts"][5]["children"].as_array_mut().unwrap().push(json!(999)));
    let (e, s) = open_err(&dir);
    assert!(matches!(e, PackError::Dangling { target: 999, .. }), "{s}");
    assert!(s.contains("entry 5") && s.contains("999"), "{s}");
}

#[test]
fn rejects_links_that_disagree() {
    let dir = tiny_pack_with(|v| {
        let c = &mut v["concepts"];
        c[0]["children"].as_array_mut().unwrap().pop();
    });
    let (e, s) = open_err(&dir);
    assert!(matches!(e, PackError::BadConcept { .. }), "{s}");
    assert!(s.contains("missing from children"), "{s}");
}

#[test]
fn rejects_a_duplicate_key() {
    let dir = tiny_pack_with(|v| {
        let c = &mut v["concepts"];
        let name = c[1]["name"].clone();
        c[2]["name"] = name;
    });
    let (e, s) = open_err(&dir);
    assert!(matches!(e, PackError::DuplicateKey { first: 1, second: 2, .. }), "{s}");
    assert!(s.contains("Physical@0"), "{s}");
}

#[test]
fn rejects_a_wrong_shape() {
    let dir = tiny_pack_with(|v| v["hidden_dim"] = json!(33));
    let (e, s) = open_err(&dir);
    assert!(matches!(e, PackError::BadTensor { .. }), "{s}");
    assert!(s.contains("Entity@0") && s.contains("weights-00000.safetensors"), "{s}");
}

#[test]
fn rejects_a_wrong_dtype() {
    let dir = tiny_pack_with(|v| v["dtype"] = json!("bf16"));
    let (e, s) = open_err(&dir);
    assert!(matches!(e, PackError::BadTensor { .. }), "{s}");
    assert!(s.contains("Entity@0") && (s.contains("dtype") || s.contains("length")), "{s}");
}

#[test]
fn rejects_a_truncated_shard_naming_the_probe() {
    let dir = tempfile::tempdir().unwrap();
    tiny_pack(dir.path());
    let pack = Pack::open(dir.path()).unwrap();
    let last = ConceptId(pack.len() as u32 - 1);
    let path = pack.shard_of(ProbeId::sole(last)).path.clone();
    let label = pack.hierarchy().label(last);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(f.metadata().unwrap().len() - 10).unwrap();
    let e = Pack::open(dir.path()).unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, PackError::Truncated { .. }), "{s}");
    assert!(s.contains(&label) && s.contains(path.file_name().unwrap().to_str().unwrap()), "{s}");
}

#[test]
fn rejects_a_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    tiny_pack(dir.path());
    std::fs::remove_file(dir.path().join("weights-00001.safetensors")).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, PackError::Io { .. }), "{s}");
    assert!(s.contains("weights-00001.safetensors"), "{s}");
}

#[test]
fn a_flipped_byte_fails_the_checksum_and_names_the_probe() {
    let dir = tempfile::tempdir().unwrap();
    tiny_pack(dir.path());
    let pack = Pack::open(dir.path()).unwrap();
    let victim = ConceptId(20);
    let loc = pack.location(ProbeId::sole(victim));
    let path = &pack.shard_of(ProbeId::sole(victim)).path;
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, loc.offset + 100).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], loc.offset + 100).unwrap();
    drop(f);
    // Opening reads metadata only, so it succeeds; reading and verifying catch the flip.
    let pack = Pack::open(dir.path()).unwrap();
    let label = pack.hierarchy().label(victim);
    let e = pack.read_probe(ProbeId::sole(victim)).unwrap_err();
    assert!(matches!(e, PackError::Checksum { .. }), "{e}");
    let defects = pack.verify(|_| {});
    assert_eq!(defects.len(), 1, "{defects:?}");
    let s = defects[0].to_string();
    assert!(s.contains(&label) && s.contains("checksum"), "{s}");
}

#[test]
fn rejects_non_finite_weights_in_verify() {
    let dir = tempfile::tempdir().unwrap();
    let spec = PackSpec {
        hidden_dim: 4,
        dtype: DType::F32,
        input_normalization: Default::default(),
        probes_per_shard: 8,
        concepts: vec![probe_cascade::pack::ConceptDef { name: "Only".into(), layer: 0, parents: vec![] }],
        lenses: None,
    };
    let layout = spec.layout();
    let mut w = ProbeWeights {
        w1: vec![0.5; 128 * 4],
        b1: vec![0.0; 128],
        w2: vec![0.1; 64 * 128],
        b2: vec![0.0; 64],
        w3: vec![1.0; 64],
        b3: vec![0.0],
    };
    w.w2[7] = f32::NAN;
    probe_cascade::pack::write_pack(dir.path(), &spec, |_| w.clone(), |_| {}).unwrap();
    let pack = Pack::open(dir.path()).unwrap();
    assert_eq!(pack.layout(), layout);
    let defects = pack.verify(|_| {});
    assert_eq!(defects.len(), 1);
    let s = defects[0].to_string();
    assert!(s.contains("Only@0") && s.contains("net.3.weight[7]") && s.contains("NaN"), "{s}");
}

#[test]
fn rejects_unknown_fields_and_versions() {
    let dir = tiny_pack_with(|v| v["format_version"] = json!(3));
    let (_, s) = open_err(&dir);
    assert!(s.contains("format_version 3"), "{s}");
    // A v1 manifest relabelled v2 lacks v2's fields.
    let dir = tiny_pack_with(|v| v["format_version"] = json!(2));
    let (_, s) = open_err(&dir);
    assert!(s.contains("model_layers") && s.contains("lens_score"), "{s}");
    let dir = tiny_pack_with(|v| v["concepts"][3]["colour"] = json!("red"));
    let (e, s) = open_err(&dir);
    assert!(matches!(e, PackError::ManifestSyntax { .. }) && s.contains("colour"), "{s}");
    let dir = tiny_pack_with(|v| v["shards"][0] = json!("../elsewhere.safetensors"));
    let (_, s) = open_err(&dir);
    assert!(s.contains("inside the pack"), "{s}");
}

#[test]
fn rejects_ids_out_of_order() {
    let dir = tiny_pack_with(|v| v["concepts"][7]["id"] = json!(8));
    let (_, s) = open_err(&dir);
    assert!(s.contains("entry 7") && s.contains("position 7"), "{s}");
}

#[test]
fn manifest_keeps_one_concept_per_line() {
    let dir = tempfile::tempdir().unwrap();
    tiny_pack(dir.path());
    let text = std::fs::read_to_string(dir.path().join("manifest.json")).unwrap();
    assert_eq!(text.lines().filter(|l| l.starts_with("{\"id\":")).count(), 60);
    assert_eq!(read_manifest(dir.path())["format_version"], json!(1));
}

/// Writes a one-shard pack by hand, laying tensors out in `order` (indices into the key list)
/// for concept 0 and in key order for concept 1, optionally swapping a tensor across probes.
fn hand_written_pack(dir: &std::path::Path, order: [usize; 6], interleave: bool) -> Vec<ProbeWeights> {
    let layout = probe_cascade::pack::ProbeLayout::new(4, DType::F32);
    let probe = |seed: f32| ProbeWeights {
        w1: (0..512).map(|i| (i as f32 * 0.01 + seed).sin()).collect(),
        b1: (0..128).map(|i| (i as f32 * 0.1 + seed).cos() * 0.1).collect(),
        w2: (0..8192).map(|i| (i as f32 * 0.003 + seed).sin() * 0.1).collect(),
        b2: vec![0.01; 64],
        w3: (0..64).map(|i| (i as f32 + seed).cos()).collect(),
        b3: vec![seed],
    };
    let probes = vec![probe(0.5), probe(-0.25)];
    let keys = probe_cascade::pack::ProbeLayout::KEYS;
    let mut placement: Vec<(u32, usize)> = order.iter().map(|&k| (0, k)).collect();
    placement.extend((0..6).map(|k| (1, k)));
    if interleave {
        placement.swap(5, 6);
    }
    let (mut header, mut data) = (serde_json::Map::new(), Vec::<u8>::new());
    for (id, k) in placement {
        let values = probes[id as usize].in_layout_order()[k];
        let start = data.len();
        values.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
        header.insert(
            format!("{id}/{}", keys[k]),
            json!({"dtype": "F32", "shape": layout.tensors()[k].shape(), "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    let data_start = file.len() as u64;
    file.extend_from_slice(&data);
    std::fs::write(dir.join("s.safetensors"), &file).unwrap();
    let len = layout.byte_len() as u64;
    let entry = |id: u64, name: &str, layer: u64, parents: Vec<u64>, children: Vec<u64>| {
        let offset = data_start + id * len;
        let crc = crc32fast::hash(&file[offset as usize..(offset + len) as usize]);
        json!({"id": id, "name": name, "layer": layer, "parents": parents, "children": children,
               "weights": {"shard": 0, "offset": offset, "length": len}, "crc32": crc})
    };
    let manifest = json!({
        "format": "probe-cascade-pack", "format_version": 1, "hidden_dim": 4, "dtype": "f32",
        "architecture": {"kind": "mlp", "hidden": [128, 64], "activation": "relu", "output": "sigmoid"},
        "shards": ["s.safetensors"],
        "concepts": [entry(0, "Top", 0, vec![], vec![1]), entry(1, "Below", 1, vec![0], vec![])],
    });
    common::write_manifest(dir, &manifest);
    probes
}

#[test]
fn tensors_within_a_probe_may_come_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let probes = hand_written_pack(dir.path(), [5, 1, 3, 0, 4, 2], false);
    let pack = Pack::open(dir.path()).unwrap();
    for (i, want) in probes.iter().enumerate() {
        let id = ConceptId(i as u32);
        let got = pack.decode_probe(ProbeId::sole(id), &pack.read_probe(ProbeId::sole(id)).unwrap()).unwrap();
        assert_eq!(&got, want, "probe {i} decodes from its own tensor order");
    }
    assert_ne!(pack.tensor_offsets(ProbeId(0)), pack.layout().canonical_offsets());
    assert_eq!(pack.tensor_offsets(ProbeId(1)), pack.layout().canonical_offsets());
}

#[test]
fn rejects_probes_whose_tensors_interleave() {
    let dir = tempfile::tempdir().unwrap();
    hand_written_pack(dir.path(), [0, 1, 2, 3, 4, 5], true);
    let (e, s) = open_err(&dir);
    assert!(matches!(e, PackError::BadTensor { .. }), "{s}");
    assert!(s.contains("Top@0") && s.contains("back to back"), "{s}");
}

/// A v2 pack of three lenses over model layers 4 and 9: A (two probes, both calibrated), B (one
/// probe at layer 9, uncalibrated), C (two probes, one calibrated).
fn lens_pack(dir: &std::path::Path) -> Vec<ProbeWeights> {
    use probe_cascade::pack::{write_pack, ConceptDef, LensSpec, ProbeDef};
    let q = |k: f64| Some(vec![0.1 * k, 0.2 * k, 0.5 * k]);
    let p = |model_layer, quantiles| ProbeDef { model_layer, quantiles };
    let spec = PackSpec {
        hidden_dim: 8,
        dtype: DType::F32,
        input_normalization: probe_cascade::pack::InputNormalization::LayerNorm,
        probes_per_shard: 2,
        concepts: vec![
            ConceptDef { name: "A".into(), layer: 0, parents: vec![] },
            ConceptDef { name: "B".into(), layer: 1, parents: vec![0] },
            ConceptDef { name: "C".into(), layer: 1, parents: vec![0] },
        ],
        lenses: Some(LensSpec {
            model_layers: vec![4, 9],
            probes: vec![vec![p(4, q(1.0)), p(9, q(1.5))], vec![p(9, None)], vec![p(4, None), p(9, q(1.0))]],
            calibration: None,
            simplexes: Vec::new(),
        }),
    };
    let weights: Vec<ProbeWeights> = (0..5).map(|i| synth_probe(9, i, &[0.5; 8], 1.0 + i as f32)).collect();
    write_pack(dir, &spec, |id| weights[id as usize].clone(), |_| {}).unwrap();
    weights
}

fn lens_pack_with(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    lens_pack(dir.path());
    let mut v = read_manifest(dir.path());
    edit(&mut v);
    common::write_manifest(dir.path(), &v);
    dir
}

#[test]
fn a_v2_pack_round_trips_its_lenses_probes_and_quantiles() {
    let dir = tempfile::tempdir().unwrap();
    let weights = lens_pack(dir.path());
    let pack = Pack::open(dir.path()).unwrap();
    assert_eq!((pack.format_version(), pack.len(), pack.probe_count()), (2, 3, 5));
    assert_eq!(pack.model_layers(), &[4, 9]);
    assert_eq!(pack.hidden_states(), 2);
    assert!(pack.calibrated() && !pack.one_probe_per_concept());
    let probes = |c: u32| -> Vec<(u32, u16, Option<Vec<f64>>)> {
        pack.probes_of(ConceptId(c))
            .map(|p| (pack.probe(p).model_layer, pack.probe(p).state, pack.quantiles(p).map(|q| q.to_vec())))
            .collect()
    };
    assert_eq!(probes(0), vec![(4, 0, Some(vec![0.1, 0.2, 0.5])), (9, 1, Some(vec![0.1 * 1.5, 0.2 * 1.5, 0.5 * 1.5]))]);
    assert_eq!(probes(1), vec![(9, 1, None)]);
    assert_eq!(probes(2), vec![(4, 0, None), (9, 1, Some(vec![0.1, 0.2, 0.5]))]);
    for (i, w) in weights.iter().enumerate() {
        let p = ProbeId(i as u32);
        assert_eq!(&pack.decode_probe(p, &pack.read_probe(p).unwrap()).unwrap(), w, "probe {i}");
    }
    assert!(pack.verify(|_| {}).is_empty());
    // A probe's errors name its lens and its model layer.
    assert_eq!(pack.probe_label(ProbeId(4)), "C@1 (model layer 9)");
    let v = read_manifest(dir.path());
    assert_eq!(v["format_version"], json!(2));
    assert_eq!(v["concepts"][2]["probes"][1]["id"], json!(4));
}

/// A simplex "Drive" of one pole, its probe `id` reading `model_layer`, over probe 0's bytes.
fn simplex(v: &serde_json::Value, id: u32, model_layer: u32) -> serde_json::Value {
    let p = &v["concepts"][0]["probes"][0];
    json!({"name": "Drive", "poles": [{"pole": "positive", "id": id, "model_layer": model_layer,
        "weights": p["weights"], "crc32": p["crc32"]}]})
}

/// One lens's concept-calibration statistics, with `cross_mean` as given.
fn stats(cross_mean: f64) -> serde_json::Value {
    json!({"self_mean": 0.9, "cross_mean": cross_mean, "cross_fire_rate": 0.1, "gen_fire_rate": 0.1,
           "noise_fire_rate": 0.0})
}

#[test]
fn a_concept_calibrated_v2_pack_gives_each_lens_its_statistics_or_the_neutral_default() {
    let dir = lens_pack_with(|v| {
        v["concept_calibration"] = json!("three_stage");
        v["concepts"][0]["calibration"] = stats(0.3);
    });
    let pack = Pack::open(dir.path()).unwrap();
    assert!(pack.concept_calibrated());
    assert_eq!(pack.concept_calibration_count(), 1);
    assert_eq!(pack.concept_calibration(ConceptId(0)).unwrap().cross_mean, 0.3);
    assert_eq!(*pack.concept_calibration(ConceptId(1)).unwrap(), probe_cascade::pack::ConceptCalibration::NEUTRAL);
    let plain = tempfile::tempdir().unwrap();
    lens_pack(plain.path());
    let plain = Pack::open(plain.path()).unwrap();
    assert!(!plain.concept_calibrated() && plain.concept_calibration(ConceptId(0)).is_none());
}

#[test]
fn v2_defects_are_errors_naming_the_lens_and_what_is_wrong() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &[&str])> = vec![
        (
            Box::new(|v| v["concepts"][0]["probes"][0]["quantiles"] = json!([0.5, 0.2, 0.9])),
            &["A@0", "not non-decreasing"],
        ),
        (Box::new(|v| v["concepts"][0]["probes"][0]["quantiles"] = json!([0.5])), &["A@0", "at least 2"]),
        (Box::new(|v| v["concepts"][1]["probes"][0]["model_layer"] = json!(5)), &["B@1", "model layer 5", "[4, 9]"]),
        (Box::new(|v| v["concepts"][1]["probes"] = json!([])), &["B@1", "no probes"]),
        (
            Box::new(|v| v["concepts"][2]["probes"][1]["model_layer"] = json!(4)),
            &["C@1", "two probes of model layer 4"],
        ),
        (Box::new(|v| v["concepts"][2]["probes"][0]["id"] = json!(7)), &["C@1", "dense"]),
        (Box::new(|v| v["model_layers"] = json!([9, 4])), &["ascending"]),
        (Box::new(|v| v["lens_score"] = json!("mean")), &["lens_score `mean`"]),
        (
            Box::new(|v| v["concepts"][1]["weights"] = json!({"shard": 0, "offset": 0, "length": 1})),
            &["B@1", "v2 concept"],
        ),
        (Box::new(|v| v["concepts"][1]["parents"] = json!([5])), &["B@1", "5"]),
        (Box::new(|v| v["concept_calibration"] = json!("linear")), &["concept_calibration `linear`"]),
        (Box::new(|v| v["simplexes"] = json!([simplex(v, 7, 4)])), &["simplex \"Drive\"", "expected 5"]),
        (Box::new(|v| v["simplexes"] = json!([simplex(v, 5, 6)])), &["\"positive\"", "model layer 6", "[4, 9]"]),
        (
            Box::new(|v| v["simplexes"] = json!([simplex(v, 5, 4), simplex(v, 6, 4)])),
            &["names must be non-empty and distinct"],
        ),
        (Box::new(|v| v["simplexes"] = json!([{"name": "Drive", "poles": []}])), &["no poles"]),
        (Box::new(|v| v["concepts"][1]["calibration"] = stats(0.3)), &["B@1", "no `concept_calibration` rule"]),
        (
            Box::new(|v| {
                v["concept_calibration"] = json!("three_stage");
                v["concepts"][2]["calibration"] = stats(1.5);
            }),
            &["C@1", "cross_mean is 1.5, not in [0, 1]"],
        ),
    ];
    for (edit, says) in cases {
        let dir = lens_pack_with(edit);
        let (_, s) = open_err(&dir);
        assert!(says.iter().all(|w| s.contains(w)), "{says:?} in {s}");
    }
}
