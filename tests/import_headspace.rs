//! A headspace lens pack, imported as it is on disk (tests/fixtures/headspace: real
//! `torch.save` files of lenses with one or two probes over model layers 4 and 7, a
//! probe_calibration.json, a bundled hierarchy), scores what an independent float64 numpy
//! implementation of headspace's rules gives (tests/fixtures/headspace/numpy_reference.py), in
//! its calibrated and its raw variant. The actor runtime (CPU kernel and libtorch store, exact
//! and pipelined, several sessions) scores them as the reference engine does. Alerts cover
//! lenses outside the report; an observation without every model layer is a named error; bad
//! calibration files are named errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use probe_cascade::config::{CascadeConfig, Config, CpuKernel, Expansion, Mode, Normalization, Pruning, WatchProfile};
use probe_cascade::engine::oracle::OracleEngine;
use probe_cascade::engine::{build_engine, prepare_hidden, Engine, EngineError, EngineKind, Hidden, TokenReport};
use probe_cascade::import::headspace::import_headspace;
use probe_cascade::import::{ImportError, ImportOptions};
use probe_cascade::kernel::{reference_logit, ProbeRef};
use probe_cascade::pack::{ConceptId, Pack, ProbeId};
use probe_cascade::runtime::{BlockingCascade, Runtime, SessionOptions};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/headspace")
}

fn python() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is missing; `make test` provisions it (scripts/python-env.sh)", p.display());
        None
    }
}

/// A copy of the fixture pack, without its calibration file when `raw`.
fn copy_pack(to: &Path, raw: bool) -> PathBuf {
    let from = fixture().join("pack");
    let dst = to.join("headspace");
    for entry in walk(&from) {
        let rel = entry.strip_prefix(&from).unwrap();
        if raw && rel == Path::new("probe_calibration.json") {
            continue;
        }
        std::fs::create_dir_all(dst.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(&entry, dst.join(rel)).unwrap();
    }
    dst
}

/// A copy of the fixture pack with the fixture's `simplex/` folder.
fn simplex_pack(to: &Path) -> PathBuf {
    let dst = copy_pack(to, false);
    let from = fixture().join("simplex");
    for entry in walk(&from) {
        let to = dst.join("simplex").join(entry.strip_prefix(&from).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&entry, to).unwrap();
    }
    dst
}

/// A copy of the fixture pack with the fixture's older per-concept `calibration.json`.
fn concept_calibrated_pack(to: &Path) -> PathBuf {
    let dst = copy_pack(to, false);
    std::fs::copy(fixture().join("calibration.json"), dst.join("calibration.json")).unwrap();
    dst
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn import(dir: &Path, out: &Path) -> Result<Arc<Pack>, ImportError> {
    import_headspace(dir, out, &ImportOptions::default(), |_, _, _| {})?;
    Ok(Arc::new(Pack::open(out).unwrap()))
}

/// Every lens scored every token, all of them reported.
fn exhaustive(report_top_k: usize, watch: Vec<WatchProfile>) -> Config {
    let mut c = Config::default();
    c.device.threads = 2;
    c.cascade = CascadeConfig {
        base_layers: vec![0],
        expansion: Expansion::Exhaustive,
        pruning: Pruning::None,
        report_top_k,
        watch,
        ..CascadeConfig::default()
    };
    c
}

struct Expected {
    trace: Vec<Vec<f32>>,
    /// "Name@layer" -> score per token.
    lenses: BTreeMap<String, Vec<f64>>,
    /// With `--simplex`: "Autonomy/pole" -> per token.
    simplex: BTreeMap<String, Pole>,
}

#[derive(serde::Deserialize)]
struct Pole {
    prob: Vec<f64>,
    deviation: Vec<Option<f64>>,
}

fn numpy_reference(python: &Path, out: &Path, raw: bool) -> Expected {
    numpy_reference_with(python, out, if raw { &["--raw"] } else { &[] })
}

/// numpy's scores as reported in a concept-calibrated pack (the fixture's calibration.json).
fn numpy_reference_concept(python: &Path, out: &Path) -> Expected {
    let file = fixture().join("calibration.json");
    numpy_reference_with(python, out, &["--concept-calibration", file.to_str().unwrap()])
}

fn numpy_reference_with(python: &Path, out: &Path, flags: &[&str]) -> Expected {
    let mut cmd = Command::new(python);
    cmd.arg(fixture().join("numpy_reference.py")).arg(fixture()).arg(out).args(flags);
    assert!(cmd.status().unwrap().success(), "numpy_reference.py failed");
    let m = probe_cascade::npy::read(&out.join("trace.npy")).unwrap();
    let trace = (0..m.rows).map(|r| m.row(r).to_vec()).collect();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("expected.json")).unwrap()).unwrap();
    assert_eq!(v["model_layers"], serde_json::json!([4, 7]));
    let lenses = serde_json::from_value(v["lenses"].clone()).unwrap();
    let simplex = serde_json::from_value(v["simplex"].clone()).unwrap();
    Expected { trace, lenses, simplex }
}

