//! The exhaustive oracle is the reference engine with every probe active, and the runtime in
//! the exhaustive expansion mode is the oracle bit for bit (both score on the CPU kernel).

mod common;

use std::sync::Arc;

use probe_cascade::config::{CascadeConfig, Config, Expansion, Pruning};
use probe_cascade::engine::oracle::OracleEngine;
use probe_cascade::engine::{build_engine, EngineKind, TokenReport};
use probe_cascade::fidelity::{of_reports, oracle_rows};
use probe_cascade::kernel::{reference_logit, ProbeRef};
use probe_cascade::pack::{ConceptId, Pack, ProbeId};
use probe_cascade::runtime::Cascade;
use probe_cascade::synth::{concept_geometry, synth_trace, TraceParams};

fn everything(pack: &Pack, expansion: Expansion) -> Config {
    let n = pack.len();
    let mut c = Config {
        cascade: CascadeConfig {
            base_layers: (0..pack.hierarchy().layer_count() as u16).collect(),
            expansion,
            pruning: Pruning::None,
            max_loaded: n,
            report_top_k: n,
            ..CascadeConfig::default()
        },
        ..Config::default()
    };
    c.device.threads = 2;
    c
}

fn by_id(r: &TokenReport) -> Vec<(ConceptId, f32)> {
    let mut v: Vec<(ConceptId, f32)> = r.top.iter().map(|e| (e.id, e.logit)).collect();
    v.sort_by_key(|x| x.0);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracle_is_the_reference_with_every_probe_active() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_pack(dir.path());
    let pack = Arc::new(Pack::open(dir.path()).unwrap());
    let geometry = concept_geometry(&pack, |_| {}).unwrap();
    let trace = synth_trace(&pack, &geometry, &TraceParams { tokens: 40, seed: 11, ..Default::default() });
    let n = pack.len();
    let config = everything(&pack, Expansion::Threshold { load_threshold: 0.3 });
    let mut oracle = build_engine(EngineKind::Oracle, pack.clone(), &config).unwrap();
    let mut reference = build_engine(EngineKind::Reference, pack.clone(), &config).unwrap();
    let layout = pack.layout();
    let bytes: Vec<Vec<u8>> = (0..n).map(|i| pack.read_probe(ProbeId(i as u32)).unwrap()).collect();
    let mut oracle_reports = Vec::new();
    for t in 0..trace.rows {
        let o = oracle.observe(t, trace.row(t)).unwrap();
        let r = reference.observe(t, trace.row(t)).unwrap();
        assert_eq!((o.scored, r.scored, o.scored_ids.len()), (n, n, n), "token {t}: every probe scored");
        assert_eq!(o.scored_ids, r.scored_ids, "token {t}");
        // The same concepts with the same logits (libtorch's rounding against the kernel's) …
        for ((a, la), (b, lb)) in by_id(&o).into_iter().zip(by_id(&r)) {
            assert_eq!(a, b, "token {t}");
            assert!((la - lb).abs() < 1e-4, "token {t} concept {a:?}: oracle {la} vs reference {lb}");
        }
        // … the same ten best, in order …
        let names = |x: &TokenReport| x.top.iter().take(10).map(|e| e.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&o), names(&r), "token {t}: top 10");
        // … and the oracle's logits are the kernel's scalar model of each probe, bit for bit.
        let x = probe_cascade::engine::prepare_hidden(
            t,
            trace.row(t),
            pack.hidden_dim(),
            config.cascade.normalization_for(pack.input_normalization()),
        )
        .unwrap();
        for e in o.top.iter().step_by(7) {
            let ranges = layout.ranges(&pack.tensor_offsets(ProbeId::sole(e.id)));
            let want = reference_logit(&ProbeRef { bytes: &bytes[e.id.index()], ranges: &ranges }, layout.dtype, &x);
            assert_eq!(e.logit.to_bits(), want.to_bits(), "token {t} {}", e.name);
        }
        oracle_reports.push(o);
    }

    // Batched scoring (up to 32 tokens a pass) gives the per-token bits.
    let engine = OracleEngine::new(pack.clone(), &config).unwrap();
    let rows = oracle_rows(&engine, &trace, trace.rows).unwrap();
    let f = of_reports(&rows, &oracle_reports);
    assert_eq!((f.tokens, f.recall_top10, f.rank_displacement), (trace.rows, 1.0, 0.0));
    assert!(f.recall_fired.is_none_or(|r| r == 1.0), "{f:?}");
    let hidden: Vec<&[f32]> = (0..trace.rows).map(|t| trace.row(t)).collect();
    let all = engine.score_all(0, &hidden).unwrap();
    for (t, o) in oracle_reports.iter().enumerate() {
        for e in &o.top {
            assert_eq!(
                all[t][e.id.index()].logit.to_bits(),
                e.logit.to_bits(),
                "token {t} {}: batched vs alone",
                e.name
            );
        }
    }

    // The runtime in the exhaustive mode (from the base layer alone) is the oracle exactly.
    let mut exhaustive = everything(&pack, Expansion::Exhaustive);
    exhaustive.cascade.base_layers = vec![0];
    let cascade = Cascade::start(pack.clone(), &exhaustive).await.unwrap();
    for (t, o) in oracle_reports.iter().enumerate() {
        let r = cascade.observe(trace.row(t).to_vec()).await.unwrap();
        let bits = |x: &TokenReport| x.top.iter().map(|e| (e.id, e.logit.to_bits())).collect::<Vec<_>>();
        assert_eq!(bits(&r), bits(o), "token {t}: exhaustive runtime vs oracle");
        assert_eq!(r.scored, n, "token {t}");
    }
    cascade.shutdown().await;

    // An exhaustive cascade that could not hold the pack is refused, naming the key.
    exhaustive.cascade.max_loaded = n - 1;
    exhaustive.runtime.pool_slots = n;
    let e = build_engine(EngineKind::Reference, pack.clone(), &exhaustive).err().unwrap().to_string();
    assert!(e.contains("cascade.max_loaded") && e.contains("exhaustive"), "{e}");
}
