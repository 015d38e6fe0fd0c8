//! `probe-cascade soak`: many sessions on one runtime for a long run, sampling what a leak
//! would grow (resident memory, open files, threads, cache and slot occupancy) as it goes.
//! Writes soak.csv, soak.md and a plot (PNG and SVG); `--check` fails the command when any
//! series is not flat after the warm-up.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use plotters::prelude::*;
use probe_cascade::config::Config;
use probe_cascade::engine::percentile;
use probe_cascade::pack::Pack;
use probe_cascade::runtime::{Runtime, SessionOptions};

#[derive(clap::Args)]
pub struct SoakArgs {
    #[arg(long)]
    pack: PathBuf,
    /// T×D float32 .npy of hidden states, replayed as often as the run needs (T×(L·D), the
    /// layers side by side, for a pack whose probes read L model layers).
    #[arg(long)]
    trace: PathBuf,
    /// Tokens in all, shared among the sessions.
    #[arg(long, default_value_t = 1_000_000)]
    tokens: u64,
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    sessions: u32,
    #[arg(long)]
    out: PathBuf,
    /// The runtime's config (default: config/realtime.toml as shipped).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Samples over the run.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    samples: u32,
    /// Share of the run before flatness is judged.
    #[arg(long, default_value_t = 0.2)]
    warmup: f64,
    /// A series is flat when its spread after the warm-up, max − min, is at most this share
    /// of its median.
    #[arg(long, default_value_t = 0.05)]
    tolerance: f64,
    /// Exit 1 when a series is not flat.
    #[arg(long)]
    check: bool,
}

/// Per-token latencies kept between two samples, for the interval's p50 and p99.
const LATENCIES_PER_INTERVAL: usize = 100_000;