fn observe(engine: &mut dyn Engine, pack: &Pack, t: usize, row: &[f32]) -> TokenReport {
    let states: Vec<&[f32]> = row.chunks(pack.hidden_dim()).collect();
    engine.observe_states(t, &states).unwrap()
}

/// The worst difference between the engine's lens scores and numpy's, over every token.
fn worst_difference(pack: &Arc<Pack>, expected: &Expected) -> f64 {
    let mut engine = build_engine(EngineKind::Reference, pack.clone(), &exhaustive(100, Vec::new())).unwrap();
    let mut worst = 0f64;
    for (t, row) in expected.trace.iter().enumerate() {
        let r = observe(engine.as_mut(), pack, t, row);
        assert_eq!(r.top.len(), pack.len(), "every lens is scored and reported");
        assert!(r.top.windows(2).all(|w| w[0].prob >= w[1].prob), "best first");
        for e in &r.top {
            let want = expected.lenses[&format!("{}@{}", e.name, e.layer)][t];
            worst = worst.max((e.prob as f64 - want).abs());
            // Each detection reports every probe of its lens, whose combination is the lens.
            let layers: Vec<u32> = pack.probes_of(e.id).map(|p| pack.probe(p).model_layer).collect();
            assert_eq!(e.probes.iter().map(|p| p.model_layer).collect::<Vec<_>>(), layers);
            let calibrated: Option<Vec<f32>> = e.probes.iter().map(|p| p.calibrated).collect();
            let combined = match calibrated {
                Some(c) => c.into_iter().fold(0.0f32, f32::max),
                None => (e.probes.iter().map(|p| p.prob as f64).sum::<f64>() / e.probes.len() as f64) as f32,
            };
            assert_eq!(combined, e.prob, "{} at token {t}", e.name);
        }
    }
    worst
}

#[test]
fn a_calibrated_headspace_pack_scores_what_numpy_gives_from_its_rules() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&fixture().join("pack"), &dir.path().join("pack")).unwrap();
    assert_eq!(pack.format_version(), 2);
    assert_eq!(pack.model_layers(), &[4, 7]);
    assert_eq!((pack.len(), pack.probe_count()), (8, 12));
    assert!(pack.calibrated());
    let expected = numpy_reference(&python, &dir.path().join("ref"), false);
    // The score of a calibrated probe is its raw score (f32 arithmetic here, f64 there) through
    // a piecewise-linear map whose slope is 1 / (20 × the gap between neighbouring quantiles).
    let worst = worst_difference(&pack, &expected);
    eprintln!("worst lens-score difference {worst:e}");
    assert!(worst < 1e-4, "worst lens-score difference {worst:e}");
}

#[test]
fn a_raw_headspace_pack_scores_the_mean_of_its_probes() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&copy_pack(dir.path(), true), &dir.path().join("pack")).unwrap();
    assert!(!pack.calibrated());
    assert!((0..pack.probe_count() as u32).all(|p| pack.quantiles(ProbeId(p)).is_none()));
    let expected = numpy_reference(&python, &dir.path().join("ref"), true);
    let worst = worst_difference(&pack, &expected);
    eprintln!("worst lens-score difference {worst:e}");
    assert!(worst < 1e-5, "worst lens-score difference {worst:e}");
}

