//! How `bench` and `tune` measure: tokens back to back or settled, the process's CPU time,
//! the page cache, and the process's peak memory.

use std::sync::Arc;
use std::time::Instant;

use probe_cascade::config::{Config, Normalization};
use probe_cascade::engine::TokenReport;
use probe_cascade::fidelity::OracleToken;
use probe_cascade::npy::Matrix;
use probe_cascade::pack::Pack;
use probe_cascade::runtime::BlockingCascade;

/// Tokens one after another with no untimed gap. On a CPU the gap between tokens is the
/// language model computing on the same cores, so work an engine defers to it is not free:
/// here it lands inside the next token's time (and the last token's deferred work is waited
/// for and counted). `ms`: each token's wall time from the end of the one before; `cpu_ms`:
/// the whole process's CPU time (user + system) per token.
pub struct BackToBack {
    pub ms: Vec<f64>,
    pub cpu_ms: f64,
}

pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

pub fn back_to_back(
    warmup: usize,
    tokens: usize,
    mut observe: impl FnMut(usize) -> anyhow::Result<()>,
    mut finish: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<BackToBack> {
    for t in 0..warmup {
        observe(t)?;
    }
    finish()?;
    let cpu = process_cpu_seconds();
    let mut ms = Vec::with_capacity(tokens);
    let mut last = Instant::now();
    for t in warmup..warmup + tokens {
        observe(t)?;
        let now = Instant::now();
        ms.push((now - last).as_secs_f64() * 1e3);
        last = now;
    }
    finish()?;
    if let Some(end) = ms.last_mut() {
        *end += last.elapsed().as_secs_f64() * 1e3;
    }
    Ok(BackToBack { ms, cpu_ms: (process_cpu_seconds() - cpu) * 1e3 / tokens.max(1) as f64 })
}

pub fn drop_page_cache(pack: &Pack) {
    for shard in pack.shards() {
        if let Ok(f) = std::fs::File::open(&shard.path) {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid open fd; DONTNEED only drops clean cached pages.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

pub fn warm_page_cache(pack: &Pack) -> std::io::Result<()> {
    for shard in pack.shards() {
        std::io::copy(&mut std::fs::File::open(&shard.path)?, &mut std::io::sink())?;
    }
    Ok(())
}

/// One run of the actor runtime over the measured tokens.
pub struct RuntimeRun {
    /// The measured tokens' reports.
    pub reports: Vec<TokenReport>,
    /// Settled: each report's own time. Back to back: see [`BackToBack`].
    pub ms: Vec<f64>,
    pub cpu_ms: f64,
    pub cache_hit_rate: f64,
    /// Bytes the runtime read from the pack over the measured tokens.
    pub bytes_read: u64,
}

/// Runs a fresh runtime over `warmup + tokens` tokens (the trace replayed from its start).
/// `settled`: the runtime's deferred work (loads, pruning's copies) finishes between tokens,
/// untimed, as if the caller's generation step gave it time; otherwise back to back.
pub fn runtime_run(
    pack: &Arc<Pack>,
    config: &Config,
    trace: &Matrix,
    warmup: usize,
    tokens: usize,
    settled: bool,
) -> anyhow::Result<RuntimeRun> {
    let engine = BlockingCascade::start(pack.clone(), config)?;
    let cascade = engine.cascade().clone();
    let mut reports = Vec::with_capacity(tokens);
    let mut before = None;
    let b2b = back_to_back(
        warmup,
        tokens,
        |t| {
            if t == warmup {
                before = Some(engine.block_on(cascade.cache_stats())?);
            }
            let states = probe_cascade::engine::token_states(trace.row(t % trace.rows), pack);
            let r = engine.block_on(cascade.observe_states(states))?;
            if settled {
                engine.block_on(cascade.settle())?;
            }
            if t >= warmup {
                reports.push(r);
            }
            Ok(())
        },
        || Ok(engine.block_on(cascade.settle())?),
    )?;
    let after = engine.block_on(cascade.cache_stats())?;
    let before = before.unwrap_or_default();
    let lookups = (after.hits + after.misses).saturating_sub(before.hits + before.misses);
    let hits = after.hits.saturating_sub(before.hits);
    let ms = if settled { reports.iter().map(|r| r.elapsed.as_secs_f64() * 1e3).collect() } else { b2b.ms };
    Ok(RuntimeRun {
        reports,
        ms,
        cpu_ms: b2b.cpu_ms,
        cache_hit_rate: if lookups == 0 { 1.0 } else { hits as f64 / lookups as f64 },
        bytes_read: after.bytes_read.saturating_sub(before.bytes_read),
    })
}

/// Starts a new peak for [`peak_rss_bytes`] (Linux: `clear_refs` 5) from the memory in use now. False where the kernel
/// does not allow it: the peak is then the process's since it started.
pub fn reset_peak_rss() -> bool {
    // Free heap memory that earlier runs left with the allocator would otherwise count as
    // this run's resident memory.
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe { libc::malloc_trim(0) };
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident memory (VmHWM) since it started or since [`reset_peak_rss`].
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The exhaustive oracle's view of a trace for each input normalization among some configs:
/// the oracle's scores depend on nothing else in a config, so each is scored once (its weights
/// freed as soon as it is).
pub struct Oracles(Vec<(Normalization, Vec<OracleToken>)>);

impl Oracles {
    /// Scores trace rows `0..rows` once per distinct normalization of `configs`.
    pub fn score<'a>(
        pack: &Arc<Pack>,
        configs: impl IntoIterator<Item = &'a Config>,
        trace: &Matrix,
        rows: usize,
    ) -> anyhow::Result<Self> {
        let mut by_input: Vec<(Normalization, Vec<OracleToken>)> = Vec::new();
        for config in configs {
            let n = config.cascade.normalization_for(pack.input_normalization());
            if !by_input.iter().any(|(m, _)| *m == n) {
                tracing::info!("the oracle: every probe of the pack on {} tokens ({n:?} input)", rows.min(trace.rows));
                let oracle = probe_cascade::engine::oracle::OracleEngine::new(pack.clone(), config)?;
                by_input.push((n, probe_cascade::fidelity::oracle_rows(&oracle, trace, rows)?));
            }
        }
        Ok(Self(by_input))
    }

    /// None scored (`--oracle` not given).
    pub fn none() -> Self {
        Self(Vec::new())
    }

    /// The rows for `config`'s input normalization, if it was among those scored.
    pub fn of(&self, pack: &Pack, config: &Config) -> Option<&[OracleToken]> {
        let n = config.cascade.normalization_for(pack.input_normalization());
        self.0.iter().find(|(m, _)| *m == n).map(|(_, rows)| &rows[..])
    }
}