/// One sample: the process and the runtime after `tokens` tokens.
#[derive(Debug, Clone, Default)]
struct Sample {
    tokens: u64,
    seconds: f64,
    rss_mb: f64,
    fds: f64,
    threads: f64,
    cache_mb: f64,
    cache_entries: f64,
    held_probes: f64,
    sessions: f64,
    tokens_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The series judged for flatness, by column name. Throughput and latency are reported, not
/// judged (they move with the machine's other load), and so is `held_probes`, which follows the
/// text (the union of the sessions' active sets): it is judged against its bound instead.
const JUDGED: [&str; 6] = ["rss_mb", "fds", "threads", "cache_mb", "cache_entries", "sessions"];
const COLUMNS: [&str; 12] = [
    "tokens",
    "seconds",
    "rss_mb",
    "fds",
    "threads",
    "cache_mb",
    "cache_entries",
    "held_probes",
    "sessions",
    "tokens_per_s",
    "p50_ms",
    "p99_ms",
];

impl Sample {
    fn get(&self, column: &str) -> f64 {
        match column {
            "tokens" => self.tokens as f64,
            "seconds" => self.seconds,
            "rss_mb" => self.rss_mb,
            "fds" => self.fds,
            "threads" => self.threads,
            "cache_mb" => self.cache_mb,
            "cache_entries" => self.cache_entries,
            "held_probes" => self.held_probes,
            "sessions" => self.sessions,
            "tokens_per_s" => self.tokens_per_s,
            "p50_ms" => self.p50_ms,
            "p99_ms" => self.p99_ms,
            _ => f64::NAN,
        }
    }
}

/// The process's resident memory and threads (`/proc/self/status`) and open descriptors.
fn process_now() -> (f64, f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let fds = std::fs::read_dir("/proc/self/fd").map_or(f64::NAN, |d| d.count() as f64);
    (field("VmRSS:") / 1024.0, fds, field("Threads:"))
}

/// A series' flatness after the warm-up.
struct Verdict {
    column: &'static str,
    /// What `flat` means for this series.
    rule: String,
    at_warmup: f64,
    min: f64,
    max: f64,
    last: f64,
    spread: f64,
    flat: bool,
}

/// `held_bound`: the most probes the sessions' slots can hold (sessions × max_loaded).
fn judge(samples: &[Sample], warmup: f64, tolerance: f64, held_bound: f64) -> Vec<Verdict> {
    let first = ((samples.len() as f64 * warmup).ceil() as usize).min(samples.len().saturating_sub(1));
    let after = &samples[first..];
    let mut verdicts: Vec<Verdict> = JUDGED
        .iter()
        .map(|&column| {
            let mut v: Vec<f64> = after.iter().map(|s| s.get(column)).collect();
            v.sort_by(f64::total_cmp);
            let (min, max) = (v.first().copied().unwrap_or(0.0), v.last().copied().unwrap_or(0.0));
            let median = percentile(&v, 50.0);
            let spread = if median == 0.0 {
                if max == min {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                (max - min) / median
            };
            Verdict {
                column,
                rule: format!("spread ≤ {:.0}%", tolerance * 100.0),
                at_warmup: after.first().map_or(0.0, |s| s.get(column)),
                min,
                max,
                last: after.last().map_or(0.0, |s| s.get(column)),
                spread,
                flat: spread <= tolerance,
            }
        })
        .collect();
    let held: Vec<f64> = after.iter().map(|s| s.held_probes).collect();
    let (min, max) = held.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let median = {
        let mut v = held.clone();
        v.sort_by(f64::total_cmp);
        percentile(&v, 50.0)
    };
    verdicts.push(Verdict {
        column: "held_probes",
        rule: format!("≤ {held_bound:.0} (sessions × max_loaded)"),
        at_warmup: held.first().copied().unwrap_or(0.0),
        min: if held.is_empty() { 0.0 } else { min },
        max,
        last: held.last().copied().unwrap_or(0.0),
        spread: if median > 0.0 { (max - min) / median } else { 0.0 },
        flat: max <= held_bound,
    });
    verdicts
}

pub fn run(args: SoakArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.tokens >= u64::from(args.samples), "--tokens must be at least --samples");
    anyhow::ensure!((0.0..1.0).contains(&args.warmup), "--warmup is a share of the run, in [0, 1)");
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => {
            Config::parse(include_str!("../../../config/realtime.toml"), std::path::Path::new("config/realtime.toml"))?
        }
    };
    let pack = Arc::new(Pack::open(&args.pack).with_context(|| format!("opening pack {}", args.pack.display()))?);
    let trace = Arc::new(probe_cascade::npy::read(&args.trace)?);
    anyhow::ensure!(trace.rows > 0, "the trace {} has no tokens", args.trace.display());
    let trace_rows = trace.rows;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (samples, errors, wall, closed) = rt.block_on(soak(&args, pack.clone(), &config, trace))?;
    let held_bound = f64::from(args.sessions) * config.cascade.max_loaded as f64;
    let verdicts = judge(&samples, args.warmup, args.tolerance, held_bound);
    write_outputs(&args, &pack, trace_rows, &samples, &verdicts, errors, wall, &closed)?;
    let bad: Vec<&Verdict> = verdicts.iter().filter(|v| !v.flat).collect();
    println!(
        "{} tokens in {:.1} s ({:.0} tokens/s), {} sessions, {errors} errors; {}",
        args.tokens,
        wall.as_secs_f64(),
        args.tokens as f64 / wall.as_secs_f64().max(1e-9),
        args.sessions,
        if bad.is_empty() {
            format!("every series flat within {:.0}% after the warm-up, slots within bounds", args.tolerance * 100.0)
        } else {
            let names: Vec<String> = bad.iter().map(|v| format!("{} ({:.1}%)", v.column, v.spread * 100.0)).collect();
            format!("not flat: {}", names.join(", "))
        }
    );
    println!(
        "after every session closed: {} sessions open, {} holding slots, {} probes held{}",
        closed.open,
        closed.sessions,
        closed.held_probes,
        if closed.clean() { "" } else { ": a leak" }
    );
    println!("wrote {}", args.out.join("soak.md").display());
    let failed = (args.check && !bad.is_empty()) || errors > 0 || !closed.clean();
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

async fn soak(
    args: &SoakArgs,
    pack: Arc<Pack>,
    config: &Config,
    trace: Arc<probe_cascade::npy::Matrix>,
) -> anyhow::Result<(Vec<Sample>, u64, Duration, Closed)> {
    let runtime = Runtime::start(pack.clone(), config).await?;
    let n = args.sessions as u64;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    // Sessions stay open after their last token until the last sample is taken.
    let (release, released) = tokio::sync::watch::channel(false);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let session = runtime.open_session(SessionOptions::default()).await?;
        let share = args.tokens / n + u64::from(i < args.tokens % n);
        let (trace, done, errors, latencies) = (trace.clone(), done.clone(), errors.clone(), latencies.clone());
        let pack = pack.clone();
        let mut released = released.clone();
        // Sessions start at spread-out rows, so that they want different probes.
        let offset = i as usize * trace.rows / n as usize;
        tasks.push(tokio::spawn(async move {
            for t in 0..share as usize {
                let t0 = Instant::now();
                let states = probe_cascade::engine::token_states(trace.row((offset + t) % trace.rows), &pack);
                if let Err(e) = session.observe_states(states).await {
                    if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        tracing::error!("session {i}, token {t}: {e}");
                    }
                }
                let mut lat = latencies.lock().expect("latency lock");
                // Bounded however long the interval: its first LATENCIES_PER_INTERVAL tokens.
                if lat.len() < LATENCIES_PER_INTERVAL {
                    lat.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                drop(lat);
                done.fetch_add(1, Ordering::Relaxed);
            }
            let _ = released.wait_for(|go| *go).await;
            session.close().await;
        }));
    }
    let progress = super::progress::bar(args.samples as usize, "soak");
    let mut samples = Vec::with_capacity(args.samples as usize);
    let (mut last_tokens, mut last_time) = (0u64, start);
    for k in 1..=u64::from(args.samples) {
        let target = args.tokens * k / u64::from(args.samples);
        while done.load(Ordering::Relaxed) < target && tasks.iter().any(|t| !t.is_finished()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let tokens = done.load(Ordering::Relaxed);
        let now = Instant::now();
        let mut lat = std::mem::take(&mut *latencies.lock().expect("latency lock"));
        lat.sort_by(f64::total_cmp);
        let cache = runtime.cache_stats().await?;
        let steps = runtime.step_stats().await?;
        let (rss_mb, fds, threads) = process_now();
        samples.push(Sample {
            tokens,
            seconds: (now - start).as_secs_f64(),
            rss_mb,
            fds,
            threads,
            cache_mb: cache.resident_bytes as f64 / 1e6,
            cache_entries: cache.entries as f64,
            held_probes: steps.held_probes as f64,
            sessions: steps.sessions as f64,
            tokens_per_s: (tokens - last_tokens) as f64 / (now - last_time).as_secs_f64().max(1e-9),
            p50_ms: percentile(&lat, 50.0),
            p99_ms: percentile(&lat, 99.0),
        });
        (last_tokens, last_time) = (tokens, now);
        progress.inc(1);
    }
    progress.finish_and_clear();
    let wall = start.elapsed();
    let _ = release.send(true);
    for t in tasks {
        t.await?;
    }
    // With every session closed, what they held must be back to nothing.
    let steps = runtime.step_stats().await?;
    let closed = Closed { sessions: steps.sessions, held_probes: steps.held_probes, open: runtime.sessions().len() };
    runtime.shutdown().await;
    Ok((samples, errors.load(Ordering::Relaxed), wall, closed))
}

/// What the runtime holds once every session has closed (all zero when nothing leaked).
struct Closed {
    sessions: usize,
    held_probes: usize,
    open: usize,
}

impl Closed {
    fn clean(&self) -> bool {
        self.sessions == 0 && self.held_probes == 0 && self.open == 0
    }
}

#[allow(clippy::too_many_arguments)]
fn write_outputs(
    args: &SoakArgs,
    pack: &Pack,
    trace_rows: usize,
    samples: &[Sample],
    verdicts: &[Verdict],
    errors: u64,
    wall: Duration,
    closed: &Closed,
) -> anyhow::Result<()> {
    let mut csv = COLUMNS.join(",") + "\n";
    for s in samples {
        let row: Vec<String> = COLUMNS.iter().map(|c| format!("{}", s.get(c))).collect();
        csv.push_str(&(row.join(",") + "\n"));
    }
    std::fs::write(args.out.join("soak.csv"), csv)?;

    let cpu = probe_cascade::kernel::CpuInfo::detect();
    let mut md = format!(
        "# probe-cascade soak\n\nMachine: {cpu}. Pack: {} ({} concepts, D={}, {}). Trace: {} ({} rows, replayed). {} tokens over {} sessions on one runtime in {:.1} s ({:.0} tokens/s), {errors} errors. {} samples; flatness judged after the first {:.0}% of them, tolerance {:.0}% of the median.\n\n![soak](soak.png)\n\n",
        args.pack.display(),
        pack.len(),
        pack.hidden_dim(),
        pack.dtype(),
        args.trace.display(),
        trace_rows,
        args.tokens,
        args.sessions,
        wall.as_secs_f64(),
        args.tokens as f64 / wall.as_secs_f64().max(1e-9),
        samples.len(),
        args.warmup * 100.0,
        args.tolerance * 100.0,
    );
    md.push_str("| series | after warm-up | min | max | last | spread | rule | holds |\n|---|---:|---:|---:|---:|---:|---|---|\n");
    for v in verdicts {
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}% | {} | {} |\n",
            v.column,
            v.at_warmup,
            v.min,
            v.max,
            v.last,
            v.spread * 100.0,
            v.rule,
            if v.flat { "yes" } else { "**no**" }
        ));
    }
    let mut tps: Vec<f64> = samples.iter().skip(1).map(|s| s.tokens_per_s).collect();
    tps.sort_by(f64::total_cmp);
    let mut p50: Vec<f64> = samples.iter().map(|s| s.p50_ms).collect();
    p50.sort_by(f64::total_cmp);
    md.push_str(&format!(
        "\nThroughput per sample interval: median {:.0} tokens/s (min {:.0}, max {:.0}); per-interval p50 latency median {:.3} ms. rss_mb is the process's resident memory, fds its open descriptors, threads its threads (/proc/self); cache_mb and cache_entries the weight cache's resident bytes and probes; held_probes the distinct probes the sessions' slots hold; sessions those the step scheduler holds slots for.\n",
        percentile(&tps, 50.0),
        tps.first().copied().unwrap_or(0.0),
        tps.last().copied().unwrap_or(0.0),
        percentile(&p50, 50.0)
    ));
    md.push_str(&format!(
        "\nAfter every session closed: {} sessions open, {} holding slots, {} probes held in slots ({}).\n",
        closed.open,
        closed.sessions,
        closed.held_probes,
        if closed.clean() { "back to nothing" } else { "**a leak**" }
    ));
    std::fs::write(args.out.join("soak.md"), md)?;
    plot(&args.out.join("soak"), samples, args.warmup)
}