#[test]
fn import_reads_every_layout_and_leaves_plain_probes_uncalibrated() {
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&fixture().join("pack"), &dir.path().join("pack")).unwrap();
    let h = pack.hierarchy();
    let layers_of = |name: &str, layer: u16| -> Vec<(u32, bool)> {
        let c = h.lookup(name, layer).unwrap();
        pack.probes_of(c).map(|p| (pack.probe(p).model_layer, pack.quantiles(p).is_some())).collect()
    };
    assert_eq!(layers_of("Agent", 0), vec![(4, true), (7, true)]);
    // Artifact@L7 has no calibration entry: the lens is a raw mean.
    assert_eq!(layers_of("Artifact", 0), vec![(4, true), (7, false)]);
    // A plain <Concept>.pt reads pack_info.json's model layer and is never calibrated.
    assert_eq!(layers_of("Process", 0), vec![(4, false)]);
    assert_eq!(layers_of("Robot", 1), vec![(7, true)]);
    let parent = |name: &str| h.name(ConceptId(h.parents(h.lookup(name, 1).unwrap())[0])).to_string();
    assert_eq!(parent("Lie"), "Process");
    assert_eq!(parent("Tool"), "Artifact");
}

#[test]
fn alerts_cover_lenses_outside_the_report_at_the_calibrated_default_threshold() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&fixture().join("pack"), &dir.path().join("pack")).unwrap();
    let expected = numpy_reference(&python, &dir.path().join("ref"), false);
    let profile = |name: &str, concepts: &[&str], threshold| WatchProfile {
        name: name.into(),
        concepts: concepts.iter().map(|c| c.to_string()).collect(),
        file: None,
        threshold,
    };
    // "risk" takes a calibrated pack's default threshold, 0.99; "broad" sets 0.5.
    let watch = vec![profile("risk", &["Process"], None), profile("broad", &["Agent", "Process"], Some(0.5))];
    let subtree = |profile: &str| -> &[&str] {
        match profile {
            "risk" => &["Process@0", "Deception@1", "Lie@1"],
            _ => &["Agent@0", "Person@1", "Robot@1", "Process@0", "Deception@1", "Lie@1"],
        }
    };
    let mut engine = build_engine(EngineKind::Reference, pack.clone(), &exhaustive(1, watch)).unwrap();
    let (mut outside, mut risk) = (0, 0);
    for (t, row) in expected.trace.iter().enumerate() {
        let r = observe(engine.as_mut(), &pack, t, row);
        assert_eq!(r.top.len(), 1);
        for (name, threshold) in [("risk", 0.99), ("broad", 0.5)] {
            let mut got: Vec<String> =
                r.alerts.iter().filter(|a| a.profile == name).map(|a| format!("{}@{}", a.concept, a.layer)).collect();
            got.sort();
            let mut want: Vec<String> =
                subtree(name).iter().filter(|l| expected.lenses[**l][t] >= threshold).map(|l| l.to_string()).collect();
            want.sort();
            assert_eq!(got, want, "token {t}, profile {name}");
        }
        risk += r.alerts.iter().filter(|a| a.profile == "risk").count();
        outside += r.alerts.iter().filter(|a| a.concept != r.top[0].name).count();
    }
    eprintln!("{risk} alerts at 0.99, {outside} of lenses outside the report");
    assert!(risk > 0 && outside > 0, "alerts at the default threshold, and of lenses the report leaves out");
}

#[test]
fn an_observation_without_every_model_layer_is_an_error_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&fixture().join("pack"), &dir.path().join("pack")).unwrap();
    let mut engine = build_engine(EngineKind::Reference, pack.clone(), &exhaustive(3, Vec::new())).unwrap();
    let h = vec![0.5f32; pack.hidden_dim()];
    let e = engine.observe(3, &h).unwrap_err();
    assert!(matches!(e, EngineError::Hidden { token: 3, .. }), "{e:?}");
    let m = e.to_string();
    assert!(m.contains("token 3") && m.contains("model layers [4, 7]") && m.contains("1 hidden states"), "{m}");
    // Two states of the right width work.
    engine.observe_states(4, &[&h, &h]).unwrap();
}

