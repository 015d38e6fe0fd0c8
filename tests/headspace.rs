//! headspace's trace format, written from real reports: the document's shape is what
//! headspace's `trace.record` writes and its viewer reads, fields are the layer-0 concepts'
//! probabilities from everything scored, and every parent walk by name ends (its viewer walks
//! them in a loop).

mod common;

use std::collections::BTreeSet;

use probe_cascade::config::Config;
use probe_cascade::engine::{build_engine, EngineKind};
use probe_cascade::headspace::{document, fields, TraceRun, TraceToken};

#[test]
fn a_trace_document_has_headspaces_shape_and_the_reports_scores() {
    let f = common::streams(12);
    let mut config = Config::default();
    config.device.threads = 2;
    let mut engine = build_engine(EngineKind::Reference, f.pack.clone(), &config).unwrap();
    let trace = &f.traces[1];
    let reports: Vec<_> = (0..trace.rows).map(|t| engine.observe(t, trace.row(t)).unwrap()).collect();
    let texts: Vec<String> = (0..reports.len()).map(|i| format!("w{i} ")).collect();
    let run = TraceRun {
        prompt: "a prompt".into(),
        title: Some("title".into()),
        note: None,
        seconds: Some(1.25),
        tokens: reports.iter().zip(&texts).map(|(report, text)| TraceToken { text, report }).collect(),
    };
    let doc = document(&f.pack, "demo", Some("model-x"), &[run], 3);
    let keys: BTreeSet<&str> = doc.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    let want: BTreeSet<&str> =
        ["created", "model", "pack", "total_lenses", "calibrated", "fields", "concepts", "runs"].into();
    assert_eq!(keys, want);
    assert_eq!((doc["model"].as_str(), doc["pack"].as_str()), (Some("model-x"), Some("demo")));
    assert_eq!(doc["total_lenses"].as_u64(), Some(f.pack.len() as u64));
    assert_eq!(doc["calibrated"].as_bool(), Some(false));

    // Fields: the layer-0 names, sorted; each token's field scores are the probabilities the
    // report holds for them (every layer-0 probe is scored every token under base_layers [0]).
    let h = f.pack.hierarchy();
    let names: Vec<String> = doc["fields"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(names.len(), h.layer_members(0).len());
    let ids = fields(&f.pack);
    let run = &doc["runs"][0];
    assert_eq!(
        (run["prompt"].as_str(), run["title"].as_str(), run["seconds"].as_f64()),
        (Some("a prompt"), Some("title"), Some(1.3))
    );
    for (t, (tok, r)) in run["tokens"].as_array().unwrap().iter().zip(&reports).enumerate() {
        assert_eq!(tok["t"].as_str(), Some(texts[t].as_str()));
        assert_eq!(tok["loaded"].as_u64(), Some(r.active as u64));
        for (i, (_, id)) in ids.iter().enumerate() {
            let at = r.scored_ids.binary_search(id).expect("a base probe is scored");
            let p = 1.0 / (1.0 + (-r.scored_logits[at] as f64).exp());
            assert!((tok["fields"][i].as_f64().unwrap() - p).abs() <= 5e-4 + 1e-6, "token {t} field {i}");
        }
        let top = tok["top"].as_array().unwrap();
        assert_eq!(top.len(), 3.min(r.top.len()));
        for (row, e) in top.iter().zip(&r.top) {
            assert_eq!(row[0].as_str(), Some(e.name.as_str()));
            assert!((row[1].as_f64().unwrap() - e.prob as f64).abs() <= 5e-4 + 1e-6);
            assert!(row[2].as_object().unwrap().is_empty(), "single-probe lenses: no per-layer scores");
        }
    }

    // Every concept's walk up `parent` by name ends, within the layer count.
    let concepts = doc["concepts"].as_object().unwrap();
    for name in h.ids().map(|c| h.name(c)) {
        let entry = &concepts[name];
        assert_eq!(entry["label"].as_str(), Some(name));
        let mut at = name.to_string();
        for step in 0..=h.layer_count() {
            match concepts[&at]["parent"].as_str() {
                Some(p) => at = p.to_string(),
                None => break,
            }
            assert!(step < h.layer_count(), "the walk from {name} does not end");
        }
    }
}
