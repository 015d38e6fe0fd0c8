//! `probe-cascade tune`: measures a grid of configs on a recorded trace (latency, loads, bytes,
//! memory, and what each misses against the exhaustive oracle), in exact and pipelined mode,
//! then writes tune.md, tune.json, a Pareto plot (PNG and SVG) and the config the objective
//! picks as chosen.toml.

mod plot;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use probe_cascade::config::{Config, Expansion, Mode};
use probe_cascade::engine::{percentile, TokenReport};
use probe_cascade::fidelity::{of_reports, overlap, OracleToken};
use probe_cascade::npy::Matrix;
use probe_cascade::pack::{ConceptId, Pack};
use probe_cascade::tune::{apply, pareto_front, parse_grid, points, Objective, Setting};
use serde_json::json;

use super::measure::{peak_rss_bytes, reset_peak_rss, runtime_run, warm_page_cache, Oracles};
use super::progress::bar;

#[derive(clap::Args)]
pub struct TuneArgs {
    #[arg(long)]
    pack: PathBuf,
    /// T×D float32 .npy of hidden states (replayed from its start if shorter than the run);
    /// T×(L·D), the layers side by side, for a pack whose probes read L model layers.
    #[arg(long)]
    trace: PathBuf,
    /// The config every grid point starts from; its [device] section also runs the presets.
    #[arg(long)]
    base: PathBuf,
    /// Values per config key: `key=v1,v2;key2=w1,w2`, e.g.
    /// `cascade.expansion.threshold.load_threshold=0.1,0.3;cascade.pruning.top_k.keep_top_k=20,50`.
    /// Kinds of one policy are alternatives: `cascade.expansion=exhaustive` and
    /// `cascade.expansion.decompose.top_k=5,10` add points beside the threshold ones.
    #[arg(long)]
    grid: String,
    #[arg(long)]
    out: PathBuf,
    /// Which candidate (a point in one mode) becomes chosen.toml:
    /// `max|min FIGURE [where FIGURE OP NUMBER [and …]]`.
    #[arg(long, default_value = "max recall_top10")]
    objective: String,
    /// Measured tokens per run (after the warm-up ones).
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// Tokens run first and left out of the figures.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Leave out the shipped presets (config/realtime, offline and decompose), which are
    /// otherwise measured beside the grid and labelled on the plot.
    #[arg(long)]
    no_presets: bool,
}

/// One mode's figures for one point. Latencies are per token; `p50_ms`/`p95_ms` back to
/// back (the cost a generation loop pays), `settled_*` with the runtime's deferred work done
/// between tokens, untimed.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Figures {
    p50_ms: f64,
    p95_ms: f64,
    settled_p50_ms: f64,
    settled_p95_ms: f64,
    cpu_ms: f64,
    children_per_token: f64,
    loads_per_token: f64,
    bytes_read_per_token: f64,
    cache_hit_rate: f64,
    peak_ram_mb: Option<f64>,
    recall_top10: f64,
    recall_top10_scored: f64,
    recall_fired: Option<f64>,
    fired_per_token: f64,
    rank_displacement: f64,
    /// Mean share of the exact report's concepts the report of this mode also has (1 in exact
    /// mode; none when exact mode was not measured).
    agreement_with_exact: Option<f64>,
}

impl Figures {
    fn names() -> Vec<String> {
        let v = serde_json::to_value(Figures::default()).expect("plain struct");
        v.as_object().expect("a struct").keys().cloned().collect()
    }

    fn get(&self, name: &str) -> Option<f64> {
        serde_json::to_value(self).ok()?.get(name)?.as_f64()
    }
}

struct Point {
    label: String,
    preset: bool,
    settings: Vec<Setting>,
    config: Config,
    doc: toml::Table,
    notes: Vec<String>,
    /// One per measured mode, in the order of `modes` (exact first).
    modes: Vec<Figures>,
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Exact => "exact",
        Mode::Pipelined => "pipelined",
    }
}

const PRESETS: [(&str, &str); 3] = [
    ("realtime", include_str!("../../../../config/realtime.toml")),
    ("offline", include_str!("../../../../config/offline.toml")),
    ("decompose", include_str!("../../../../config/decompose.toml")),
];