#[test]
fn bad_calibration_files_are_errors_naming_the_file_and_the_probe() {
    let cases: [(&str, &str); 4] = [
        (r#"{"probes": {"layer9/Ghost@L4": {"quantiles": [0.1, 0.5]}}}"#, "layer9/Ghost@L4"),
        (r#"{"probes": {"layer0/Agent@L4": {"quantiles": [0.5, 0.1]}}}"#, "not non-decreasing"),
        (r#"{"probes": {"layer0/Agent@L4": {}}}"#, "has no \"quantiles\""),
        (r#"{"probes": {"layer0/Agent@L4": {"quantiles": [0.5]}}}"#, "at least 2"),
    ];
    for (text, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let src = copy_pack(dir.path(), false);
        std::fs::write(src.join("probe_calibration.json"), text).unwrap();
        let e = import(&src, &dir.path().join("pack")).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("probe_calibration.json") && m.contains(says), "{m}");
        assert!(!dir.path().join("pack/manifest.json").exists(), "nothing is written");
    }
}

/// Decompose the best two lenses, keep three beyond the base, report every lens scored; a
/// profile over two subtrees at 0.5.
fn decompose(cpu_kernel: CpuKernel, mode: Mode) -> Config {
    let mut c = Config::default();
    c.device.threads = 2;
    c.device.cpu_kernel = cpu_kernel;
    c.runtime.mode = mode;
    c.cascade = CascadeConfig {
        base_layers: vec![0],
        expansion: Expansion::Decompose { top_k: 2, max_depth: 5 },
        pruning: Pruning::GlobalTopK { keep: 3 },
        report_top_k: 8,
        watch: vec![WatchProfile {
            name: "broad".into(),
            concepts: vec!["Agent".into(), "Process".into()],
            file: None,
            threshold: Some(0.5),
        }],
        ..CascadeConfig::default()
    };
    c
}

#[test]
fn the_runtime_scores_lenses_over_model_layers_as_the_reference_engine_does() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&fixture().join("pack"), &dir.path().join("pack")).unwrap();
    let expected = numpy_reference(&python, &dir.path().join("ref"), false);
    let trace = &expected.trace[..80];
    let config = decompose(CpuKernel::Auto, Mode::Exact);
    let mut reference = build_engine(EngineKind::Reference, pack.clone(), &config).unwrap();
    let want: Vec<(TokenReport, Vec<ConceptId>)> = trace
        .iter()
        .enumerate()
        .map(|(t, row)| (observe(reference.as_mut(), &pack, t, row), reference.active()))
        .collect();
    let layout = pack.layout();
    // The CPU kernel, and libtorch on a resident store (what an accelerator runs).
    for cpu_kernel in [CpuKernel::Auto, CpuKernel::Torch] {
        let mut runtime = BlockingCascade::start(pack.clone(), &decompose(cpu_kernel, Mode::Exact)).unwrap();
        let (mut loaded, mut unloaded) = (0, 0);
        for (t, row) in trace.iter().enumerate() {
            let r = observe(&mut runtime, &pack, t, row);
            let (w, w_active) = &want[t];
            let ctx = format!("{cpu_kernel:?}, token {t}");
            assert_eq!(runtime.active(), *w_active, "{ctx}: active lenses");
            assert_eq!(r.scored_ids, w.scored_ids, "{ctx}: lenses scored");
            assert_eq!(
                (r.children, r.loaded, r.unloaded, r.active),
                (w.children, w.loaded, w.unloaded, w.active),
                "{ctx}"
            );
            let names = |x: &TokenReport| x.top.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
            assert_eq!(names(&r), names(w), "{ctx}: reports");
            for (a, b) in r.top.iter().zip(&w.top) {
                assert!((a.prob - b.prob).abs() < 1e-3, "{ctx}: {} {} vs {}", a.name, a.prob, b.prob);
                assert_eq!(a.probes.len(), b.probes.len(), "{ctx}: {}", a.name);
            }
            let alerts = |x: &TokenReport| x.alerts.iter().map(|a| a.concept.clone()).collect::<Vec<_>>();
            assert_eq!(alerts(&r), alerts(w), "{ctx}: alerts");
            if cpu_kernel == CpuKernel::Auto {
                // Each probe's logit is the kernel's scalar model of it alone on its layer's state.
                let states: Vec<Vec<f32>> = row
                    .chunks(pack.hidden_dim())
                    .map(|h| prepare_hidden(t, h, pack.hidden_dim(), Normalization::LayerNorm).unwrap())
                    .collect();
                for e in &r.top {
                    for (p, s) in pack.probes_of(e.id).zip(&e.probes) {
                        let bytes = pack.read_probe(p).unwrap();
                        let ranges = layout.ranges(&pack.tensor_offsets(p));
                        let x = &states[pack.probe(p).state as usize];
                        let model = reference_logit(&ProbeRef { bytes: &bytes, ranges: &ranges }, layout.dtype, x);
                        assert_eq!(
                            s.logit.to_bits(),
                            model.to_bits(),
                            "{ctx}: {} model layer {}",
                            e.name,
                            s.model_layer
                        );
                    }
                }
            }
            loaded += r.loaded;
            unloaded += r.unloaded;
        }
        assert!(
            loaded > 0 && unloaded > 0,
            "{cpu_kernel:?}: the cascade loads and prunes lenses ({loaded}, {unloaded})"
        );
        // One hidden state for a pack of two model layers: a named error, and the stream goes on.
        let h = vec![0.5f32; pack.hidden_dim()];
        let m = runtime.observe(99, &h).unwrap_err().to_string();
        assert!(m.contains("model layers [4, 7]"), "{m}");
        observe(&mut runtime, &pack, 100, &trace[0]);
    }
}

#[test]
fn pipelined_sessions_score_lenses_of_several_probes() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&fixture().join("pack"), &dir.path().join("pack")).unwrap();
    let expected = numpy_reference(&python, &dir.path().join("ref"), false);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let runtime = Runtime::start(pack.clone(), &decompose(CpuKernel::Auto, Mode::Pipelined)).await.unwrap();
        let sessions: Vec<_> = futures_open(&runtime, 3).await;
        let mut scored = 0;
        for (t, row) in expected.trace[..40].iter().enumerate() {
            for s in &sessions {
                let states: Vec<Hidden> = row.chunks(pack.hidden_dim()).map(Hidden::from).collect();
                let r = s.observe_states(states).await.unwrap();
                // Every lens reported has all its probes, and its score is their combination.
                for e in &r.top {
                    assert_eq!(e.probes.len(), pack.probes_of(e.id).len(), "token {t}: {}", e.name);
                }
                scored += r.scored;
                s.settle().await.unwrap();
            }
        }
        assert!(scored > 40 * 3 * 3, "lenses beyond the base are scored ({scored})");
        let stats = runtime.step_stats().await.unwrap();
        assert_eq!(stats.sessions, 6, "two lanes (model layers) per session");
        for s in sessions {
            s.close().await;
        }
        runtime.shutdown().await;
    });
}

