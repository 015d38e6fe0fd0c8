//! On the demo pack and trace, under each shipped configuration, the naive engine (the seed's
//! cost model), the reference engine and the actor runtime in exact mode must give the same
//! reports; the runtime also the same active set after every token. The runtime scores with
//! the CPU kernel: its logits are within rounding of the reference's (libtorch) and bit for
//! bit the kernel's scalar model of each probe alone.

use std::path::Path;
use std::sync::Arc;

use probe_cascade::config::Config;
use probe_cascade::engine::{build_engine, prepare_hidden, EngineKind, TokenReport};
use probe_cascade::kernel::{reference_logit, ProbeRef};
use probe_cascade::npy::Matrix;
use probe_cascade::pack::{ConceptId, Pack, ProbeId};
use probe_cascade::runtime::Cascade;
use probe_cascade::synth::{concept_geometry, synth_trace, write_synth_pack, SynthParams, TraceParams};

fn run(kind: EngineKind, pack: &Arc<Pack>, config: &Config, trace: &Matrix) -> Vec<(TokenReport, Vec<ConceptId>)> {
    let mut engine = build_engine(kind, pack.clone(), config).unwrap();
    (0..trace.rows)
        .map(|t| {
            let r = engine.observe(t, trace.row(t)).unwrap();
            (r, engine.active())
        })
        .collect()
}

