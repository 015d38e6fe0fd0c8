//! A long run must not grow memory: thousands of tokens through the runtime (both modes) with
//! a small cache and pool, checking the process's resident memory after warm-up and at the end.

mod common;

use std::sync::Arc;

use probe_cascade::config::{CascadeConfig, Config, Mode, Pruning};
use probe_cascade::pack::Pack;
use probe_cascade::runtime::Cascade;
use probe_cascade::synth::{concept_geometry, synth_trace, TraceParams};

fn rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_over_a_long_run() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_pack(dir.path());
    let pack = Arc::new(Pack::open(dir.path()).unwrap());
    let geometry = concept_geometry(&pack, |_| {}).unwrap();
    let trace = synth_trace(&pack, &geometry, &TraceParams { tokens: 100, seed: 9, ..Default::default() });
    for mode in [Mode::Exact, Mode::Pipelined] {
        let mut config = Config {
            cascade: CascadeConfig {
                pruning: Pruning::TopK { keep_top_k: 8 },
                max_loaded: 12,
                ..CascadeConfig::default()
            },
            ..Config::default()
        };
        config.runtime.mode = mode;
        config.runtime.pool_slots = 16;
        // As small as the CPU kernel allows: the twelve probes that may be active at once.
        config.runtime.cache_bytes = 12 * pack.layout().byte_len() as u64;
        let cascade = Cascade::start(pack.clone(), &config).await.unwrap();
        let mut after_warmup = 0;
        for t in 0..2500 {
            cascade.observe(trace.row(t % trace.rows).to_vec()).await.unwrap();
            if mode == Mode::Pipelined {
                cascade.settle().await.unwrap();
            }
            if t == 500 {
                after_warmup = rss_kb();
            }
        }
        let end = rss_kb();
        let stats = cascade.cache_stats().await.unwrap();
        assert!(stats.resident_bytes <= config.runtime.cache_bytes, "{stats:?}");
        assert!(stats.evictions > 0, "the small cache must have been churned: {stats:?}");
        cascade.shutdown().await;
        let growth_mb = (end as f64 - after_warmup as f64) / 1024.0;
        eprintln!("{mode:?}: RSS {after_warmup} kB after warm-up, {end} kB after 2500 tokens");
        assert!(growth_mb < 16.0, "{mode:?}: resident memory grew {growth_mb:.1} MB over 2000 tokens");
    }
}