async fn futures_open(runtime: &Runtime, n: usize) -> Vec<probe_cascade::runtime::Session> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(runtime.open_session(SessionOptions::default()).await.unwrap());
    }
    out
}

#[test]
fn the_oracle_scores_every_lens_as_the_runtime_does_in_the_exhaustive_mode() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&fixture().join("pack"), &dir.path().join("pack")).unwrap();
    let expected = numpy_reference(&python, &dir.path().join("ref"), false);
    let config = exhaustive(8, Vec::new());
    let oracle = OracleEngine::new(pack.clone(), &config).unwrap();
    let rows: Vec<&[f32]> = expected.trace[..40].iter().map(|r| &r[..]).collect();
    let all = oracle.score_all(0, &rows).unwrap();
    let mut runtime = BlockingCascade::start(pack.clone(), &config).unwrap();
    for (t, row) in rows.iter().enumerate() {
        let r = observe(&mut runtime, &pack, t, row);
        let want: Vec<u32> = all[t].iter().map(|s| s.prob.to_bits()).collect();
        assert_eq!(r.scored_probs.iter().map(|p| p.to_bits()).collect::<Vec<_>>(), want, "token {t}: bit for bit");
        for s in &all[t] {
            let h = pack.hierarchy();
            let numpy = expected.lenses[&format!("{}@{}", h.name(s.id), h.layer(s.id))][t];
            assert!((s.prob as f64 - numpy).abs() < 1e-4, "token {t}: {} {} vs numpy {numpy}", h.name(s.id), s.prob);
        }
    }
    // A token of the wrong size names the model layers.
    let e = oracle.score_all(7, &[&rows[0][..16]]).unwrap_err().to_string();
    assert!(e.contains("token 7") && e.contains("[4, 7]"), "{e}");
}

/// Lenses the fixture's calibration.json gives no statistics: they report the neutral 0.5.
const NO_STATISTICS: [&str; 3] = ["Agent@0", "Tool@1", "Lie@1"];