fn assert_same(
    name: &str,
    engine: &str,
    want: &[(TokenReport, Vec<ConceptId>)],
    got: &[(TokenReport, Vec<ConceptId>)],
) {
    let names = |x: &TokenReport| x.top.iter().map(|e| (e.name.clone(), e.layer)).collect::<Vec<_>>();
    for ((r, ra), (n, na)) in want.iter().zip(got) {
        let ctx = format!("{name}, {engine} vs reference, token {}", r.index);
        assert_eq!(names(r), names(n), "{ctx}: top lists");
        for (a, b) in r.top.iter().zip(&n.top) {
            assert!((a.logit - b.logit).abs() < 1e-3, "{ctx}: {} logit {} vs {}", a.name, a.logit, b.logit);
        }
        assert_eq!((r.children, r.loaded, r.unloaded, r.active), (n.children, n.loaded, n.unloaded, n.active), "{ctx}");
        assert_eq!(ra, na, "{ctx}: active sets");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_reference_and_runtime_agree_on_the_demo_trace() {
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
        assert_same(name, "naive", &reference, &naive);

        let cascade = Cascade::start(pack.clone(), &config).await.unwrap();
        let mut runtime = Vec::new();
        for t in 0..trace.rows {
            let r = cascade.observe(trace.row(t).to_vec()).await.unwrap();
            runtime.push((r, cascade.active().await.unwrap()));
        }
        let traffic = cascade.weight_traffic().await.unwrap();
        cascade.shutdown().await;
        assert_same(name, "runtime", &reference, &runtime);
        assert_kernel_bits(&pack, &config, &trace, &runtime);
        eprintln!("{name}: runtime weight traffic {traffic:?}");
        assert!(traffic.installs > 0 && traffic.moves > 0, "{name}: {traffic:?}");
        assert_eq!((traffic.install_bytes_copied, traffic.move_bytes_copied), (0, 0), "{name}: no weight copies");

        if name == "realtime" {
            pipelined_recall(&pack, &config, &trace, &runtime).await;
            busy_trace(&pack, &geometry, &config, &reference).await;
        }

        let total_children: usize = reference.iter().map(|(r, _)| r.children).sum();
        assert!(total_children > reference.len(), "{name}: only {total_children} children requested");
        for (r, _) in &reference {
            assert_eq!(r.top.len(), config.cascade.report_top_k.min(r.scored));
        }
    }
}

/// Each reported logit of the runtime is, bit for bit, the kernel's scalar model of that probe
/// scored alone on the token's (normalized) hidden state, whatever else was scored with it.
fn assert_kernel_bits(pack: &Arc<Pack>, config: &Config, trace: &Matrix, runtime: &[(TokenReport, Vec<ConceptId>)]) {
    let normalization = config.cascade.normalization_for(pack.input_normalization());
    let layout = pack.layout();
    let mut bytes = std::collections::HashMap::new();
    for (t, (report, _)) in runtime.iter().enumerate() {
        let x = prepare_hidden(t, trace.row(t), pack.hidden_dim(), normalization).unwrap();
        for e in &report.top {
            let b = bytes.entry(e.id).or_insert_with(|| pack.read_probe(ProbeId::sole(e.id)).unwrap());
            let ranges = layout.ranges(&pack.tensor_offsets(ProbeId::sole(e.id)));
            let want = reference_logit(&ProbeRef { bytes: b, ranges: &ranges }, layout.dtype, &x);
            assert_eq!(e.logit.to_bits(), want.to_bits(), "token {t} {}: runtime {} vs model {want}", e.name, e.logit);
        }
    }
}

/// The busy preset asks for children like the seed's own table (mean about 25, bursts of 60
/// and more; the demo trace asks for a handful), and the runtime still agrees with the
/// reference there, bit for bit with the kernel's model.
async fn busy_trace(
    pack: &Arc<Pack>,
    geometry: &[probe_cascade::synth::trace::ConceptGeometry],
    config: &Config,
    demo: &[(TokenReport, Vec<ConceptId>)],
) {
    let trace = synth_trace(pack, geometry, &TraceParams::busy());
    let reference = run(EngineKind::Reference, pack, config, &trace);
    let mean =
        |r: &[(TokenReport, Vec<ConceptId>)]| r.iter().map(|(t, _)| t.children).sum::<usize>() as f64 / r.len() as f64;
    let (busy, calm) = (mean(&reference), mean(demo));
    let bursts = reference.iter().filter(|(t, _)| t.children >= 60).count();
    eprintln!("children per token under seed top-30: busy {busy:.1} ({bursts} tokens of 60+), demo {calm:.1}");
    assert!((20.0..=32.0).contains(&busy), "busy trace: {busy:.1} children per token");
    assert!(bursts >= 5 && busy > 3.0 * calm, "busy trace: {bursts} bursts, {busy:.1} vs demo {calm:.1}");
    let cascade = Cascade::start(pack.clone(), config).await.unwrap();
    let mut runtime = Vec::new();
    for t in 0..trace.rows {
        let r = cascade.observe(trace.row(t).to_vec()).await.unwrap();
        runtime.push((r, cascade.active().await.unwrap()));
    }
    cascade.shutdown().await;
    assert_same("realtime, busy trace", "runtime", &reference, &runtime);
    assert_kernel_bits(pack, config, &trace, &runtime);
}

/// Pipelined mode reports from what is resident (in the pool or in RAM) when the token
/// arrives; children it asks for land while the caller computes the next token, modelled
/// here by `settle`. Its top-10 must recall at least 95% of exact mode's.
async fn pipelined_recall(pack: &Arc<Pack>, config: &Config, trace: &Matrix, exact: &[(TokenReport, Vec<ConceptId>)]) {
    let mut config = config.clone();
    config.runtime.mode = probe_cascade::config::Mode::Pipelined;
    config.runtime.latency_budget_us = 0;
    let cascade = Cascade::start(pack.clone(), &config).await.unwrap();
    let (mut found, mut wanted, mut in_flight) = (0, 0, 0);
    for (t, (want, _)) in exact.iter().enumerate() {
        let got = cascade.observe(trace.row(t).to_vec()).await.unwrap();
        in_flight += got.in_flight.len();
        cascade.settle().await.unwrap();
        let got: Vec<_> = got.top.iter().map(|e| (&e.name, e.layer)).collect();
        wanted += want.top.len();
        found += want.top.iter().filter(|e| got.contains(&(&e.name, e.layer))).count();
    }
    cascade.shutdown().await;
    let recall = found as f64 / wanted as f64;
    eprintln!("pipelined top-10 recall {recall:.3}, {in_flight} children reported in flight");
    assert!(in_flight > 0, "some children must have been in flight, or pipelining was not exercised");
    assert!(recall >= 0.95, "pipelined top-10 recall {recall:.3} < 0.95");
}
