//! `probe-cascade bench`: every engine on the same pack and trace, one after another in one
//! process, under the seed's three configurations and the decompose variant. Writes bench.md
//! (a table like the seed's) and bench.json (rows and per-token figures).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use probe_cascade::config::{Config, Mode, Pruning};
use probe_cascade::engine::{build_engine, percentile, EngineKind, TokenReport};
use probe_cascade::npy::Matrix;
use probe_cascade::pack::Pack;
use serde_json::json;

use super::measure::{back_to_back, drop_page_cache, runtime_run, warm_page_cache, BackToBack, Oracles};
use super::progress::bar;

mod sessions;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    pack: PathBuf,
    /// T×D float32 .npy of hidden states; T×(L·D), the layers side by side, for a pack whose
    /// probes read L model layers.
    #[arg(long)]
    trace: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Measured tokens (after the warm-up ones).
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// Tokens run first and left out of the figures.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Drop the pack from the page cache before each engine (posix_fadvise DONTNEED).
    #[arg(long)]
    cold: bool,
    /// Score every probe on every token (the exhaustive oracle) and add each row's recall
    /// against it: top-10 recall, recall of the concepts with p > 0.5, rank displacement.
    #[arg(long)]
    oracle: bool,
    /// Engines to run (default: all four).
    #[arg(long, value_delimiter = ',')]
    engines: Option<Vec<String>>,
    /// Configurations to run (default: all four).
    #[arg(long, value_delimiter = ',')]
    configs: Option<Vec<String>>,
    /// Device for every engine and configuration, e.g. `cuda:0` (default: cpu).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype for every engine and configuration (default: f32).
    #[arg(long, default_value = "f32")]
    compute_dtype: probe_cascade::pack::DType,
    /// Session counts, e.g. `1,2,4,8,16`: many streams on one runtime, all running back to
    /// back at once (and 8 separate `Cascade`s beside them). Only the sessions table is
    /// written unless --engines is given too. Configs default to seed-top-30 here.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=4096))]
    sessions: Option<Vec<u32>>,
    /// Sets runtime.batch_window_us for every configuration (sessions: how long a step waits
    /// for other sessions' requests to join it).
    #[arg(long)]
    batch_window_us: Option<u64>,
}

/// The default engines; `runtime-store` (exact mode on the tch backend's resident store,
/// `device.cpu_kernel = "torch"`: a GPU's path, on the CPU) can be asked for with --engines.
const ENGINES: [&str; 4] = ["naive", "reference", "runtime-exact", "runtime-pipelined"];
const OPTIONAL_ENGINES: [&str; 1] = ["runtime-store"];

/// The seed's comparison table (base [0], threshold 0.3) and the decompose variant.
fn configs() -> anyhow::Result<Vec<(&'static str, Config)>> {
    let realtime = Config::parse(include_str!("../../../../config/realtime.toml"), Path::new("config/realtime.toml"))?;
    let decompose =
        Config::parse(include_str!("../../../../config/decompose.toml"), Path::new("config/decompose.toml"))?;
    let with = |pruning: Pruning| {
        let mut c = realtime.clone();
        c.cascade.pruning = pruning;
        c
    };
    Ok(vec![
        ("seed-no-pruning", with(Pruning::None)),
        ("seed-top-50", with(Pruning::TopK { keep_top_k: 50 })),
        ("seed-top-30", with(Pruning::TopK { keep_top_k: 30 })),
        ("decompose", decompose),
    ])
}

struct Row {
    config: String,
    engine: String,
    mode: String,
    ms: Vec<f64>,
    final_active: usize,
    loads: usize,
    children: usize,
    cache_hit_rate: Option<f64>,
    bytes_read: u64,
    in_flight: usize,
    b2b: BackToBack,
    fidelity: Option<probe_cascade::fidelity::Fidelity>,
}

fn b2b_sync(
    kind: EngineKind,
    pack: &Arc<Pack>,
    config: &Config,
    trace: &Matrix,
    warmup: usize,
    tokens: usize,
) -> anyhow::Result<BackToBack> {
    let mut engine = build_engine(kind, pack.clone(), config)?;
    let views = |t: usize| probe_cascade::engine::token_views(trace.row(t % trace.rows), pack);
    back_to_back(warmup, tokens, |t| Ok(engine.observe_states(t, &views(t)).map(|_| ())?), || Ok(()))
}