fn plot(stem: &std::path::Path, samples: &[Sample], warmup: f64) -> anyhow::Result<()> {
    super::plot::png_and_svg!(stem, (1200, 800), |root| draw(&root, samples, warmup))
}

/// Six panels against tokens done, the warm-up shaded.
fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    samples: &[Sample],
    warmup: f64,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let panels = [
        ("rss_mb", "resident memory, MB"),
        ("cache_mb", "weight cache, MB"),
        ("fds", "open descriptors"),
        ("threads", "threads"),
        ("held_probes", "probes held in slots"),
        ("tokens_per_s", "tokens/s"),
    ];
    let max_tokens = samples.last().map_or(1.0, |s| s.tokens as f64).max(1.0);
    for (area, (column, title)) in root.split_evenly((3, 2)).iter().zip(panels) {
        let values: Vec<(f64, f64)> = samples.iter().map(|s| (s.tokens as f64, s.get(column))).collect();
        let top = values.iter().map(|v| v.1).filter(|v| v.is_finite()).fold(0.0f64, f64::max).max(1.0) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_tokens, 0.0..top)?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 12))
            .x_desc("tokens")
            .x_labels(6)
            .x_label_formatter(&|v| match *v {
                v if v >= 1e6 => format!("{}M", v / 1e6),
                v if v >= 1e3 => format!("{}k", v / 1e3),
                v => format!("{v}"),
            })
            .y_label_formatter(&|v| format!("{v}"))
            .draw()?;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, 0.0), (max_tokens * warmup, top)],
            RGBColor(230, 230, 230).filled(),
        )))?;
        chart.draw_series(LineSeries::new(values, RGBColor(31, 119, 180).stroke_width(2)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(rss: &[f64]) -> Vec<Sample> {
        rss.iter().map(|&r| Sample { rss_mb: r, fds: 10.0, threads: 8.0, ..Default::default() }).collect()
    }

    #[test]
    fn flat_means_a_small_spread_after_the_warm_up() {
        // Growth during the warm-up is allowed; after it, 100 → 104 is within 5%.
        let v = judge(&series(&[10.0, 50.0, 100.0, 101.0, 102.0, 104.0, 103.0, 102.0, 101.0, 100.0]), 0.2, 0.05, 1.0);
        assert!(v.iter().all(|v| v.flat), "{:?}", v.iter().map(|v| (v.column, v.spread)).collect::<Vec<_>>());
        // A leak: steady growth after the warm-up.
        let leak: Vec<f64> = (0..10).map(|i| 100.0 + 10.0 * i as f64).collect();
        let v = judge(&series(&leak), 0.2, 0.05, 1.0);
        let rss = v.iter().find(|v| v.column == "rss_mb").unwrap();
        assert!(!rss.flat && rss.last == 190.0 && rss.at_warmup == 120.0);
        // Zero stays zero: flat; zero then one: not.
        let v = judge(&series(&[1.0; 10]), 0.2, 0.05, 1.0);
        assert!(v.iter().find(|v| v.column == "cache_mb").unwrap().flat);
        // Slots are judged against their bound, not their spread.
        let mut s = series(&[1.0; 10]);
        s.iter_mut().enumerate().for_each(|(i, x)| x.held_probes = (i % 3) as f64 * 20.0);
        assert!(judge(&s, 0.2, 0.05, 40.0).iter().find(|v| v.column == "held_probes").unwrap().flat);
        assert!(!judge(&s, 0.2, 0.05, 39.0).iter().find(|v| v.column == "held_probes").unwrap().flat);
    }
}