pub fn run(args: TuneArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.tokens > 0, "--tokens must be at least 1");
    let names = Figures::names();
    let figure_names: Vec<&str> = names.iter().map(String::as_str).collect();
    let objective = Objective::parse(&args.objective, &figure_names)?;
    let base_text =
        std::fs::read_to_string(&args.base).with_context(|| format!("reading --base {}", args.base.display()))?;
    Config::parse(&base_text, &args.base)?;
    let base: toml::Table = toml::from_str(&base_text).with_context(|| format!("--base {}", args.base.display()))?;
    let pack = Arc::new(Pack::open(&args.pack).with_context(|| format!("opening pack {}", args.pack.display()))?);
    let trace = probe_cascade::npy::read(&args.trace)?;
    anyhow::ensure!(trace.rows > 0, "the trace {} has no tokens", args.trace.display());

    // Every point is checked before anything is measured: a bad key fails at once.
    let mut keys = parse_grid(&args.grid)?;
    let modes = modes_of(&mut keys)?;
    let mut pts = Vec::new();
    for settings in points(&keys)? {
        let (config, doc) = apply(&base, &settings)?;
        let mut label =
            settings.iter().map(|(k, v)| format!("{}={}", short_key(k), show(v))).collect::<Vec<_>>().join(" ");
        if label.is_empty() {
            label = "base".into();
        }
        pts.push(Point { label, preset: false, settings, config, doc, notes: Vec::new(), modes: Vec::new() });
    }
    if !args.no_presets {
        for (name, text) in PRESETS {
            let mut doc: toml::Table = toml::from_str(text).expect("shipped presets parse");
            match base.get("device") {
                Some(device) => doc.insert("device".into(), device.clone()),
                None => doc.remove("device"),
            };
            let (config, doc) =
                apply(&doc, &[]).with_context(|| format!("the {name} preset on the base's [device]"))?;
            let label = format!("preset {name}");
            pts.push(Point {
                label,
                preset: true,
                settings: Vec::new(),
                config,
                doc,
                notes: Vec::new(),
                modes: Vec::new(),
            });
        }
    }
    for p in &mut pts {
        p.notes = fit_to_pack(&pack, &mut p.doc)?;
        if !p.notes.is_empty() {
            p.config = apply(&p.doc, &[])?.0;
        }
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;

    let oracles = Oracles::score(&pack, pts.iter().map(|p| &p.config), &trace, args.warmup + args.tokens)?;
    // Read once: every run then finds the pack in the page cache.
    warm_page_cache(&pack)?;

    let progress = bar(pts.len() * modes.len(), "tune");
    for p in &mut pts {
        let oracle = oracles.of(&pack, &p.config).expect("every point's input was scored");
        progress.set_message(p.label.chars().take(40).collect::<String>());
        let mut exact_reports: Option<Vec<TokenReport>> = None;
        for &mode in &modes {
            let (figures, reports) = measure(&pack, &p.config, mode, &trace, &args, oracle, exact_reports.as_deref())
                .with_context(|| format!("point `{}`, {} mode", p.label, mode_name(mode)))?;
            p.modes.push(figures);
            if mode == Mode::Exact {
                exact_reports = Some(reports);
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();

    // Candidates: every point in each mode.
    let candidates: Vec<(usize, usize)> = (0..pts.len()).flat_map(|p| (0..modes.len()).map(move |m| (p, m))).collect();
    let figures_of = |&(p, m): &(usize, usize)| &pts[p].modes[m];
    let xy: Vec<(f64, f64)> = candidates.iter().map(|c| (figures_of(c).p50_ms, figures_of(c).recall_top10)).collect();
    let front = pareto_front(&xy);
    let lookups: Vec<_> = candidates.iter().map(|c| move |name: &str| figures_of(c).get(name)).collect();
    let chosen = objective.choose(&lookups, "p50_ms");

    let plot_points: Vec<plot::PlotPoint> = candidates
        .iter()
        .map(|&(p, m)| plot::PlotPoint {
            p50_ms: pts[p].modes[m].p50_ms,
            recall: pts[p].modes[m].recall_top10,
            pipelined: modes[m] == Mode::Pipelined,
            label: pts[p].preset.then(|| pts[p].label.trim_start_matches("preset ").to_string()),
        })
        .collect();
    let title = format!("{} concepts, D={} {}: latency against recall", pack.len(), pack.hidden_dim(), pack.dtype());
    plot::write(&args.out.join("pareto"), &title, &plot_points, &front, chosen)?;

    let chosen_doc = chosen.map(|c| {
        let (p, m) = candidates[c];
        let mut doc = pts[p].doc.clone();
        let runtime = doc.entry("runtime").or_insert_with(|| toml::Value::Table(Default::default()));
        if let Some(t) = runtime.as_table_mut() {
            t.insert("mode".into(), toml::Value::String(mode_name(modes[m]).into()));
        }
        doc
    });
    if let (Some(c), Some(doc)) = (chosen, &chosen_doc) {
        let (p, m) = candidates[c];
        let f = &pts[p].modes[m];
        let header = format!(
            "# Chosen by `probe-cascade tune` for `{}` from {} candidates ({} mode of `{}`):\n\
             # p50 {:.3} ms, p95 {:.3} ms per token back to back; top-10 recall {:.1}%; {:.1} loads per token\n\
             # on pack {} and trace {} ({} tokens).\n\n",
            objective.text,
            candidates.len(),
            mode_name(modes[m]),
            pts[p].label,
            f.p50_ms,
            f.p95_ms,
            f.recall_top10 * 100.0,
            f.loads_per_token,
            args.pack.display(),
            args.trace.display(),
            args.tokens
        );
        let path = args.out.join("chosen.toml");
        std::fs::write(&path, header + &toml::to_string(doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    write_reports(&args, &pack, &pts, &modes, &candidates, &front, chosen, &objective)?;
    println!(
        "wrote {} candidates to {} (tune.md, tune.json, pareto.png, pareto.svg{})",
        candidates.len(),
        args.out.display(),
        if chosen.is_some() { ", chosen.toml" } else { "" }
    );
    match chosen {
        Some(c) => {
            let (p, m) = candidates[c];
            println!("chosen: {} in {} mode", pts[p].label, mode_name(modes[m]));
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!(
                "error: no candidate meets `{}` ({}); chosen.toml not written, see tune.md for what each achieved",
                objective.text,
                objective.conditions().join(" and ")
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The modes to measure: both, or those `runtime.mode` lists in the grid (taken out of it:
/// the mode is a way to run every point, not a factor of the config).
fn modes_of(keys: &mut Vec<probe_cascade::tune::GridKey>) -> anyhow::Result<Vec<Mode>> {
    let Some(i) = keys.iter().position(|k| k.key == "runtime.mode") else {
        return Ok(vec![Mode::Exact, Mode::Pipelined]);
    };
    let key = keys.remove(i);
    let mut modes = Vec::new();
    for v in &key.values {
        let mode = match v.as_str() {
            Some("exact") => Mode::Exact,
            Some("pipelined") => Mode::Pipelined,
            _ => anyhow::bail!("--grid key `runtime.mode`: `{}` is not `exact` or `pipelined`", show(v)),
        };
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    // Exact first, so that pipelined reports can be compared with it.
    modes.sort_by_key(|m| *m != Mode::Exact);
    Ok(modes)
}

/// `cascade.expansion.threshold.load_threshold` → `load_threshold`.
fn short_key(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What a point needs to run on this pack: the exhaustive mode must be able to activate every
/// probe, and the CPU kernel's cache must hold every probe that can be active. Raises
/// `cascade.max_loaded`, `runtime.pool_slots` and `runtime.cache_bytes` where they fall short,
/// and says so.
fn fit_to_pack(pack: &Pack, doc: &mut toml::Table) -> anyhow::Result<Vec<String>> {
    let config = apply(doc, &[])?.0;
    let mut notes = Vec::new();
    let mut set = |table: &str, key: &str, value: i64, why: &str| {
        let t = doc.entry(table).or_insert_with(|| toml::Value::Table(Default::default()));
        if let Some(t) = t.as_table_mut() {
            t.insert(key.into(), toml::Value::Integer(value));
        }
        notes.push(format!("{table}.{key} raised to {value} ({why})"));
    };
    let n = pack.len();
    let mut max_loaded = config.cascade.max_loaded;
    let mut slots = config.runtime.pool_slots;
    if config.cascade.expansion == Expansion::Exhaustive && max_loaded < n {
        max_loaded = n;
        set("cascade", "max_loaded", n as i64, "exhaustive scores every probe");
    }
    if slots < max_loaded {
        slots = max_loaded;
        set("runtime", "pool_slots", slots as i64, "one slot per active probe");
    }
    let need = (max_loaded.min(slots) * pack.layout().byte_len()) as u64;
    if config.device.cpu_kernel != probe_cascade::config::CpuKernel::Torch && config.runtime.cache_bytes < need {
        set("runtime", "cache_bytes", need as i64, "the kernel scores active probes in the cache");
    }
    Ok(notes)
}

fn measure(
    pack: &Arc<Pack>,
    config: &Config,
    mode: Mode,
    trace: &Matrix,
    args: &TuneArgs,
    oracle: &[OracleToken],
    exact: Option<&[TokenReport]>,
) -> anyhow::Result<(Figures, Vec<TokenReport>)> {
    let mut c = config.clone();
    c.runtime.mode = mode;
    let fresh_peak = reset_peak_rss();
    let settled = runtime_run(pack, &c, trace, args.warmup, args.tokens, true)?;
    let b2b = runtime_run(pack, &c, trace, args.warmup, args.tokens, false)?;
    let peak = if fresh_peak { peak_rss_bytes() } else { None };
    let sorted = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (percentile(&v, 50.0), percentile(&v, 95.0))
    };
    let (p50, p95) = sorted(&b2b.ms);
    let (s50, s95) = sorted(&settled.ms);
    let n = b2b.reports.len().max(1) as f64;
    // Fidelity of what a generation loop gets: the back-to-back run's reports.
    let fidelity = of_reports(oracle, &b2b.reports);
    let ids = |r: &TokenReport| r.top.iter().map(|e| e.id).collect::<Vec<ConceptId>>();
    let agreement = match (mode, exact) {
        (Mode::Exact, _) => Some(1.0),
        (_, None) => None,
        (_, Some(e)) => Some(e.iter().zip(&b2b.reports).map(|(a, b)| overlap(&ids(a), &ids(b))).sum::<f64>() / n),
    };
    let figures = Figures {
        p50_ms: p50,
        p95_ms: p95,
        settled_p50_ms: s50,
        settled_p95_ms: s95,
        cpu_ms: b2b.cpu_ms,
        children_per_token: b2b.reports.iter().map(|r| r.children).sum::<usize>() as f64 / n,
        loads_per_token: b2b.reports.iter().map(|r| r.loaded).sum::<usize>() as f64 / n,
        bytes_read_per_token: b2b.bytes_read as f64 / n,
        cache_hit_rate: b2b.cache_hit_rate,
        peak_ram_mb: peak.map(|b| b as f64 / 1e6),
        recall_top10: fidelity.recall_top10,
        recall_top10_scored: fidelity.recall_top10_scored,
        recall_fired: fidelity.recall_fired,
        fired_per_token: fidelity.fired_per_token,
        rank_displacement: fidelity.rank_displacement,
        agreement_with_exact: agreement,
    };
    Ok((figures, b2b.reports))
}

#[allow(clippy::too_many_arguments)]
fn write_reports(
    args: &TuneArgs,
    pack: &Pack,
    pts: &[Point],
    modes: &[Mode],
    candidates: &[(usize, usize)],
    front: &[usize],
    chosen: Option<usize>,
    objective: &Objective,
) -> anyhow::Result<()> {
    let cpu = probe_cascade::kernel::CpuInfo::detect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let on_front = |p: usize, m: usize| front.iter().any(|&i| candidates[i] == (p, m));
    let is_chosen = |p: usize, m: usize| chosen.is_some_and(|c| candidates[c] == (p, m));
    let points_json: Vec<serde_json::Value> = pts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let settings: serde_json::Map<String, serde_json::Value> = p
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(serde_json::Value::Null)))
                .collect();
            let mut point = json!({
                "index": i,
                "label": p.label,
                "preset": p.preset,
                "settings": settings,
                "notes": p.notes,
            });
            let mut front = serde_json::Map::new();
            for (m, &mode) in modes.iter().enumerate() {
                point[mode_name(mode)] = serde_json::to_value(&p.modes[m]).unwrap_or_default();
                front.insert(mode_name(mode).into(), on_front(i, m).into());
            }
            point["on_front"] = front.into();
            point
        })
        .collect();
    let chosen_json = chosen.map(|c| {
        let (p, m) = candidates[c];
        json!({"point": p, "label": pts[p].label, "mode": mode_name(modes[m]), "figures": pts[p].modes[m], "file": "chosen.toml"})
    });
    let doc = json!({
        "machine": {"cpu": cpu.to_string(), "cores": cores},
        "pack": args.pack.display().to_string(),
        "concepts": pack.len(),
        "trace": args.trace.display().to_string(),
        "base": args.base.display().to_string(),
        "grid": args.grid,
        "objective": objective.text,
        "tokens": args.tokens,
        "warmup_tokens_excluded": args.warmup,
        "points": points_json,
        "chosen": chosen_json,
    });
    std::fs::write(args.out.join("tune.json"), serde_json::to_vec_pretty(&doc)?)?;

    let mut md = format!(
        "# probe-cascade tune\n\nMachine: {cpu} ({cores} cores). Pack: {} ({} concepts, D={}, {}). Trace: {} ({} measured tokens after {} warm-up). Base: {}. Grid: `{}`. Objective: `{}`.\n\n![p50 against top-10 recall](pareto.png)\n\n",
        args.pack.display(),
        pack.len(),
        pack.hidden_dim(),
        pack.dtype(),
        args.trace.display(),
        args.tokens,
        args.warmup,
        args.base.display(),
        args.grid,
        objective.text
    );
    md.push_str("| point | mode | p50 ms | p95 ms | settled p50 | settled p95 | loads/token | MB read/token | peak RAM MB | top-10 recall | top-10 scored | fired recall | rank displ. | agrees with exact | |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for &(p, m) in candidates {
        let f = &pts[p].modes[m];
        let mark = match (is_chosen(p, m), on_front(p, m)) {
            (true, _) => "**chosen**, front",
            (false, true) => "front",
            _ => "",
        };
        md.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.2} | {} | {:.1}% | {:.1}% | {} | {:.2} | {} | {mark} |\n",
            pts[p].label,
            mode_name(modes[m]),
            f.p50_ms,
            f.p95_ms,
            f.settled_p50_ms,
            f.settled_p95_ms,
            f.loads_per_token,
            f.bytes_read_per_token / 1e6,
            f.peak_ram_mb.map_or("-".into(), |v| format!("{v:.0}")),
            f.recall_top10 * 100.0,
            f.recall_top10_scored * 100.0,
            f.recall_fired.map_or("-".into(), |v| format!("{:.1}%", v * 100.0)),
            f.rank_displacement,
            f.agreement_with_exact.map_or("-".into(), |v| format!("{:.0}%", v * 100.0)),
        ));
    }
    let notes: Vec<String> =
        pts.iter().filter(|p| !p.notes.is_empty()).map(|p| format!("- {}: {}", p.label, p.notes.join("; "))).collect();
    if !notes.is_empty() {
        md.push_str(&format!("\nAdjusted to fit the pack:\n{}\n", notes.join("\n")));
    }
    md.push_str(&match chosen {
        Some(c) => {
            let (p, m) = candidates[c];
            format!(
                "\n**Chosen** for `{}`: {} in {} mode, written as chosen.toml.\n",
                objective.text,
                pts[p].label,
                mode_name(modes[m])
            )
        }
        None => format!("\n**No candidate meets** `{}`: nothing was chosen.\n", objective.text),
    });
    md.push_str("\np50/p95: tokens back to back with no untimed gap (the runtime's deferred work lands in the next token); settled: that work done between tokens, untimed. Recall is against the exhaustive oracle (every probe scored on every token), over the back-to-back reports: top-10 recall is the share of the oracle's 10 best concepts the report holds; top-10 scored the share the cascade scored at all (the report may hide decomposed parents); fired recall the share of concepts with p > 0.5 anywhere in the pack that the cascade scored; rank displacement the mean |oracle rank − report place| of reported concepts; agreement the mean share of the exact report that the pipelined one also holds. Peak RAM is the whole process's (VmHWM, reset before each candidate). The front: no other candidate is both as fast and as good, strictly on one.\n");
    std::fs::write(args.out.join("tune.md"), md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_is_a_number_the_objective_can_name() {
        let names = Figures::names();
        assert!(names.contains(&"recall_top10".to_string()) && names.contains(&"p50_ms".to_string()));
        let f = Figures { p50_ms: 1.5, peak_ram_mb: Some(3.0), ..Default::default() };
        assert_eq!(f.get("p50_ms"), Some(1.5));
        assert_eq!(f.get("peak_ram_mb"), Some(3.0));
        assert_eq!(f.get("recall_fired"), None);
        assert_eq!(short_key("cascade.expansion.threshold.load_threshold"), "load_threshold");
    }

    #[test]
    fn fit_raises_what_exhaustive_needs_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let params = probe_cascade::synth::SynthParams {
            concepts: 40,
            hidden_dim: 64,
            ..probe_cascade::synth::SynthParams::demo()
        };
        probe_cascade::synth::write_synth_pack(dir.path(), &params, |_| {}).unwrap();
        let pack = Pack::open(dir.path()).unwrap();
        let mut doc: toml::Table =
            toml::from_str("[cascade]\nexpansion = \"exhaustive\"\nmax_loaded = 10\n[runtime]\npool_slots = 10\n")
                .unwrap();
        let notes = fit_to_pack(&pack, &mut doc).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        let config = apply(&doc, &[]).unwrap().0;
        assert_eq!((config.cascade.max_loaded, config.runtime.pool_slots), (pack.len(), pack.len()));
        assert!(fit_to_pack(&pack, &mut doc).unwrap().is_empty(), "fits now");
    }
}
