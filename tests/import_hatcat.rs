//! `pack import-hatcat` on the committed fixtures (tests/fixtures/hatcat, made by its
//! make_fixtures.py with PyTorch): every fixture imports, every malformed file is refused with
//! its own error, and the reference engine scores the imported packs like PyTorch did.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use probe_cascade::config::Config;
use probe_cascade::engine::{build_engine, EngineKind};
use probe_cascade::import::hatcat::{find_probe_file, trained_probe, KeyStyle};
use probe_cascade::import::torch_file::{read_state_dict, StoredDType, TorchFileError};
use probe_cascade::import::{import_hatcat, ImportError, ImportOptions, ImportSummary};
use probe_cascade::pack::manifest::InputNormalization;
use probe_cascade::pack::{DType, Pack};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hatcat")
}

fn import(
    hierarchy: &str,
    lenses: &str,
    dtype: DType,
    skip_bad: bool,
) -> (tempfile::TempDir, Result<ImportSummary, ImportError>) {
    let out = tempfile::tempdir().unwrap();
    let options = ImportOptions { dtype, skip_bad, probes_per_shard: 4 };
    let f = fixtures();
    let result = import_hatcat(&f.join(hierarchy), &f.join(lenses), &out.path().join("pack"), &options, |_, _, _| {});
    (out, result)
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

/// Scores every probe of the pack on the fixture inputs with the reference engine (all layers
/// in the base set, no pruning: every probe is scored on every token) and compares with the
/// logits PyTorch computed from the original models, and with the logits worked out here from
/// the fixture file's weights (LayerNorm with its affine, then the MLP, in f64).
fn assert_scores_like_pytorch(pack_dir: &Path, which: &str, tolerance: f32) {
    let expected = expected();
    let want: BTreeMap<String, Vec<f32>> =
        expected[which].as_object().unwrap().iter().map(|(label, logits)| (label.clone(), floats(logits))).collect();
    let inputs: Vec<Vec<f32>> = expected["inputs"].as_array().unwrap().iter().map(floats).collect();
    assert_pack_scores(pack_dir, &fixtures().join(which), &inputs, &want, tolerance);
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// [`assert_scores_like_pytorch`] for any pack: `want` maps `name@layer` to PyTorch's logits
/// on `inputs`; `lenses` holds the probe files the pack was imported from.
fn assert_pack_scores(
    pack_dir: &Path,
    lenses: &Path,
    inputs: &[Vec<f32>],
    want: &BTreeMap<String, Vec<f32>>,
    tolerance: f32,
) {
    let pack = Arc::new(Pack::open(pack_dir).unwrap());
    let layers: Vec<String> = (0..=pack.hierarchy().ids().map(|id| pack.hierarchy().layer(id)).max().unwrap())
        .map(|l| l.to_string())
        .collect();
    let toml = format!(
        "[cascade]\nbase_layers = [{}]\npruning = \"none\"\nmax_loaded = {n}\nreport_top_k = {n}\n",
        layers.join(", "),
        n = pack.len().max(64)
    );
    let config = Config::parse(&toml, Path::new("test.toml")).unwrap();
    let mut engine = build_engine(EngineKind::Reference, pack.clone(), &config).unwrap();
    assert_eq!(want.len(), pack.len(), "every fixture probe is in the pack");
    // Each probe file's own weights, read once.
    let by_hand: BTreeMap<String, _> = want
        .keys()
        .map(|label| {
            let (name, layer) = label.rsplit_once('@').unwrap();
            let file = find_probe_file(lenses, name, layer.parse().unwrap()).unwrap();
            (label.clone(), trained_probe(read_state_dict(&file).unwrap()).unwrap())
        })
        .collect();
    for (token, x) in inputs.iter().enumerate() {
        let report = engine.observe(token, x).unwrap();
        assert_eq!(report.top.len(), pack.len());
        for entry in &report.top {
            let label = format!("{}@{}", entry.name, entry.layer);
            let torch = want[&label][token];
            let diff = (entry.logit - torch).abs();
            assert!(diff <= tolerance * (1.0 + torch.abs()), "{label} token {token}: {} vs torch {torch}", entry.logit);
            let (by_hand, _) = by_hand[&label].logit(x);
            assert!(
                (by_hand as f32 - torch).abs() <= 1e-5 * (1.0 + torch.abs()),
                "{label}: {by_hand} vs torch {torch}"
            );
            let diff = (entry.logit as f64 - by_hand).abs() as f32;
            assert!(diff <= tolerance * (1.0 + torch.abs()), "{label} token {token}: {} vs {by_hand}", entry.logit);
        }
    }
}

fn parents_of(pack: &Pack, name: &str, layer: u16) -> Vec<String> {
    let h = pack.hierarchy();
    let id = h.ids().find(|&id| h.name(id) == name && h.layer(id) == layer).unwrap();
    h.parents(id).iter().map(|&p| h.label(probe_cascade::pack::ConceptId(p))).collect()
}

#[test]
fn the_main_fixture_imports_and_scores_like_pytorch() {
    let (out, summary) = import("hierarchy", "lenses", DType::F32, false);
    let s = summary.unwrap();
    assert_eq!(s.imported, 11);
    assert_eq!(s.no_probe_file, vec!["Motion@2"]);
    assert!(s.bad.is_empty());
    assert_eq!(s.input_normalization, InputNormalization::None);
    assert_eq!(s.layer_norms_folded, 0);
    assert_eq!(s.key_styles.get("bare"), Some(&4));
    assert_eq!(s.key_styles.get("net"), Some(&7));
    assert_eq!(s.source_dtypes.get("bf16"), Some(&4));
    assert_eq!(s.source_dtypes.get("f32"), Some(&7));
    assert_eq!(s.schemas.values().copied().collect::<Vec<_>>(), ["layer"; 3]);
    assert_eq!(s.per_layer[&2].listed, 6);
    assert_eq!(s.per_layer[&2].imported, 5);
    // Union of both fields: 6 stated by both sides, Abstract→Number and Process@1→Motion only
    // by category_children; Physical→Region, Process@1→Process@2 and Process@2→Motion only by
    // parent_concepts. Motion's two links go with it.
    assert_eq!(s.links.source, "layer files");
    assert_eq!((s.links.links, s.links.agreed), (11, 6));
    assert_eq!((s.links.only_in_category_children, s.links.only_in_parent_concepts), (2, 3));
    assert_eq!(s.links_to_skipped, 2);
    // f32 holds f32 and bf16 sources exactly.
    assert_eq!(s.worst_logit_error, 0.0);

    let dir = out.path().join("pack");
    let pack = Pack::open(&dir).unwrap();
    assert!(pack.verify(|_| {}).is_empty());
    assert_eq!(parents_of(&pack, "Process", 2), ["Process@1"], "nearest lower Process");
    assert_eq!(parents_of(&pack, "Process", 1), ["Physical@1"], "lowest Process at or below Physical's layer");
    assert_eq!(parents_of(&pack, "Region", 2), ["Physical@1"]);
    assert_eq!(parents_of(&pack, "Number", 2), ["Abstract@1"]);
    // Entity comes from layer0/Entity.pt, not the decoy Entity_classifier.pt: the logits say so.
    assert_scores_like_pytorch(&dir, "lenses", 1e-5);
}

#[test]
fn hierarchy_json_wins_over_the_layer_files() {
    let (out, summary) = import("hierarchy_old", "lenses", DType::F32, false);
    let s = summary.unwrap();
    assert_eq!(s.schemas.values().copied().collect::<Vec<_>>(), ["metadata"; 3]);
    assert_eq!(s.links.source, "hierarchy.json");
    // hierarchy.json moves Region under Abstract and leaves Number parentless.
    assert_eq!((s.links.links, s.links.agreed, s.links.only_in_hierarchy_json), (9, 8, 1));
    assert_eq!(s.links.dropped_from_layer_files, 3);
    let pack = Pack::open(out.path().join("pack")).unwrap();
    assert_eq!(parents_of(&pack, "Region", 2), ["Abstract@1"]);
    assert!(parents_of(&pack, "Number", 2).is_empty());
    assert_eq!(parents_of(&pack, "Process", 2), ["Process@1"]);
}

#[test]
fn bf16_packs_score_within_the_bf16_tolerance() {
    let (out, summary) = import("hierarchy", "lenses", DType::Bf16, false);
    let s = summary.unwrap();
    assert!(s.worst_logit_error > 0.0 && s.worst_logit_error <= s.tolerance, "{}", s.worst_logit_error);
    assert_scores_like_pytorch(&out.path().join("pack"), "lenses", 2e-2);
}

#[test]
fn layer_norm_probes_fold_into_a_normalized_pack() {
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::Bf16, 2e-2)] {
        let (out, summary) = import("hierarchy_ln", "lenses_ln", dtype, false);
        let s = summary.unwrap();
        assert_eq!(s.imported, 3);
        assert_eq!(s.layer_norms_folded, 3);
        assert_eq!(s.input_normalization, InputNormalization::LayerNorm);
        let dir = out.path().join("pack");
        assert_eq!(Pack::open(&dir).unwrap().input_normalization(), InputNormalization::LayerNorm);
        assert_scores_like_pytorch(&dir, "lenses_ln", tolerance);
    }
}