#[test]
fn a_concept_calibrated_pack_reports_lens_scores_through_each_concepts_statistics() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&concept_calibrated_pack(dir.path()), &dir.path().join("pack")).unwrap();
    assert!(pack.concept_calibrated() && pack.calibrated());
    assert_eq!(pack.concept_calibration_count(), 5);
    let expected = numpy_reference_concept(&python, &dir.path().join("ref"));
    let watch = vec![WatchProfile {
        name: "broad".into(),
        concepts: vec!["Artifact".into(), "Process".into()],
        file: None,
        threshold: Some(0.6),
    }];
    let mut engine = build_engine(EngineKind::Reference, pack.clone(), &exhaustive(100, watch)).unwrap();
    let (mut worst, mut alerts) = (0f64, 0);
    for (t, row) in expected.trace.iter().enumerate() {
        let r = observe(engine.as_mut(), &pack, t, row);
        assert!(r.top.windows(2).all(|w| w[0].prob >= w[1].prob), "best first by reported score");
        for e in &r.top {
            let label = format!("{}@{}", e.name, e.layer);
            let want = expected.lenses[&label][t];
            worst = worst.max((e.prob as f64 - want).abs());
            if NO_STATISTICS.contains(&label.as_str()) {
                assert_eq!(e.prob, 0.5, "token {t}: {label} has no statistics");
            }
        }
        // Alerts compare reported scores with the threshold.
        let mut got: Vec<String> = r.alerts.iter().map(|a| format!("{}@{}", a.concept, a.layer)).collect();
        got.sort();
        let subtree = ["Artifact@0", "Deception@1", "Lie@1", "Process@0", "Tool@1"];
        let want: Vec<String> =
            subtree.iter().filter(|l| expected.lenses[**l][t] >= 0.6).map(|l| l.to_string()).collect();
        assert_eq!(got, want, "token {t}");
        alerts += got.len();
    }
    eprintln!("worst reported-score difference {worst:e}; {alerts} alerts");
    assert!(worst < 1e-4, "worst reported-score difference {worst:e}");
    assert!(alerts > 0, "some reported scores pass 0.6");
}

#[test]
fn concept_calibration_changes_what_is_reported_never_what_the_cascade_decides() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plain = import(&fixture().join("pack"), &dir.path().join("plain")).unwrap();
    let calibrated = import(&concept_calibrated_pack(dir.path()), &dir.path().join("pack")).unwrap();
    let expected = numpy_reference(&python, &dir.path().join("ref"), false);
    let config = decompose(CpuKernel::Auto, Mode::Exact);
    let mut a = build_engine(EngineKind::Reference, plain.clone(), &config).unwrap();
    let mut b = build_engine(EngineKind::Reference, calibrated.clone(), &config).unwrap();
    let mut reordered = 0;
    for (t, row) in expected.trace[..80].iter().enumerate() {
        let (x, y) = (observe(a.as_mut(), &plain, t, row), observe(b.as_mut(), &calibrated, t, row));
        assert_eq!(a.active(), b.active(), "token {t}: active lenses");
        assert_eq!(x.scored_ids, y.scored_ids, "token {t}: lenses scored");
        assert_eq!((x.children, x.loaded, x.unloaded), (y.children, y.loaded, y.unloaded), "token {t}");
        let names = |r: &TokenReport| r.top.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        reordered += usize::from(names(&x) != names(&y));
    }
    eprintln!("{reordered} of 80 reports ordered differently");
    assert!(reordered > 0, "the reported scores reorder some reports");
}

