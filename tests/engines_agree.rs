//! The naive engine (the seed's cost model) and the reference engine must give the same
//! reports on the demo pack and trace, under each of the three shipped configurations.

use std::path::Path;
use std::sync::Arc;

use probe_cascade::config::Config;
use probe_cascade::engine::{build_engine, EngineKind, TokenReport};
use probe_cascade::pack::Pack;
use probe_cascade::synth::{concept_geometry, synth_trace, write_synth_pack, SynthParams, TraceParams};

fn run(kind: EngineKind, pack: &Arc<Pack>, config: &Config, trace: &probe_cascade::npy::Matrix) -> Vec<TokenReport> {
    let mut engine = build_engine(kind, pack.clone(), config).unwrap();
    (0..trace.rows).map(|t| engine.observe(t, trace.row(t)).unwrap()).collect()
}

#[test]
fn naive_and_reference_agree_on_the_demo_trace() {
    let dir = tempfile::tempdir().unwrap();
    write_synth_pack(dir.path(), &SynthParams::demo(), |_| {}).unwrap();
    let pack = Arc::new(Pack::open(dir.path()).unwrap());
    let geometry = concept_geometry(&pack, |_| {}).unwrap();
    let trace = synth_trace(&pack, &geometry, &TraceParams::default());
    assert_eq!(trace.rows, 200);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["realtime", "offline", "decompose"] {
        let config = Config::load(&root.join(format!("config/{name}.toml"))).unwrap();
        let reference = run(EngineKind::Reference, &pack, &config, &trace);
        let naive = run(EngineKind::Naive, &pack, &config, &trace);
        let mut total_children = 0;
        for (r, n) in reference.iter().zip(&naive) {
            let ctx = format!("{name}, token {}", r.index);
            let names = |x: &TokenReport| x.top.iter().map(|e| (e.name.clone(), e.layer)).collect::<Vec<_>>();
            assert_eq!(names(r), names(n), "{ctx}: top lists");
            for (a, b) in r.top.iter().zip(&n.top) {
                assert!((a.logit - b.logit).abs() < 1e-3, "{ctx}: {} logit {} vs {}", a.name, a.logit, b.logit);
            }
            assert_eq!(
                (r.children, r.loaded, r.unloaded, r.active),
                (n.children, n.loaded, n.unloaded, n.active),
                "{ctx}"
            );
            assert_eq!(r.top.len(), config.cascade.report_top_k.min(r.scored), "{ctx}");
            total_children += r.children;
        }
        // The trace must exercise the cascade: children requested on most tokens.
        assert!(total_children > reference.len(), "{name}: only {total_children} children requested");
    }
}
