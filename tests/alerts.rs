//! Watch profiles and their alerts, through every engine: the reference engine, the oracle
//! and the actor runtime must raise the same alerts, and those must be what an independent
//! reading of the rules gives (every concept scored this token, under a watched concept
//! through any parent, with probability at or above the threshold), whatever the report's size.

mod common;

use std::collections::BTreeSet;

use probe_cascade::config::{CascadeConfig, Config, WatchProfile};
use probe_cascade::engine::oracle::OracleEngine;
use probe_cascade::engine::{build_engine, Engine, EngineKind, TokenReport};
use probe_cascade::pack::{ConceptId, Pack};
use probe_cascade::runtime::{Cascade, Runtime, RuntimeError, SessionOptions};

fn profile(name: &str, concepts: Vec<String>, threshold: Option<f32>) -> WatchProfile {
    WatchProfile { name: name.into(), concepts, file: None, threshold }
}

/// Two profiles over the first two base concepts' subtrees (one of them at any score), and a
/// report of one concept: most alerts are of concepts the report leaves out.
fn watched_config(pack: &Pack) -> Config {
    let h = pack.hierarchy();
    let base = h.layer_members(0);
    let name = |i: usize| h.name(ConceptId(base[i])).to_string();
    let mut c = Config::default();
    c.device.threads = 2;
    c.cascade = CascadeConfig {
        report_top_k: 1,
        watch: vec![
            profile("everything", vec![name(0)], Some(0.0)),
            profile("sure", vec![name(0), name(1)], Some(0.6)),
        ],
        ..CascadeConfig::default()
    };
    c
}

/// Whether `c` is `watched` or lies under it through any chain of parents.
fn under(pack: &Pack, c: ConceptId, watched: &BTreeSet<String>) -> bool {
    let h = pack.hierarchy();
    watched.contains(h.name(c)) || h.parents(c).iter().any(|&p| under(pack, ConceptId(p), watched))
}

/// The alerts the rules give for one token, from its scored set and the oracle's scores.
fn expected(pack: &Pack, config: &Config, report: &TokenReport, logits: &[f32]) -> Vec<(String, String, u16)> {
    let mut out = Vec::new();
    for w in &config.cascade.watch {
        let watched: BTreeSet<String> = w.concepts.iter().cloned().collect();
        for &c in &report.scored_ids {
            let p = 1.0 / (1.0 + (-logits[c.index()]).exp());
            if p >= w.threshold.unwrap() && under(pack, c, &watched) {
                out.push((w.name.clone(), pack.hierarchy().name(c).to_string(), pack.hierarchy().layer(c)));
            }
        }
    }
    out.sort();
    out
}

