//! A long run must not grow memory: thousands of tokens through the runtime (both modes, and
//! the tch backend's resident store) with a small cache, pool and store, checking the
//! process's resident memory after warm-up and at the end.

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
    for (mode, store) in [(Mode::Exact, false), (Mode::Pipelined, false), (Mode::Exact, true)] {
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
        let row = probe_cascade::runtime::scoring::torch::row_bytes(pack.hidden_dim(), tch::Kind::Float) as u64;
        if store {
            // The tch store with 14 rows for the pack (12 can be active): warm probes are
            // evicted and copied in again all run long.
            config.device.cpu_kernel = probe_cascade::config::CpuKernel::Torch;
            config.device.store_bytes = 14 * row;
            config.runtime.cache_bytes = 3 * pack.layout().byte_len() as u64;
        }
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
        if store {
            let st = cascade.weight_traffic().await.unwrap().store.expect("the tch backend's store");
            assert!(st.rows == 14 && st.resident <= st.rows && st.evictions > 0, "{st:?}");
        }
        cascade.shutdown().await;
        let growth_mb = (end as f64 - after_warmup as f64) / 1024.0;
        eprintln!("{mode:?} (store: {store}): RSS {after_warmup} kB after warm-up, {end} kB after 2500 tokens");
        assert!(growth_mb < 16.0, "{mode:?} (store: {store}): resident memory grew {growth_mb:.1} MB over 2000 tokens");
    }
}