#[test]
fn the_runtime_and_the_oracle_report_concept_calibrated_scores_as_the_reference_does() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&concept_calibrated_pack(dir.path()), &dir.path().join("pack")).unwrap();
    let expected = numpy_reference(&python, &dir.path().join("ref"), false);
    let rows: Vec<&[f32]> = expected.trace[..60].iter().map(|r| &r[..]).collect();
    let config = decompose(CpuKernel::Auto, Mode::Exact);
    let mut reference = build_engine(EngineKind::Reference, pack.clone(), &config).unwrap();
    let mut runtime = BlockingCascade::start(pack.clone(), &config).unwrap();
    for (t, row) in rows.iter().enumerate() {
        let (w, r) = (observe(reference.as_mut(), &pack, t, row), observe(&mut runtime, &pack, t, row));
        // The reference backend's arithmetic is not the kernel's: scores agree closely, not
        // bit for bit (as in the runtime test above).
        let names = |x: &TokenReport| x.top.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&r), names(&w), "token {t}: reports");
        for (a, b) in r.top.iter().zip(&w.top) {
            assert!((a.prob - b.prob).abs() < 1e-4, "token {t}: {} {} vs {}", a.name, a.prob, b.prob);
        }
        let alerts = |x: &TokenReport| x.alerts.iter().map(|a| a.concept.clone()).collect::<Vec<_>>();
        assert_eq!(alerts(&r), alerts(&w), "token {t}: alerts");
    }
    let config = exhaustive(8, Vec::new());
    let all = OracleEngine::new(pack.clone(), &config).unwrap().score_all(0, &rows).unwrap();
    let mut runtime = BlockingCascade::start(pack.clone(), &config).unwrap();
    for (t, row) in rows.iter().enumerate() {
        let r = observe(&mut runtime, &pack, t, row);
        let want: Vec<u32> = all[t].iter().map(|s| s.prob.to_bits()).collect();
        assert_eq!(r.scored_probs.iter().map(|p| p.to_bits()).collect::<Vec<_>>(), want, "token {t}");
    }
}