fn bad(name: &str) -> PathBuf {
    fixtures().join("bad").join(name)
}

fn probe_error(path: &Path) -> String {
    trained_probe(read_state_dict(path).unwrap()).unwrap_err()
}

#[test]
fn each_malformed_probe_file_has_its_own_error() {
    assert!(matches!(read_state_dict(&bad("truncated.pt")), Err(TorchFileError::NotZip { .. })));
    assert!(matches!(read_state_dict(&bad("legacy.pt")), Err(TorchFileError::Legacy { .. })));
    match read_state_dict(&bad("tensor.pt")) {
        Err(TorchFileError::NotStateDict { found, .. }) => assert_eq!(found, "a tensor of shape [3]"),
        other => panic!("{other:?}"),
    }
    match read_state_dict(&bad("not_state_dict.pt")) {
        Err(TorchFileError::NotStateDict { found, .. }) => assert_eq!(found, "a dict whose entry \"epoch\" is an int"),
        other => panic!("{other:?}"),
    }
    match read_state_dict(&fixtures().join("other/f64.pt")) {
        Err(e @ TorchFileError::Tensor { .. }) => {
            assert!(e.to_string().contains("storage type DoubleStorage is not supported"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let missing = std::fs::read_dir(fixtures()).unwrap().count(); // the directory is readable
    assert!(missing > 0);
    assert!(matches!(read_state_dict(&bad("absent.pt")), Err(TorchFileError::Io { .. })));
    assert_eq!(probe_error(&bad("missing_key.pt")), "missing key 6.bias");
    assert!(probe_error(&fixtures().join("other/linear_probe.pt")).starts_with("a linear probe (linear.weight)"));
    assert_eq!(probe_error(&bad("wrong_shape.pt")), "0.weight has shape [32, 16], expected [128, D]");
    assert!(probe_error(&bad("nan.pt")).starts_with("3.weight[647] is NaN"), "{}", probe_error(&bad("nan.pt")));
    // Every message names the file.
    for name in ["truncated.pt", "legacy.pt", "tensor.pt", "not_state_dict.pt"] {
        let e = read_state_dict(&bad(name)).unwrap_err().to_string();
        assert!(e.contains(&bad(name).display().to_string()), "{e}");
    }
}

#[test]
fn other_storage_dtypes_and_styles_are_read_exactly() {
    let f16 = trained_probe(read_state_dict(&fixtures().join("other/f16.pt")).unwrap()).unwrap();
    assert_eq!((f16.dtype, f16.style, f16.hidden_dim), (StoredDType::F16, KeyStyle::Bare, 16));
    let ln =
        trained_probe(read_state_dict(&fixtures().join("lenses_ln/layer1/Person_classifier.pt")).unwrap()).unwrap();
    assert_eq!((ln.dtype, ln.style), (StoredDType::Bf16, KeyStyle::Net));
    assert!(ln.layer_norm.is_some());
}

#[test]
fn bad_files_stop_the_import_or_are_skipped_and_listed() {
    let (out, result) = import("hierarchy_bad", "lenses_bad", DType::F32, false);
    match result {
        Err(ImportError::Probe { path, concept, .. }) => {
            assert!(path.ends_with("lenses_bad/layer1/Truncated.pt"), "{path:?}");
            assert_eq!(concept, "Truncated@1");
        }
        other => panic!("{other:?}"),
    }
    assert!(!out.path().join("pack/manifest.json").exists(), "nothing written");

    let (out, result) = import("hierarchy_bad", "lenses_bad", DType::F32, true);
    let s = result.unwrap();
    assert_eq!(s.imported, 2);
    let skipped: Vec<(&str, bool)> = s
        .bad
        .iter()
        .map(|b| (b.concept.as_str(), b.file.ends_with(format!("{}.pt", &b.concept[..b.concept.len() - 2]))))
        .collect();
    assert_eq!(skipped, [("Truncated@1", true), ("Tensor@1", true)]);
    assert!(s.bad[1].reason.contains("not a state_dict"), "{}", s.bad[1].reason);
    assert_eq!(s.links_to_skipped, 2);
    assert_eq!(Pack::open(out.path().join("pack")).unwrap().len(), 2);
    assert!(s.to_string().contains("skipped, bad probe file: 2"));
}

/// A throwaway HatCat layout: `layers` are (file name, contents); `probes` are
/// (path under lenses, fixture file to copy).
fn layout(layers: &[(&str, &str)], probes: &[(&str, PathBuf)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("hier")).unwrap();
    for (name, text) in layers {
        std::fs::write(dir.path().join("hier").join(name), text).unwrap();
    }
    for (rel, from) in probes {
        let to = dir.path().join("lenses").join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
    std::fs::create_dir_all(dir.path().join("lenses")).unwrap();
    dir
}

fn import_layout(dir: &Path, skip_bad: bool) -> Result<ImportSummary, ImportError> {
    let options = ImportOptions { skip_bad, ..Default::default() };
    import_hatcat(&dir.join("hier"), &dir.join("lenses"), &dir.join("pack"), &options, |_, _, _| {})
}

const TWO_CONCEPTS: &str =
    r#"{"layer": 0, "concepts": [{"sumo_term": "A", "layer": 0}, {"sumo_term": "B", "layer": 0}]}"#;

#[test]
fn a_probe_of_another_width_is_refused_naming_both_files() {
    let dir = layout(
        &[("layer0.json", TWO_CONCEPTS)],
        &[("layer0/A.pt", fixtures().join("lenses/layer0/Entity.pt")), ("layer0/B.pt", bad("wrong_width.pt"))],
    );
    match import_layout(dir.path(), false) {
        Err(ImportError::Probe { path, concept, reason }) => {
            assert!(path.ends_with("B.pt"));
            assert_eq!(concept, "B@0");
            assert!(
                reason.contains("input width D=32 but D=16 was set by the first probe") && reason.contains("A.pt"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn layer_norm_and_plain_probes_do_not_mix_in_one_pack() {
    let three = r#"{"layer": 0, "concepts": [{"sumo_term": "A", "layer": 0}, {"sumo_term": "B", "layer": 0},
        {"sumo_term": "C", "layer": 0}]}"#;
    let dir = layout(
        &[("layer0.json", three)],
        &[
            ("layer0/A.pt", fixtures().join("lenses_ln/layer0/Agent.pt")),
            ("layer0/B.pt", fixtures().join("lenses_ln/Group_classifier.pt")),
            ("layer0/C.pt", fixtures().join("lenses/layer0/Entity.pt")),
        ],
    );
    match import_layout(dir.path(), false) {
        Err(ImportError::Probe { concept, reason, .. }) => {
            assert_eq!(concept, "C@0");
            assert!(reason.contains("has no input LayerNorm, unlike the 2 probes with one"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let s = import_layout(dir.path(), true).unwrap();
    assert_eq!((s.imported, s.bad.len(), s.input_normalization), (2, 1, InputNormalization::LayerNorm));
}

#[test]
fn malformed_hierarchy_files_are_named() {
    let cases = [
        ("layer0.json", "{not json", "layer0.json: not valid JSON"),
        ("layer0.json", r#"{"concepts": []}"#, "neither {\"layer\", \"concepts\"} nor {\"metadata\", \"concepts\"}"),
        ("layer1.json", r#"{"layer": 2, "concepts": []}"#, "layer1.json: \"layer\" is 2 but the file name says 1"),
        ("layer0.json", r#"{"layer": 0, "concepts": [{"layer": 0}]}"#, "concept 0: \"sumo_term\" is missing"),
        ("layer0.json", r#"{"layer": 0, "concepts": [{"sumo_term": "A"}]}"#, "concept 0: A: \"layer\" is missing"),
        (
            "layer0.json",
            r#"{"layer": 0, "concepts": [{"sumo_term": "A", "layer": 0, "category_children": "B"}]}"#,
            "A: \"category_children\" is \"B\", not a list of names",
        ),
        ("notes.json", "{}", "no layer{N}.json files"),
    ];
    for (file, text, want) in cases {
        let dir = layout(&[(file, text)], &[]);
        let e = import_layout(dir.path(), true).unwrap_err();
        assert!(matches!(e, ImportError::Hierarchy { .. }), "{e:?}");
        assert!(e.to_string().contains(want), "{file}: {e}");
    }
}

#[test]
fn missing_directories_and_empty_imports_are_errors_not_empty_packs() {
    let dir = layout(&[("layer0.json", TWO_CONCEPTS)], &[]);
    match import_layout(dir.path(), false) {
        Err(ImportError::Nothing(reason)) => assert!(reason.contains("2 without a probe file"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let e = import_hatcat(
        &dir.path().join("nope"),
        &dir.path().join("lenses"),
        &dir.path().join("p"),
        &Default::default(),
        |_, _, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, ImportError::Io { .. }) && e.to_string().contains("nope"), "{e}");
    // An existing pack is never overwritten.
    let (out, first) = import("hierarchy_ln", "lenses_ln", DType::F32, false);
    first.unwrap();
    let again = import_hatcat(
        &fixtures().join("hierarchy_ln"),
        &fixtures().join("lenses_ln"),
        &out.path().join("pack"),
        &Default::default(),
        |_, _, _| {},
    );
    assert!(matches!(again, Err(ImportError::OutputExists(_))));
}

#[test]
fn corrupt_probe_files_are_errors_never_panics() {
    use probe_cascade::import::torch_file::parse_state_dict;
    let path = fixtures().join("lenses/layer1/Physical.pt");
    let good = std::fs::read(&path).unwrap();
    assert!(parse_state_dict(&good, &path).is_ok());
    // Every truncation point in coarse steps, and single-byte damage all over the file: each
    // read ends in Ok or Err (a flipped weight byte can still parse), never in a panic.
    for len in (0..good.len()).step_by(97) {
        assert!(parse_state_dict(&good[..len], &path).is_err(), "truncated at {len}");
    }
    // Every entry's bytes are checked against the archive's CRC-32, so damage that still
    // parses (a timestamp, the alignment padding) must give back the very same tensors.
    let tensors = parse_state_dict(&good, &path).unwrap();
    let mut errors = 0;
    for at in (0..good.len()).step_by(13) {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bytes = good.clone();
            bytes[at] ^= flip;
            match parse_state_dict(&bytes, &path) {
                Ok(read) => assert_eq!(read, tensors, "byte {at} ^ {flip:#x} changed what was read"),
                Err(_) => errors += 1,
            }
        }
    }
    assert!(errors > 0);
}

#[test]
fn a_non_contiguous_saved_view_reads_like_its_contiguous_copy() {
    let strided = read_state_dict(&fixtures().join("other/strided.pt")).unwrap();
    let contiguous = read_state_dict(&fixtures().join("other/contiguous.pt")).unwrap();
    assert_eq!(strided, contiguous);
}

// --- Root-name lengths and random names (tests/fixtures/hatcat/names*, expected_names.json) ---
//
// torch.save names the archive's root folder after the file's stem, and every entry name
// starts with it, so the central directory's layout follows the concept's name. A reader that
// guessed at the layout once refused exactly the files whose stem is 21 characters long.

fn expected_names() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected_names.json")).unwrap()).unwrap()
}

/// CRC-32 of f32 values' little-endian bytes, as the fixture script takes it from torch.load.
fn crc_of(values: &[f32]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for v in values {
        h.update(&v.to_le_bytes());
    }
    h.finalize()
}

/// Every probe file of fixture set `set` reads like torch.load reads it; the set imports
/// whole, with `--skip-bad` skipping nothing; and the pack scores like PyTorch.
fn assert_probe_set_imports_like_torch(set: &str) -> ImportSummary {
    let want = &expected_names()[set];
    let lenses = fixtures().join(set).join("lenses");
    let probes = want["probes"].as_object().unwrap();
    for (label, probe) in probes {
        let file = lenses.join(probe["file"].as_str().unwrap());
        let read = read_state_dict(&file).unwrap_or_else(|e| panic!("{label}: {e}"));
        let tensors = probe["tensors"].as_object().unwrap();
        // (serde_json's map is sorted, so compare the key sets)
        let mut keys: Vec<&str> = read.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, tensors.keys().map(String::as_str).collect::<Vec<_>>(), "{label}: keys");
        for (key, t) in &read {
            let torch = &tensors[key];
            let shape: Vec<usize> =
                torch["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            assert_eq!(t.shape, shape, "{label} {key}");
            assert_eq!(t.dtype.name(), torch["dtype"].as_str().unwrap(), "{label} {key}");
            assert_eq!(u64::from(crc_of(&t.values)), torch["crc32"].as_u64().unwrap(), "{label} {key}: values");
        }
    }

    let (out, summary) = import(&format!("{set}/hierarchy"), &format!("{set}/lenses"), DType::F32, true);
    let s = summary.unwrap_or_else(|e| panic!("{set}: {e}"));
    assert!(s.bad.is_empty(), "{set}: valid files skipped:\n{s}");
    assert!(s.no_probe_file.is_empty(), "{set}: {:?}", s.no_probe_file);
    assert_eq!(s.imported, probes.len());
    assert_eq!(s.hidden_dim as u64, want["hidden_dim"].as_u64().unwrap());
    // An f32 pack holds f32, bf16 and f16 sources exactly.
    assert_eq!(s.worst_logit_error, 0.0);

    let logits: BTreeMap<String, Vec<f32>> = probes.iter().map(|(l, p)| (l.clone(), floats(&p["logits"]))).collect();
    let inputs: Vec<Vec<f32>> = want["inputs"].as_array().unwrap().iter().map(floats).collect();
    assert_pack_scores(&out.path().join("pack"), &lenses, &inputs, &logits, 1e-5);
    s
}

fn root_lengths(set: &str) -> BTreeMap<u64, usize> {
    let mut lengths = BTreeMap::new();
    for probe in expected_names()[set]["probes"].as_object().unwrap().values() {
        *lengths.entry(probe["root_bytes"].as_u64().unwrap()).or_default() += 1;
    }
    lengths
}

#[test]
fn every_root_name_length_imports_at_d576() {
    // Both lookup styles at every length they can have: {name}.pt from 1, _classifier from 12.
    let lengths = root_lengths("names576");
    assert_eq!(lengths.keys().copied().collect::<Vec<_>>(), (1..=64).collect::<Vec<_>>());
    assert!(lengths[&21] == 2 && lengths[&12] == 2 && lengths[&11] == 1);
    let s = assert_probe_set_imports_like_torch("names576");
    assert_eq!(s.imported, 117);
    for dtype in ["f32", "bf16", "f16"] {
        assert_eq!(s.source_dtypes[dtype], 39, "{dtype}");
    }
    assert!(s.key_styles["net"] > 0 && s.key_styles["bare"] > 0);
}

#[test]
fn every_root_name_length_imports_at_d2560() {
    let lengths = root_lengths("names2560");
    assert_eq!(lengths.keys().copied().collect::<Vec<_>>(), (1..=64).collect::<Vec<_>>());
    let s = assert_probe_set_imports_like_torch("names2560");
    assert_eq!((s.imported, s.hidden_dim), (64, 2560));
    assert_eq!(s.source_dtypes.len(), 3);
    // The reported case: Possession_classifier.pt, a 21-character stem.
    let probes = expected_names()["names2560"]["probes"].as_object().unwrap().clone();
    assert!(probes.values().any(|p| p["root_bytes"] == 21 && p["file"].as_str().unwrap().ends_with("_classifier.pt")));
}

#[test]
fn three_hundred_random_names_import_like_torch_loads_them() {
    let s = assert_probe_set_imports_like_torch("names_random");
    assert_eq!(s.imported, 300);
    let lengths = root_lengths("names_random");
    assert!(lengths.keys().any(|&l| l > 64), "names longer than the sweep");
    assert!(lengths.len() > 50, "{} distinct root lengths", lengths.len());
}