fn alerts_of(r: &TokenReport) -> Vec<(String, String, u16)> {
    let mut v: Vec<_> = r.alerts.iter().map(|a| (a.profile.clone(), a.concept.clone(), a.layer)).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_engine_raises_the_alerts_the_rules_give_whatever_the_report_size() {
    let f = common::streams(30);
    let config = watched_config(&f.pack);
    let mut reference = build_engine(EngineKind::Reference, f.pack.clone(), &config).unwrap();
    let mut oracle = OracleEngine::new(f.pack.clone(), &config).unwrap();
    let runtime = Cascade::start(f.pack.clone(), &config).await.unwrap();
    let (mut total, mut outside_report) = (0, 0);
    for trace in &f.traces[..2] {
        for t in 0..trace.rows {
            let want = reference.observe(t, trace.row(t)).unwrap();
            let got = runtime.observe(trace.row(t).to_vec()).await.unwrap();
            let scored = oracle.score_all(t, &[trace.row(t)]).unwrap().pop().unwrap();
            let logits: Vec<f32> = scored.iter().map(|s| s.logit).collect();
            let rules = expected(&f.pack, &config, &want, &logits);
            assert_eq!(got.scored_ids.len(), got.scored_logits.len());
            for (&c, &l) in got.scored_ids.iter().zip(&got.scored_logits) {
                assert!((l - logits[c.index()]).abs() < 1e-3, "token {t}: the report's logit of {c:?} is the oracle's");
            }
            assert_eq!(alerts_of(&want), rules, "token {t}: the reference's alerts are the rules'");
            assert_eq!(alerts_of(&got), rules, "token {t}: the runtime's alerts are the reference's");
            for (a, b) in got.alerts.iter().zip(&want.alerts) {
                assert_eq!((&a.profile, &a.concept, &a.watched), (&b.profile, &b.concept, &b.watched), "token {t}");
                assert!((a.score - b.score).abs() < 1e-5, "token {t}: {} {} vs {}", a.concept, a.score, b.score);
                assert!((a.score - 1.0 / (1.0 + (-a.logit).exp())).abs() < 1e-6, "the score is the probability");
            }
            // The oracle scores every probe: its alerts are a superset of the cascade's.
            let all = alerts_of(&oracle.observe(t, trace.row(t)).unwrap());
            assert!(rules.iter().all(|a| all.contains(a)), "token {t}: the oracle raises every alert the cascade does");
            // Each profile's alerts come best first.
            for w in ["everything", "sure"] {
                let scores: Vec<f32> = got.alerts.iter().filter(|a| a.profile == w).map(|a| a.logit).collect();
                assert!(scores.windows(2).all(|p| p[0] >= p[1]), "token {t}: {w} best first: {scores:?}");
            }
            let top: BTreeSet<&str> = got.top.iter().map(|e| e.name.as_str()).collect();
            total += got.alerts.len();
            outside_report += got.alerts.iter().filter(|a| !top.contains(a.concept.as_str())).count();
        }
    }
    runtime.shutdown().await;
    assert!(total > 0, "the profiles raise alerts");
    assert!(outside_report > 0, "alerts on concepts the one-concept report leaves out: {outside_report} of {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_naming_an_unknown_concept_is_refused_naming_it() {
    let f = common::streams(1);
    let mut config = watched_config(&f.pack);
    config.cascade.watch.push(profile("risk", vec!["Deception".into()], None));
    let m = build_engine(EngineKind::Reference, f.pack.clone(), &config).err().unwrap().to_string();
    assert!(m.contains("cascade.watch") && m.contains("\"risk\"") && m.contains("\"Deception\""), "{m}");
    let m = Runtime::start(f.pack.clone(), &config).await.err().unwrap().to_string();
    assert!(m.contains("\"Deception\""), "{m}");
    // A threshold outside [0, 1] names the key, before any pack is read.
    let text = "[[cascade.watch]]\nname = \"x\"\nconcepts = [\"A\"]\nthreshold = 1.5\n";
    let m = Config::parse(text, std::path::Path::new("w.toml")).unwrap_err().to_string();
    assert!(m.contains("w.toml") && m.contains("cascade.watch") && m.contains("1.5"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_sets_and_clears_its_own_profiles() {
    let f = common::streams(10);
    let mut config = watched_config(&f.pack);
    let profiles = std::mem::take(&mut config.cascade.watch);
    let rt = Runtime::start(f.pack.clone(), &config).await.unwrap();
    let plain = rt.open_session(SessionOptions::default()).await.unwrap();
    let cascade = CascadeConfig { watch: profiles.clone(), ..config.cascade.clone() };
    let watched = rt.open_session(SessionOptions { cascade: Some(cascade), ..Default::default() }).await.unwrap();
    let trace = &f.traces[0];
    let mut raised = 0;
    for t in 0..trace.rows {
        let a = plain.observe(trace.row(t).to_vec()).await.unwrap();
        let b = watched.observe(trace.row(t).to_vec()).await.unwrap();
        assert!(a.alerts.is_empty(), "a session without profiles raises no alert");
        assert_eq!(a.top, b.top, "profiles change no score");
        raised += b.alerts.len();
    }
    assert!(raised > 0);
    // Cleared live, from the next token on.
    rt.reconfigure(watched.id(), &SessionOptions { cascade: Some(config.cascade.clone()), ..Default::default() })
        .await
        .unwrap();
    assert!(watched.observe(trace.row(0).to_vec()).await.unwrap().alerts.is_empty());
    // An unknown concept in a session's profile is that session's error, naming it.
    let bad = CascadeConfig { watch: vec![profile("p", vec!["Nope".into()], None)], ..config.cascade.clone() };
    match rt.open_session(SessionOptions { cascade: Some(bad), ..Default::default() }).await {
        Err(e @ RuntimeError::Options(_)) => assert!(e.to_string().contains("\"Nope\""), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a profile naming no concept was accepted"),
    }
    plain.close().await;
    watched.close().await;
    rt.shutdown().await;
}