#[test]
fn bad_concept_calibration_files_are_errors_naming_the_file_and_the_concept() {
    let cases: [(&str, &str); 4] = [
        (r#"{"calibration": {"Ghost_L0": {"self_mean": 0.9}}}"#, "\"Ghost_L0\""),
        (r#"{"calibration": {"Agent_L0": {"cross_mean": "high"}}}"#, "cross_mean"),
        (r#"{"calibration": {"Agent_L0": 0.5}}"#, "not an object"),
        (r#"{"concepts": {}}"#, "no \"calibration\" object"),
    ];
    for (text, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let src = copy_pack(dir.path(), false);
        std::fs::write(src.join("calibration.json"), text).unwrap();
        let m = import(&src, &dir.path().join("pack")).unwrap_err().to_string();
        assert!(m.contains("calibration.json") && m.contains(says), "{m}");
        assert!(!dir.path().join("pack/manifest.json").exists(), "nothing is written");
    }
}

#[test]
fn import_reads_complete_tripoles_and_names_the_simplexes_headspace_would_not_score() {
    let dir = tempfile::tempdir().unwrap();
    let src = simplex_pack(dir.path());
    let summary = import_headspace(&src, &dir.path().join("pack"), &ImportOptions::default(), |_, _, _| {}).unwrap();
    assert_eq!(summary.simplexes, vec!["Autonomy".to_string()]);
    let left_out = summary.simplexes_left_out.join("\n");
    assert!(left_out.contains("simplex Candor") && left_out.contains("Candor_negative_classifier.pt"), "{left_out}");
    assert!(left_out.contains("Old_tripole.pt") && left_out.contains("legacy"), "{left_out}");
    let text = summary.to_string();
    assert!(text.contains("simplex lenses (always on, 3 poles each): Autonomy"), "{text}");
    let pack = Pack::open(dir.path().join("pack")).unwrap();
    assert_eq!((pack.len(), pack.lens_probe_count(), pack.probe_count()), (8, 12, 15));
    let s = &pack.simplexes()[0];
    assert_eq!(s.name, "Autonomy");
    let poles: Vec<(&str, u32)> = s.poles.iter().map(|(p, id)| (p.as_str(), pack.probe(*id).model_layer)).collect();
    assert_eq!(poles, vec![("positive", 4), ("neutral", 4), ("negative", 4)]);
    assert_eq!(pack.probe_label(s.poles[2].1), "simplex Autonomy/negative (model layer 4)");
    assert!(pack.verify(|_| {}).is_empty());
}

/// Every token's simplex readings against numpy's: probability and deviation per pole.
fn check_simplex(r: &TokenReport, expected: &Expected, t: usize) {
    let names: Vec<String> = r.simplex.iter().map(|x| format!("{}/{}", x.simplex, x.pole)).collect();
    assert_eq!(names, ["Autonomy/positive", "Autonomy/neutral", "Autonomy/negative"], "token {t}");
    for x in &r.simplex {
        let want = &expected.simplex[&format!("{}/{}", x.simplex, x.pole)];
        assert!((x.prob as f64 - want.prob[t]).abs() < 1e-5, "token {t}: {} {} vs {}", x.pole, x.prob, want.prob[t]);
        match (x.deviation, want.deviation[t]) {
            (None, None) => assert!(t < 9, "token {t}: a deviation from the tenth score on"),
            (Some(d), Some(w)) => assert!((d as f64 - w).abs() < 1e-3, "token {t}: {} deviation {d} vs {w}", x.pole),
            (d, w) => panic!("token {t}: {} deviation {d:?} vs numpy {w:?}", x.pole),
        }
    }
}

#[test]
fn simplex_lenses_are_scored_every_token_apart_from_the_hierarchy_as_numpy_gives() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&simplex_pack(dir.path()), &dir.path().join("pack")).unwrap();
    let plain = import(&fixture().join("pack"), &dir.path().join("plain")).unwrap();
    let expected = numpy_reference_with(&python, &dir.path().join("ref"), &["--simplex"]);
    let config = decompose(CpuKernel::Auto, Mode::Exact);
    let mut engine = build_engine(EngineKind::Reference, pack.clone(), &config).unwrap();
    let mut without = build_engine(EngineKind::Reference, plain.clone(), &config).unwrap();
    let mut elevated = 0;
    for (t, row) in expected.trace.iter().enumerate() {
        let r = observe(engine.as_mut(), &pack, t, row);
        check_simplex(&r, &expected, t);
        elevated += r.simplex.iter().filter(|x| x.deviation.is_some_and(|d| d.abs() > 2.0)).count();
        // The hierarchy is the same as without the simplex: same lenses, scores and alerts.
        let w = observe(without.as_mut(), &plain, t, row);
        let entries = |x: &TokenReport| x.top.iter().map(|e| (e.name.clone(), e.prob.to_bits())).collect::<Vec<_>>();
        assert_eq!(entries(&r), entries(&w), "token {t}");
        assert_eq!(r.scored_ids, w.scored_ids, "token {t}");
        assert!(w.simplex.is_empty());
    }
    eprintln!("{elevated} pole readings over 2 standard deviations from their baseline");
    assert!(elevated > 0, "deviations vary");
}

#[test]
fn the_runtime_and_the_oracle_read_simplexes_as_the_reference_does_per_session() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pack = import(&simplex_pack(dir.path()), &dir.path().join("pack")).unwrap();
    let expected = numpy_reference_with(&python, &dir.path().join("ref"), &["--simplex"]);
    let rows: Vec<&[f32]> = expected.trace[..60].iter().map(|r| &r[..]).collect();
    let mut oracle = OracleEngine::new(pack.clone(), &exhaustive(8, Vec::new())).unwrap();
    let want: Vec<TokenReport> = rows.iter().enumerate().map(|(t, row)| observe(&mut oracle, &pack, t, row)).collect();
    for cpu_kernel in [CpuKernel::Auto, CpuKernel::Torch] {
        let mut runtime = BlockingCascade::start(pack.clone(), &decompose(cpu_kernel, Mode::Exact)).unwrap();
        for (t, row) in rows.iter().enumerate() {
            let r = observe(&mut runtime, &pack, t, row);
            check_simplex(&r, &expected, t);
            if cpu_kernel == CpuKernel::Auto {
                // The same kernel on the same states: the oracle's readings, bit for bit.
                let bits = |x: &TokenReport| x.simplex.iter().map(|s| s.logit.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&r), bits(&want[t]), "token {t}");
                assert_eq!(r.simplex, want[t].simplex, "token {t}");
            }
        }
    }
    // Baselines are per session: a session that starts later has none yet.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let runtime = Runtime::start(pack.clone(), &decompose(CpuKernel::Auto, Mode::Pipelined)).await.unwrap();
        let (a, b) = (futures_open(&runtime, 1).await.remove(0), futures_open(&runtime, 1).await.remove(0));
        let states = |t: usize| rows[t].chunks(pack.hidden_dim()).map(Hidden::from).collect::<Vec<_>>();
        for t in 0..12 {
            let r = a.observe_states(states(t)).await.unwrap();
            assert_eq!(r.simplex.len(), 3);
            assert_eq!(r.simplex[0].deviation.is_some(), t >= 9, "token {t}");
        }
        let r = b.observe_states(states(11)).await.unwrap();
        assert!(r.simplex.iter().all(|x| x.deviation.is_none()), "a new session starts its own baselines");
        a.close().await;
        b.close().await;
        runtime.shutdown().await;
    });
}