fn run_sync(
    kind: EngineKind,
    pack: &Arc<Pack>,
    config: &Config,
    trace: &Matrix,
    warmup: usize,
    tokens: usize,
) -> anyhow::Result<Vec<TokenReport>> {
    let mut engine = build_engine(kind, pack.clone(), config)?;
    let mut out = Vec::with_capacity(tokens);
    for t in 0..warmup + tokens {
        let r = engine.observe_states(t, &probe_cascade::engine::token_views(trace.row(t % trace.rows), pack))?;
        if t >= warmup {
            out.push(r);
        }
    }
    Ok(out)
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let pack = Arc::new(Pack::open(&args.pack).with_context(|| format!("opening {}", args.pack.display()))?);
    let trace = probe_cascade::npy::read(&args.trace)?;
    anyhow::ensure!(args.tokens > 0, "--tokens must be at least 1");
    if args.warmup + args.tokens > trace.rows {
        eprintln!(
            "note: the trace has {} tokens; it is replayed from the start to reach {}",
            trace.rows,
            args.warmup + args.tokens
        );
    }
    std::fs::create_dir_all(&args.out)?;
    let engines: Vec<String> = args.engines.clone().unwrap_or_else(|| ENGINES.iter().map(|s| s.to_string()).collect());
    for e in &engines {
        anyhow::ensure!(
            ENGINES.contains(&e.as_str()) || OPTIONAL_ENGINES.contains(&e.as_str()),
            "unknown engine `{e}` (expected one of {ENGINES:?} or {OPTIONAL_ENGINES:?})"
        );
    }
    let mut all = configs()?;
    for (name, config) in &mut all {
        config.device.device = args.device.clone();
        config.device.compute_dtype = args.compute_dtype;
        if let Some(us) = args.batch_window_us {
            config.runtime.batch_window_us = us;
        }
        config.validate(Path::new(&format!("the {name} configuration with --device/--compute-dtype")))?;
    }
    let wanted: Vec<_> = match &args.configs {
        None if args.sessions.is_some() => all.into_iter().filter(|(c, _)| *c == "seed-top-30").collect(),
        None => all,
        Some(names) => {
            for n in names {
                anyhow::ensure!(all.iter().any(|(c, _)| c == n), "unknown config `{n}`");
            }
            all.into_iter().filter(|(c, _)| names.iter().any(|n| n == c)).collect()
        }
    };
    let probe_bytes = pack.layout().byte_len() as u64;
    let mut rows: Vec<Row> = Vec::new();
    let mut session_rows: Vec<serde_json::Value> = Vec::new();
    if let Some(counts) = &args.sessions {
        warm_page_cache(&pack)?;
        for (name, config) in &wanted {
            session_rows.extend(sessions::bench(&pack, name, config, &trace, args.warmup, args.tokens, counts)?);
        }
    }
    let engines = if args.sessions.is_some() && args.engines.is_none() { Vec::new() } else { engines };
    let oracles = if args.oracle && !engines.is_empty() {
        Oracles::score(&pack, wanted.iter().map(|(_, c)| c), &trace, args.warmup + args.tokens)?
    } else {
        Oracles::none()
    };
    let progress = bar(wanted.len() * engines.len(), "bench");
    for (name, config) in &wanted {
        for engine in &engines {
            if args.cold {
                drop_page_cache(&pack);
            } else {
                warm_page_cache(&pack)?;
            }
            let started = Instant::now();
            let (reports, hit_rate, bytes, mode, b2b) = match engine.as_str() {
                "naive" | "reference" => {
                    let kind = if engine == "naive" { EngineKind::Naive } else { EngineKind::Reference };
                    let r = run_sync(kind, &pack, config, &trace, args.warmup, args.tokens)?;
                    let loads: usize = r.iter().map(|x| x.loaded).sum();
                    let b2b = b2b_sync(kind, &pack, config, &trace, args.warmup, args.tokens)?;
                    (r, None, loads as u64 * probe_bytes, "-", b2b)
                }
                runtime => {
                    let mut c = config.clone();
                    c.runtime.mode = if runtime == "runtime-pipelined" { Mode::Pipelined } else { Mode::Exact };
                    if runtime == "runtime-store" {
                        c.device.cpu_kernel = probe_cascade::config::CpuKernel::Torch;
                    }
                    let settled = runtime_run(&pack, &c, &trace, args.warmup, args.tokens, true)?;
                    let b = runtime_run(&pack, &c, &trace, args.warmup, args.tokens, false)?;
                    let b2b = BackToBack { ms: b.ms, cpu_ms: b.cpu_ms };
                    let (r, hit, bytes) = (settled.reports, settled.cache_hit_rate, settled.bytes_read);
                    let mode = match runtime {
                        "runtime-store" => "exact, tch resident store",
                        _ if c.runtime.mode == Mode::Exact => "exact",
                        _ => "pipelined",
                    };
                    (r, Some(hit), bytes, mode, b2b)
                }
            };
            tracing::info!("{name} / {engine}: {:.1} s", started.elapsed().as_secs_f64());
            let fidelity = oracles.of(&pack, config).map(|o| probe_cascade::fidelity::of_reports(o, &reports));
            rows.push(Row {
                config: name.to_string(),
                engine: engine.split('-').next().unwrap_or(engine).to_string(),
                mode: mode.to_string(),
                ms: reports.iter().map(|r| r.elapsed.as_secs_f64() * 1e3).collect(),
                final_active: reports.last().map_or(0, |r| r.active),
                loads: reports.iter().map(|r| r.loaded).sum(),
                children: reports.iter().map(|r| r.children).sum(),
                cache_hit_rate: hit_rate,
                bytes_read: bytes,
                in_flight: reports.iter().map(|r| r.in_flight.len()).sum(),
                b2b,
                fidelity,
            });
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    write_outputs(&args, &pack, &rows, &session_rows)?;
    println!("wrote {} and {}", args.out.join("bench.md").display(), args.out.join("bench.json").display());
    Ok(ExitCode::SUCCESS)
}

/// ` recall | recall | displacement |` and a newline, for a row's oracle columns.
fn fidelity_cells(f: Option<&probe_cascade::fidelity::Fidelity>) -> String {
    match f {
        None => " - | - | - |\n".into(),
        Some(f) => format!(
            " {:.0}% | {} | {:.2} |\n",
            f.recall_top10 * 100.0,
            f.recall_fired.map_or("-".into(), |r| format!("{:.0}%", r * 100.0)),
            f.rank_displacement
        ),
    }
}

fn machine() -> serde_json::Value {
    let info = probe_cascade::kernel::CpuInfo::detect();
    let cpu = info.to_string();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    json!({"cpu": cpu, "cpu_info": info, "cores": cores, "commit": commit, "tch_threads": tch::get_num_threads()})
}

fn write_outputs(
    args: &BenchArgs,
    pack: &Pack,
    rows: &[Row],
    session_rows: &[serde_json::Value],
) -> anyhow::Result<()> {
    let p50 = |r: &Row| {
        let mut v = r.ms.clone();
        v.sort_by(f64::total_cmp);
        percentile(&v, 50.0)
    };
    let naive_p50 = |config: &str| rows.iter().find(|r| r.config == config && r.engine == "naive").map(p50);
    let machine = machine();
    let page_cache = if args.cold {
        "cold (dropped with posix_fadvise DONTNEED before each engine)"
    } else {
        "warm (pack read once before each engine)"
    };
    let mut md = String::new();
    md.push_str(&format!(
        "# probe-cascade bench\n\nMachine: {} ({} cores; the runtime engine scores on the CPU kernel's default path unless the config sets device.cpu_kernel), commit {}. Device: {} ({} compute). Pack: {} ({} concepts, D={}, {}). Trace: {} ({} measured tokens after {} warm-up tokens). Page cache: {}.\n\n",
        machine["cpu"].as_str().unwrap_or(""),
        machine["cores"],
        machine["commit"].as_str().unwrap_or(""),
        args.device,
        args.compute_dtype,
        args.pack.display(),
        pack.len(),
        pack.hidden_dim(),
        pack.dtype(),
        args.trace.display(),
        args.tokens,
        args.warmup,
        page_cache
    ));
    if !session_rows.is_empty() {
        md.push_str(&sessions::table(session_rows));
    }
    let mut json_rows = Vec::new();
    if !rows.is_empty() {
        let oracle = rows.iter().any(|r| r.fidelity.is_some());
        md.push_str("| config | engine | mode | avg ms | p50 ms | p95 ms | max ms | b2b p50 ms | b2b avg ms | b2b CPU ms | children/token | final active | loads/token | cache hit | MB read |");
        md.push_str(if oracle { " top-10 recall | fired recall | rank displacement |\n" } else { "\n" });
        md.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        md.push_str(if oracle { "---:|---:|---:|\n" } else { "\n" });
        for r in rows {
            let mut v = r.ms.clone();
            v.sort_by(f64::total_cmp);
            let n = v.len().max(1) as f64;
            let avg = v.iter().sum::<f64>() / n;
            let (p50v, p95, max) = (percentile(&v, 50.0), percentile(&v, 95.0), v.last().copied().unwrap_or(0.0));
            let ratio = naive_p50(&r.config).map(|n| n / p50v.max(1e-9));
            let loads_per_token = r.loads as f64 / n;
            let mut b = r.b2b.ms.clone();
            b.sort_by(f64::total_cmp);
            let (b2b_p50, b2b_avg) = (percentile(&b, 50.0), b.iter().sum::<f64>() / b.len().max(1) as f64);
            let children = r.children as f64 / n;
            md.push_str(&format!(
            "| {} | {} | {} | {avg:.2} | {p50v:.2} | {p95:.2} | {max:.2} | {b2b_p50:.2} | {b2b_avg:.2} | {:.2} | {children:.1} | {} | {loads_per_token:.1} | {} | {:.1} |\n",
            r.config,
            r.engine,
            r.mode,
            r.b2b.cpu_ms,
            r.final_active,
            r.cache_hit_rate.map_or("-".to_string(), |h| format!("{:.0}%", h * 100.0)),
            r.bytes_read as f64 / 1e6,
        ));
            if oracle {
                md.truncate(md.len() - 1);
                md.push_str(&fidelity_cells(r.fidelity.as_ref()));
            }
            json_rows.push(json!({
                "config": r.config, "engine": r.engine, "mode": r.mode,
                "avg_ms": avg, "p50_ms": p50v, "p95_ms": p95, "max_ms": max,
                "final_active": r.final_active, "loads_per_token": loads_per_token,
                "children_per_token": r.children as f64 / n,
                "cache_hit_rate": r.cache_hit_rate, "bytes_read": r.bytes_read,
                "in_flight_total": r.in_flight,
                "ratio_to_naive_p50": ratio,
                "b2b_p50_ms": b2b_p50, "b2b_avg_ms": b2b_avg, "b2b_cpu_ms": r.b2b.cpu_ms,
                "per_token_ms": r.ms,
                "b2b_per_token_ms": r.b2b.ms,
                "fidelity": r.fidelity,
            }));
        }
    }
    if !rows.is_empty() {
        if rows.iter().any(|r| r.fidelity.is_some()) {
            md.push_str("\nRecall is against the exhaustive oracle (every probe scored on every token, settled reports): top-10 recall is the share of the oracle's 10 best concepts each report holds; fired recall the share of the concepts with p > 0.5 anywhere in the pack that the cascade scored; rank displacement the mean |oracle rank − report place| of the reported concepts.\n");
        }
        md.push_str("\nThe first latency columns (avg to max) are settled: runtime rows wait between tokens until loads and pruning's deferred work are done (`Cascade::settle`), untimed. The b2b columns run the same tokens back to back with no untimed gap (a fresh engine), the cost a generation loop on the same CPU pays: each token's wall time from the end of the one before, and the process's CPU time per token. Naive and reference read every load from the pack, so their \"MB read\" is loads × probe size.\n");
    }
    std::fs::write(args.out.join("bench.md"), md)?;
    let doc = json!({
        "machine": machine,
        "device": args.device,
        "compute_dtype": args.compute_dtype.to_string(),
        "pack": args.pack.display().to_string(),
        "trace": args.trace.display().to_string(),
        "tokens": args.tokens,
        "warmup_tokens_excluded": args.warmup,
        "page_cache": if args.cold { "cold" } else { "warm" },
        "rows": json_rows,
        "sessions": session_rows,
    });
    std::fs::write(args.out.join("bench.json"), serde_json::to_vec_pretty(&doc)?)?;
    Ok(())
}
