//! `bench --sessions 1,2,4,8,16`: N streams on one shared runtime, every session running its
//! tokens back to back, all at once (the load of a daemon serving N busy streams), and N = 8
//! separate `Cascade`s side by side in the same run. Session i starts at token i·(T/N) of the
//! trace and wraps around, so the streams are at different places in it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use probe_cascade::config::Config;
use probe_cascade::engine::percentile;
use probe_cascade::engine::TokenReport;
use probe_cascade::npy::Matrix;
use probe_cascade::pack::Pack;
use probe_cascade::runtime::{Cascade, Runtime, RuntimeError, SessionOptions, StepStats};
use serde_json::json;

/// What one stream did: each token's wall time from the end of the one before.
type Times = Vec<f64>;

/// Runs `streams` streams at once, `tokens` tokens each, stream i starting at token
/// `i·stride + from` of the trace (wrapping around); `observe(i, hidden)` observes one of
/// stream i's tokens. Returns each stream's per-token times and the wall time of the whole.
async fn all_at_once<F, Fut>(
    trace: &Matrix,
    streams: usize,
    from: usize,
    tokens: usize,
    observe: F,
) -> anyhow::Result<(Vec<Times>, Duration)>
where
    F: Fn(usize, Vec<f32>) -> Fut,
    Fut: std::future::Future<Output = Result<TokenReport, RuntimeError>> + Send + 'static,
{
    let stride = trace.rows / streams;
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let futures: Vec<Fut> =
                (0..tokens).map(|t| observe(i, trace.row((i * stride + from + t) % trace.rows).to_vec())).collect();
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(futures.len());
                let mut last = Instant::now();
                for f in futures {
                    f.await?;
                    let now = Instant::now();
                    times.push((now - last).as_secs_f64() * 1e3);
                    last = now;
                }
                Ok::<_, RuntimeError>(times)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(streams);
    for t in tasks {
        out.push(t.await.map_err(|e| anyhow::anyhow!("a stream's task failed: {e}"))??);
    }
    Ok((out, start.elapsed()))
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[allow(clippy::too_many_arguments)]
fn row(
    config: &str,
    engine: &str,
    sessions: usize,
    times: &[Times],
    wall: Duration,
    steps: Option<(&StepStats, &StepStats)>,
    ram_bytes: u64,
    cache_budget: u64,
) -> serde_json::Value {
    let mut all: Vec<f64> = times.iter().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    let tokens = all.len();
    let steps = steps.map(|(before, after)| {
        let n = (after.steps - before.steps).max(1) as f64;
        let kernel_s = (after.kernel_ns - before.kernel_ns) as f64 * 1e-9;
        json!({
            "steps": after.steps - before.steps,
            "union_probes_per_step": (after.union_probes - before.union_probes) as f64 / n,
            "requests_per_step": (after.requests - before.requests) as f64 / n,
            "logits_per_step": (after.logits - before.logits) as f64 / n,
            "kernel_ms_per_step": kernel_s * 1e3 / n,
            "kernel_share_of_wall": kernel_s / wall.as_secs_f64().max(1e-9),
            "kernel_read_gb_per_s": (after.bytes_scored - before.bytes_scored) as f64 / kernel_s.max(1e-9) / 1e9,
        })
    });
    let get = |k: &str| steps.as_ref().map(|s| s[k].clone()).unwrap_or(serde_json::Value::Null);
    json!({
        "config": config,
        "engine": engine,
        "sessions": sessions,
        "tokens": tokens,
        "wall_s": wall.as_secs_f64(),
        "tokens_per_s": tokens as f64 / wall.as_secs_f64().max(1e-9),
        "p50_ms": percentile(&all, 50.0),
        "p95_ms": percentile(&all, 95.0),
        "union_probes_per_step": get("union_probes_per_step"),
        "requests_per_step": get("requests_per_step"),
        "logits_per_step": get("logits_per_step"),
        "kernel_ms_per_step": get("kernel_ms_per_step"),
        "kernel_share_of_wall": get("kernel_share_of_wall"),
        "kernel_read_gb_per_s": get("kernel_read_gb_per_s"),
        "ram_bytes": ram_bytes,
        "cache_budget_bytes": cache_budget,
        // The CPU kernel scores in place in the cache: no device arena.
        "arena_bytes": 0,
        "rss_bytes": rss_bytes(),
    })
}

/// The sessions rows for one config: one per count, and 8 separate cascades.
pub fn bench(
    pack: &Arc<Pack>,
    name: &str,
    config: &Config,
    trace: &Matrix,
    warmup: usize,
    tokens: usize,
    counts: &[u32],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut rows = Vec::new();
    for &n in counts {
        let n = n as usize;
        let mut config = config.clone();
        config.runtime.max_sessions = config.runtime.max_sessions.max(n);
        let r = rt.block_on(async {
            let runtime = Runtime::start(pack.clone(), &config).await?;
            let mut sessions = Vec::with_capacity(n);
            for _ in 0..n {
                sessions.push(Arc::new(runtime.open_session(SessionOptions::default()).await?));
            }
            let observe = |i: usize, h: Vec<f32>| {
                let s = sessions[i].clone();
                let states = probe_cascade::engine::token_states(&h, pack);
                async move { s.observe_states(states).await }
            };
            // Warm-up, then the measured tokens (step stats taken in between).
            all_at_once(trace, n, 0, warmup, observe).await?;
            let before = runtime.step_stats().await?;
            let (times, wall) = all_at_once(trace, n, warmup, tokens, observe).await?;
            let after = runtime.step_stats().await?;
            let ram = runtime.cache_stats().await?.resident_bytes;
            drop(sessions);
            runtime.shutdown().await;
            Ok::<_, anyhow::Error>(row(
                name,
                "runtime-sessions",
                n,
                &times,
                wall,
                Some((&before, &after)),
                ram,
                config.runtime.cache_bytes,
            ))
        })?;
        eprintln!(
            "sessions {n}: {:.0} tokens/s, p50 {:.2} ms",
            r["tokens_per_s"].as_f64().unwrap_or(0.0),
            r["p50_ms"].as_f64().unwrap_or(0.0)
        );
        rows.push(r);
    }
    // The alternative a user has without sessions: one cascade (cache, arena, inference
    // thread) per stream.
    let n = 8;
    let r = rt.block_on(async {
        let mut cascades = Vec::with_capacity(n);
        for _ in 0..n {
            cascades.push(Arc::new(Cascade::start(pack.clone(), config).await?));
        }
        let observe = |i: usize, h: Vec<f32>| {
            let c = cascades[i].clone();
            let states = probe_cascade::engine::token_states(&h, pack);
            async move { c.observe_states(states).await }
        };
        all_at_once(trace, n, 0, warmup, observe).await?;
        let (times, wall) = all_at_once(trace, n, warmup, tokens, observe).await?;
        let mut ram = 0;
        for c in &cascades {
            ram += c.cache_stats().await?.resident_bytes;
        }
        for c in &cascades {
            c.shutdown().await;
        }
        Ok::<_, anyhow::Error>(row(
            name,
            "separate-cascades",
            n,
            &times,
            wall,
            None,
            ram,
            config.runtime.cache_bytes * n as u64,
        ))
    })?;
    rows.push(r);
    Ok(rows)
}

/// The bench.md section.
pub fn table(rows: &[serde_json::Value]) -> String {
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let mut md = String::from(
        "## Sessions: many streams on one runtime\n\n\
         Every stream runs its tokens back to back, all streams at once; session i starts at token i·(T/N) of the trace. \
         `separate-cascades` is N `Cascade`s (a cache and a step scheduler each) in the same process.\n\n\
         | config | engine | sessions | tokens/s | p50 ms | p95 ms | union probes/step | requests/step | logits/step | kernel ms/step | kernel share | kernel GB/s | weights in RAM MB | RSS MB |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let opt = |k: &str| r[k].as_f64().map_or("-".to_string(), |v| format!("{v:.1}"));
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} |\n",
            r["config"].as_str().unwrap_or(""),
            r["engine"].as_str().unwrap_or(""),
            r["sessions"],
            f(r, "tokens_per_s"),
            f(r, "p50_ms"),
            f(r, "p95_ms"),
            opt("union_probes_per_step"),
            opt("requests_per_step"),
            opt("logits_per_step"),
            r["kernel_ms_per_step"].as_f64().map_or("-".to_string(), |v| format!("{v:.2}")),
            r["kernel_share_of_wall"].as_f64().map_or("-".to_string(), |v| format!("{:.0}%", v * 100.0)),
            opt("kernel_read_gb_per_s"),
            f(r, "ram_bytes") / 1e6,
            f(r, "rss_bytes") / 1e6,
        ));
    }
    md.push('\n');
    md
}
