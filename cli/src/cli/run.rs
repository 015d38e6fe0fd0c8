use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use probe_cascade::config::{Config, Mode, WatchProfile};
use probe_cascade::engine::{percentile, StageTimings, TokenReport};

use super::engines::{self, EngineKind};
use probe_cascade::pack::Pack;
use serde_json::json;

#[derive(clap::Args)]
pub struct RunArgs {
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    pack: PathBuf,
    /// T×D float32 .npy of hidden states. For a pack whose probes read L model layers,
    /// T×(L·D): each row the L layers' states side by side, in the pack's model-layer order.
    #[arg(long, required_unless_present = "traces")]
    trace: Option<PathBuf>,
    /// Many recordings, each scored as its own session on one shared runtime, many at once:
    /// a directory (its .npy and .safetensors files) or a glob. A .npy is one recording named
    /// by its file stem; a safetensors file holds one recording per tensor, named
    /// `<stem>/<tensor>`. Results go to --parquet.
    #[arg(long, value_name = "DIR_OR_GLOB", requires = "parquet", conflicts_with_all = ["trace", "sessions", "oracle", "html", "trace_json", "json", "token_text", "tokens"])]
    traces: Option<String>,
    /// With --traces: the Parquet dataset to write (tables detections, tokens, alerts,
    /// simplex and failures, one directory each, and manifest.json), safe against a crash.
    #[arg(long, value_name = "OUT_DIR", requires = "traces")]
    parquet: Option<PathBuf>,
    /// With --parquet: finish the dataset an interrupted run left in OUT_DIR, skipping the
    /// recordings it wrote (the config and pack must be the same).
    #[arg(long, requires = "parquet")]
    resume: bool,
    /// With --traces: recordings scored at once, each a session (at most runtime.max_sessions;
    /// each holds its recording's states and reports in memory until it is written).
    #[arg(long, requires = "traces", default_value_t = 16)]
    concurrency: usize,
    /// With --parquet: a part (a file per table, committed together) holds about this many
    /// detection rows; a crash loses at most the part being written.
    #[arg(long, requires = "parquet", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    part_rows: u64,
    /// Which engine scores (default: reference; --sessions and --traces always use the shared
    /// runtime).
    #[arg(long, value_enum)]
    engine: Option<EngineKind>,
    /// Runtime mode (overrides the config's runtime.mode).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Write per-token results and the summary as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Report bad tokens as error entries and go on, instead of stopping.
    #[arg(long)]
    skip_bad_tokens: bool,
    /// Only the first N tokens of the trace.
    #[arg(long)]
    tokens: Option<usize>,
    /// Concepts shown per line of the table.
    #[arg(long, default_value_t = 3)]
    show_top: usize,
    /// Run N concurrent sessions on one shared runtime (the runtime engine): session i
    /// observes the trace from token i·K on, wrapping around, so all see the same count.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    sessions: Option<u32>,
    /// K for --sessions (default: the token count divided by N, spreading the sessions
    /// evenly over the trace).
    #[arg(long, requires = "sessions")]
    offset_stride: Option<usize>,
    /// Also score every probe on every token (the exhaustive oracle) and print the cascade's
    /// recall against it: top-10 recall, recall of concepts with p > 0.5, rank displacement.
    #[arg(long, conflicts_with = "sessions")]
    oracle: bool,
    /// A watch profile in headspace's text format (one concept per line, `#` comments),
    /// added to the config's `[[cascade.watch]]` and named after the file; repeatable.
    #[arg(long = "watch", value_name = "FILE")]
    watch: Vec<PathBuf>,
    /// The threshold of the `--watch` profiles (default: the pack's, 0.5 on raw probes).
    #[arg(long, requires = "watch")]
    watch_threshold: Option<f32>,
    /// Also write the run in headspace's JSON trace format (its viewer opens it): one run
    /// named after the trace file, token i shown as "i " (or as --token-text gives it). Not
    /// with --sessions.
    #[arg(long, value_name = "OUT", conflicts_with = "sessions")]
    trace_json: Option<PathBuf>,
    /// The trace's token texts for --trace-json and --html: a JSON list of strings, one per
    /// hidden state.
    #[arg(long, value_name = "FILE.json")]
    token_text: Option<PathBuf>,
    /// Also write the run as one self-contained HTML page (the viewer `serve` shows live, with
    /// the run's tokens in the file; it needs no network): each token tinted by its strongest
    /// concept, its top concepts and their paths, sparklines and alerts. With --sessions, one
    /// stream per session.
    #[arg(long, value_name = "OUT.html")]
    html: Option<PathBuf>,
}

impl RunArgs {
    /// `--trace` (clap requires it unless `--traces` is given, whose path returns first).
    fn trace(&self) -> &std::path::Path {
        self.trace.as_deref().expect("clap requires --trace without --traces")
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (mut config, document) = Config::load_document(&args.config)?;
    if let Some(mode) = args.mode {
        config.runtime.mode = mode;
    }
    for file in &args.watch {
        let name = file.file_stem().map_or_else(|| file.display().to_string(), |s| s.to_string_lossy().into_owned());
        config.cascade.watch.push(WatchProfile {
            name,
            concepts: Vec::new(),
            file: Some(file.clone()),
            threshold: args.watch_threshold,
        });
    }
    probe_cascade::config::check_watch(&config.cascade.watch).map_err(|m| anyhow::anyhow!("--watch: {m}"))?;
    let pack = Arc::new(Pack::open(&args.pack).with_context(|| format!("opening pack {}", args.pack.display()))?);
    if let Some(spec) = &args.traces {
        anyhow::ensure!(
            matches!(args.engine, None | Some(EngineKind::Runtime)),
            "--traces scores each recording as a session of the shared runtime: leave out --engine, or give --engine runtime"
        );
        let job = super::parquet::Job {
            spec,
            out: args.parquet.clone().context("--traces writes --parquet OUT_DIR")?,
            resume: args.resume,
            concurrency: args.concurrency,
            part_rows: args.part_rows,
            skip_bad_tokens: args.skip_bad_tokens,
            config_json: config_json(document, &args)?,
            config_source: args.config.display().to_string(),
        };
        return super::parquet::run(job, config, pack);
    }
    let trace = probe_cascade::npy::read(args.trace())?;
    let tokens = args.tokens.unwrap_or(trace.rows).min(trace.rows);
    let states = pack.hidden_states();
    anyhow::ensure!(
        states == 1 || trace.cols == states * pack.hidden_dim(),
        "the trace {} has {} values per token, but the pack's probes read model layers {:?} of D={}: give {} \
         values per token, the layers side by side",
        args.trace().display(),
        trace.cols,
        pack.model_layers(),
        pack.hidden_dim(),
        states * pack.hidden_dim()
    );
    if let Some(n) = args.sessions {
        anyhow::ensure!(
            args.engine == Some(EngineKind::Runtime),
            "--sessions runs sessions on the shared runtime: use it with --engine runtime"
        );
        return run_sessions(&args, pack, &config, &trace, tokens, n as usize);
    }
    let texts = args.token_text.as_deref().map(|f| token_texts(f, tokens)).transpose()?;
    anyhow::ensure!(
        texts.is_none() || args.trace_json.is_some() || args.html.is_some(),
        "--token-text names the tokens of --trace-json or --html: give one of them"
    );
    let mut engine = engines::build(args.engine.unwrap_or(EngineKind::Reference), pack.clone(), &config)?;
    println!("{} engine, {} tokens, config {}", engine.name(), tokens, args.config.display());
    println!("{:>6} {:>9} {:>9} {:>7} {:>9} {:>7}  top", "token", "ms", "children", "loaded", "unloaded", "active");
    let mut reports: Vec<TokenReport> = Vec::with_capacity(tokens);
    let mut entries = Vec::with_capacity(tokens);
    for index in 0..tokens {
        match engine.observe_states(index, &probe_cascade::engine::token_views(trace.row(index), &pack)) {
            Ok(r) => {
                let top: Vec<String> =
                    r.top.iter().take(args.show_top).map(|e| format!("{}@{} {:.2}", e.name, e.layer, e.prob)).collect();
                println!(
                    "{:>6} {:>9.2} {:>9} {:>7} {:>9} {:>7}  {}",
                    index,
                    r.elapsed.as_secs_f64() * 1e3,
                    r.children,
                    r.loaded,
                    r.unloaded,
                    r.active,
                    top.join(", ")
                );
                for a in r.alerts.iter().take(args.show_top) {
                    println!(
                        "{:>6}   alert [{}] {}@{} {:.2} under {}",
                        "", a.profile, a.concept, a.layer, a.score, a.watched
                    );
                }
                if r.alerts.len() > args.show_top {
                    println!("{:>6}   ... {} more alerts", "", r.alerts.len() - args.show_top);
                }
                if !r.simplex.is_empty() {
                    let poles: Vec<String> = r
                        .simplex
                        .iter()
                        .map(|x| match x.deviation {
                            Some(d) => format!("{}/{} {:.2} ({d:+.1}σ)", x.simplex, x.pole, x.prob),
                            None => format!("{}/{} {:.2}", x.simplex, x.pole, x.prob),
                        })
                        .collect();
                    println!("{:>6}   simplex {}", "", poles.join(", "));
                }
                entries.push(token_json(&r));
                reports.push(r);
            }
            Err(e) if args.skip_bad_tokens && e.token().is_some() => {
                println!("{index:>6} error: {e}");
                entries.push(json!({"index": index, "error": e.to_string()}));
            }
            Err(e) => return Err(e).with_context(|| format!("trace {}", args.trace().display())),
        }
    }
    let engine_name = engine.name();
    let mut summary = summary_json(&reports, engine.active().len(), tokens - reports.len());
    if let Some(t) = engine.weight_traffic() {
        // The counters that show where weights were copied (the CPU kernel copies none).
        println!(
            "\nscoring path: {}; weight bytes copied: {} by {} installs, {} by {} slot moves",
            t.path, t.install_bytes_copied, t.installs, t.move_bytes_copied, t.moves
        );
        if let Some(st) = &t.store {
            // Copies into the store are the weight bytes that cross to the device (PCIe on a GPU).
            println!(
                "resident store: {} rows of {} bytes, {} resident ({} pinned); {} copies in ({} prefetched, {} of \
                 them used), {} resident hits, {} evictions; {:.0} weight bytes copied per token; hidden states \
                 scored where they lay: {} (sent from host memory: {})",
                st.rows,
                st.row_bytes,
                st.resident,
                st.pinned,
                st.uploads,
                st.prefetched,
                st.prefetch_used,
                st.hits,
                st.evictions,
                t.install_bytes_copied as f64 / tokens.max(1) as f64,
                st.states_in_place,
                st.states_sent
            );
        }
        summary["weight_traffic"] = serde_json::to_value(&t)?;
    }
    drop(engine);
    if args.oracle {
        let oracle = probe_cascade::engine::oracle::OracleEngine::new(pack.clone(), &config)?;
        let rows = probe_cascade::fidelity::oracle_rows(&oracle, &trace, tokens)?;
        summary["fidelity"] = serde_json::to_value(probe_cascade::fidelity::of_reports(&rows, &reports))?;
    }
    print_summary(&summary);
    if let Some(path) = &args.html {
        let label = args.trace().file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        let events = reports
            .iter()
            .map(|r| {
                probe_cascade::viewer::TokenEvent::new(r, texts.as_ref().map(|t| t[r.index].as_str()), pack.hierarchy())
            })
            .collect();
        let streams = [probe_cascade::viewer::RecordedSession { id: 0, label, events }];
        write_html(path, &args, &pack, &config, &streams)?;
    }
    if let Some(path) = &args.trace_json {
        write_trace_json(path, &args, &pack, &reports, texts)?;
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "engine": engine_name,
            "config": args.config.display().to_string(),
            "pack": args.pack.display().to_string(),
            "trace": args.trace().display().to_string(),
            "tokens": entries,
            "summary": summary,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The config document as JSON with the command line's overrides (`--mode`, `--watch`) in it:
/// what a dataset's manifest records, and what `--resume` compares.
fn config_json(mut raw: serde_json::Value, args: &RunArgs) -> anyhow::Result<serde_json::Value> {
    if let Some(mode) = args.mode {
        raw["runtime"]["mode"] = serde_json::to_value(format!("{mode:?}").to_lowercase())?;
    }
    if !args.watch.is_empty() {
        let given = raw["cascade"]["watch"].as_array().cloned().unwrap_or_default();
        let added =
            args.watch.iter().map(|f| json!({"file": f.display().to_string(), "threshold": args.watch_threshold}));
        raw["cascade"]["watch"] = given.into_iter().chain(added).collect();
    }
    Ok(raw)
}

/// `run --sessions N`: N sessions on one runtime, each running its tokens back to back, all at
/// once.
fn run_sessions(
    args: &RunArgs,
    pack: Arc<Pack>,
    config: &Config,
    trace: &probe_cascade::npy::Matrix,
    tokens: usize,
    n: usize,
) -> anyhow::Result<ExitCode> {
    use probe_cascade::runtime::{Runtime, SessionOptions};
    anyhow::ensure!(tokens > 0, "the trace {} has no tokens", args.trace().display());
    let stride = args.offset_stride.unwrap_or(tokens / n);
    let texts = args.token_text.as_deref().map(|f| token_texts(f, trace.rows)).transpose()?;
    anyhow::ensure!(texts.is_none() || args.html.is_some(), "--token-text with --sessions names the tokens of --html");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (per_session, wall, stats) = rt.block_on(async {
        let runtime = Runtime::start(pack.clone(), config).await?;
        let mut sessions = Vec::with_capacity(n);
        for _ in 0..n {
            sessions.push(runtime.open_session(SessionOptions::default()).await?);
        }
        let start = std::time::Instant::now();
        let tasks: Vec<_> = sessions
            .into_iter()
            .enumerate()
            .map(|(i, session)| {
                let offset = i * stride;
                let rows: Vec<Vec<_>> = (0..tokens)
                    .map(|t| probe_cascade::engine::token_states(trace.row((offset + t) % trace.rows), &pack))
                    .collect();
                let skip = args.skip_bad_tokens;
                tokio::spawn(async move {
                    let mut out = Vec::with_capacity(rows.len());
                    for (t, hidden) in rows.into_iter().enumerate() {
                        match session.observe_states(hidden).await {
                            Ok(r) => out.push(Ok(r)),
                            Err(e) if skip && e.token().is_some() => out.push(Err((t, e.to_string()))),
                            Err(e) => {
                                return Err(anyhow::Error::new(e)
                                    .context(format!("session {i} (trace from token {offset}), token {t}")))
                            }
                        }
                    }
                    session.close().await;
                    Ok::<_, anyhow::Error>((offset, out))
                })
            })
            .collect();
        let mut per_session = Vec::with_capacity(n);
        for task in tasks {
            per_session.push(task.await??);
        }
        let wall = start.elapsed();
        let stats = runtime.step_stats().await?;
        runtime.shutdown().await;
        Ok::<_, anyhow::Error>((per_session, wall, stats))
    })?;
    println!(
        "runtime engine, {n} sessions × {tokens} tokens (offset stride {stride}), config {}",
        args.config.display()
    );
    println!("{:>8} {:>7} {:>9} {:>9} {:>9}", "session", "offset", "p50 ms", "p95 ms", "errors");
    let mut all: Vec<TokenReport> = Vec::new();
    let mut docs = Vec::with_capacity(n);
    let mut streams: Vec<(usize, Vec<TokenReport>)> = Vec::with_capacity(n);
    for (i, (offset, out)) in per_session.into_iter().enumerate() {
        let entries: Vec<serde_json::Value> = out
            .iter()
            .map(|r| match r {
                Ok(r) => token_json(r),
                Err((t, e)) => json!({"index": t, "error": e}),
            })
            .collect();
        let reports: Vec<TokenReport> = out.into_iter().filter_map(Result::ok).collect();
        let s = summary_json(&reports, reports.last().map_or(0, |r| r.active), tokens - reports.len());
        println!(
            "{i:>8} {offset:>7} {:>9.2} {:>9.2} {:>9}",
            s["p50_ms"].as_f64().unwrap_or(0.0),
            s["p95_ms"].as_f64().unwrap_or(0.0),
            s["errors"]
        );
        docs.push(json!({"offset": offset, "tokens": entries, "summary": s}));
        if args.html.is_some() {
            streams.push((offset, reports.clone()));
        }
        all.extend(reports);
    }
    let mut summary = summary_json(&all, 0, n * tokens - all.len());
    summary["sessions"] = json!(n);
    summary["offset_stride"] = json!(stride);
    summary["wall_s"] = json!(wall.as_secs_f64());
    summary["tokens_per_s"] = json!(all.len() as f64 / wall.as_secs_f64().max(1e-9));
    summary["steps"] = serde_json::to_value(&stats)?;
    print_summary(&summary);
    println!(
        "{:.0} tokens/s over {:.2} s; {} steps served {} requests ({:.1} per step, up to {}), {:.1} distinct probes per step",
        summary["tokens_per_s"].as_f64().unwrap_or(0.0),
        wall.as_secs_f64(),
        stats.steps,
        stats.requests,
        stats.requests as f64 / stats.steps.max(1) as f64,
        stats.max_step,
        stats.union_probes as f64 / stats.steps.max(1) as f64
    );
    if let Some(path) = &args.html {
        let recorded: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(i, (offset, reports))| probe_cascade::viewer::RecordedSession {
                id: i as u64,
                label: format!("session {i} (from token {offset})"),
                events: reports
                    .iter()
                    .map(|r| {
                        let text = texts.as_ref().map(|t| t[(offset + r.index) % trace.rows].as_str());
                        probe_cascade::viewer::TokenEvent::new(r, text, pack.hierarchy())
                    })
                    .collect(),
            })
            .collect();
        write_html(path, args, &pack, config, &recorded)?;
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "engine": "runtime",
            "config": args.config.display().to_string(),
            "pack": args.pack.display().to_string(),
            "trace": args.trace().display().to_string(),
            "sessions": docs,
            "summary": summary,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `--html`: the viewer page with the run's streams in it.
fn write_html(
    path: &std::path::Path,
    args: &RunArgs,
    pack: &Pack,
    config: &Config,
    sessions: &[probe_cascade::viewer::RecordedSession<'_>],
) -> anyhow::Result<()> {
    let name =
        |p: &std::path::Path| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into());
    let title = format!("{} · pack {}", name(args.trace()), name(&args.pack));
    let view = probe_cascade::viewer::PackView::new(pack).watching(&config.cascade.watch);
    std::fs::write(path, probe_cascade::viewer::report_page(&title, view, sessions))
        .with_context(|| format!("writing --html {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The run as headspace's trace document (`probe_cascade::headspace`).
/// `--token-text`: a JSON list of at least `tokens` strings.
fn token_texts(file: &std::path::Path, tokens: usize) -> anyhow::Result<Vec<String>> {
    let bytes = std::fs::read(file).with_context(|| format!("reading --token-text {}", file.display()))?;
    let all: Vec<String> = serde_json::from_slice(&bytes)
        .with_context(|| format!("--token-text {}: not a JSON list of strings", file.display()))?;
    anyhow::ensure!(
        all.len() >= tokens,
        "--token-text {}: {} texts, but the run has {tokens} tokens",
        file.display(),
        all.len()
    );
    Ok(all)
}

fn write_trace_json(
    path: &std::path::Path,
    args: &RunArgs,
    pack: &Pack,
    reports: &[TokenReport],
    texts: Option<Vec<String>>,
) -> anyhow::Result<()> {
    use probe_cascade::headspace::{document, pack_name, TraceRun, TraceToken, DEFAULT_TOP};
    let texts: Vec<String> = match texts {
        None => reports.iter().map(|r| format!("{} ", r.index)).collect(),
        Some(all) => reports.iter().map(|r| all[r.index].clone()).collect(),
    };
    let stem = |p: &std::path::Path| p.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let run = TraceRun {
        prompt: args.trace().display().to_string(),
        title: Some(stem(args.trace())),
        note: Some(format!("hidden states from {}, config {}", args.trace().display(), args.config.display())),
        seconds: Some(reports.iter().map(|r| r.elapsed.as_secs_f64()).sum()),
        tokens: reports.iter().zip(&texts).map(|(report, text)| TraceToken { text, report }).collect(),
    };
    let doc = document(pack, &pack_name(pack), None, &[run], DEFAULT_TOP);
    std::fs::write(path, serde_json::to_vec(&doc)?).with_context(|| format!("writing {}", path.display()))?;
    println!("headspace trace: {}", path.display());
    Ok(())
}

fn token_json(r: &TokenReport) -> serde_json::Value {
    json!({
        "index": r.index,
        "ms": r.elapsed.as_secs_f64() * 1e3,
        "children": r.children,
        "loaded": r.loaded,
        "unloaded": r.unloaded,
        "active": r.active,
        "scored": r.scored,
        "skipped_by_cap": r.skipped_by_cap,
        "stages": r.stages,
        "top": r.top,
        "in_flight": r.in_flight,
        "failed_loads": r.failed_loads,
        "alerts": r.alerts,
        "simplex": r.simplex,
    })
}

fn summary_json(reports: &[TokenReport], final_active: usize, errors: usize) -> serde_json::Value {
    let mut ms: Vec<f64> = reports.iter().map(|r| r.elapsed.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = reports.len().max(1) as f64;
    let mut stages = StageTimings::default();
    for r in reports {
        let s = &r.stages;
        stages.initial_scoring += s.initial_scoring;
        stages.expansion_lookup += s.expansion_lookup;
        stages.loading += s.loading;
        stages.new_scoring += s.new_scoring;
        stages.pruning += s.pruning;
        stages.sorting += s.sorting;
    }
    json!({
        "tokens": reports.len(),
        "errors": errors,
        "avg_ms": ms.iter().sum::<f64>() / n,
        "p50_ms": percentile(&ms, 50.0),
        "p95_ms": percentile(&ms, 95.0),
        "max_ms": ms.last().copied().unwrap_or(0.0),
        "final_active": final_active,
        "children_per_token": reports.iter().map(|r| r.children).sum::<usize>() as f64 / n,
        "loads_per_token": reports.iter().map(|r| r.loaded).sum::<usize>() as f64 / n,
        "total_loaded": reports.iter().map(|r| r.loaded).sum::<usize>(),
        "total_unloaded": reports.iter().map(|r| r.unloaded).sum::<usize>(),
        "skipped_by_cap": reports.iter().map(|r| r.skipped_by_cap).sum::<usize>(),
        "stage_totals_ms": stages,
        "alerts": alert_totals(reports),
    })
}

/// Per profile: alerts raised, and tokens with at least one.
fn alert_totals(reports: &[TokenReport]) -> serde_json::Value {
    let mut totals: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for r in reports {
        let mut seen: Vec<&str> = Vec::new();
        for a in &r.alerts {
            let t = totals.entry(&a.profile).or_default();
            t.0 += 1;
            if !seen.contains(&a.profile.as_str()) {
                seen.push(&a.profile);
                t.1 += 1;
            }
        }
    }
    totals
        .into_iter()
        .map(|(p, (alerts, tokens))| (p.to_string(), json!({"alerts": alerts, "tokens": tokens})))
        .collect()
}

fn print_summary(s: &serde_json::Value) {
    let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
    println!(
        "\naverage {:.2} ms, p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms over {} tokens ({} errors)",
        f("avg_ms"),
        f("p50_ms"),
        f("p95_ms"),
        f("max_ms"),
        s["tokens"],
        s["errors"]
    );
    println!(
        "final active {}, {:.1} children and {:.1} loads per token, {} unloaded in all, {} skipped by the cap",
        s["final_active"],
        f("children_per_token"),
        f("loads_per_token"),
        s["total_unloaded"],
        s["skipped_by_cap"]
    );
    let st = &s["stage_totals_ms"];
    let total: f64 = ["initial_scoring", "expansion_lookup", "loading", "new_scoring", "pruning", "sorting"]
        .iter()
        .map(|k| st[k].as_f64().unwrap_or(0.0))
        .sum::<f64>()
        .max(1e-9);
    let parts: Vec<String> = ["initial_scoring", "expansion_lookup", "loading", "new_scoring", "pruning", "sorting"]
        .iter()
        .map(|k| format!("{k} {:.0}%", 100.0 * st[*k].as_f64().unwrap_or(0.0) / total))
        .collect();
    println!("time by stage: {}", parts.join(", "));
    if let Some(alerts) = s["alerts"].as_object().filter(|a| !a.is_empty()) {
        let parts: Vec<String> =
            alerts.iter().map(|(p, a)| format!("{p}: {} alerts on {} tokens", a["alerts"], a["tokens"])).collect();
        println!("watch profiles: {}", parts.join("; "));
    }
    if let Some(f) = s.get("fidelity").filter(|f| !f.is_null()) {
        let pct = |k: &str| f[k].as_f64().map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
        println!(
            "against the oracle (every probe, every token): top-10 recall {} (scored: {}), recall of concepts with p > 0.5 {} ({:.1} per token), mean rank displacement {:.2}",
            pct("recall_top10"),
            pct("recall_top10_scored"),
            pct("recall_fired"),
            f["fired_per_token"].as_f64().unwrap_or(0.0),
            f["rank_displacement"].as_f64().unwrap_or(0.0)
        );
    }
}
