//! The command line end to end: `pack synth/inspect/verify`, `trace synth` and `run`, with the
//! bad inputs a user will hit (wrong width, NaN, missing or corrupt probe files, bad configs).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use probe_cascade::npy::{self, Matrix};

#[path = "../../tests/common/fs.rs"]
mod fs_support;
use fs_support::copy_dir;

fn run_cmd(f: &Fixture, trace: &Path) -> Command {
    let mut c = bin();
    c.arg("run").arg("--config").arg(config()).arg("--pack").arg(&f.pack).arg("--trace").arg(trace);
    c
}

#[test]
fn synth_inspect_verify_and_run() {
    let f = fixture();
    let inspect = run_ok(bin().args(["pack", "inspect"]).arg(&f.pack));
    assert!(inspect.contains("concepts   60") && inspect.contains("dtype      f32"), "{inspect}");
    let verify = run_ok(bin().args(["pack", "verify"]).arg(&f.pack));
    assert!(verify.contains("60 probes verified"), "{verify}");
    let json = f.root.join("out.json");
    let table = run_ok(run_cmd(&f, &f.trace).arg("--json").arg(&json));
    assert!(table.contains("children") && table.contains("p50"), "{table}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let tokens = doc["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 12);
    for key in ["index", "ms", "children", "loaded", "unloaded", "active", "top", "stages"] {
        assert!(tokens[0].get(key).is_some(), "token entries carry {key}");
    }
    for key in ["name", "layer", "prob", "logit"] {
        assert!(tokens[0]["top"][0].get(key).is_some(), "top entries carry {key}");
    }
    for key in ["initial_scoring", "expansion_lookup", "loading", "new_scoring", "pruning", "sorting"] {
        assert!(tokens[0]["stages"][key].is_f64(), "stages carry {key}");
    }
    for key in ["avg_ms", "p50_ms", "p95_ms", "max_ms", "final_active"] {
        assert!(doc["summary"].get(key).is_some(), "summary carries {key}");
    }
    // The naive engine gives the same reports.
    let naive_json = f.root.join("naive.json");
    run_ok(run_cmd(&f, &f.trace).args(["--engine", "naive", "--json"]).arg(&naive_json));
    let naive: serde_json::Value = serde_json::from_slice(&std::fs::read(&naive_json).unwrap()).unwrap();
    let names = |d: &serde_json::Value| -> Vec<Vec<String>> {
        d["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["top"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect())
            .collect()
    };
    assert_eq!(names(&doc), names(&naive));
    // So does the actor runtime in exact mode.
    let runtime_json = f.root.join("runtime.json");
    run_ok(run_cmd(&f, &f.trace).args(["--engine", "runtime", "--mode", "exact", "--json"]).arg(&runtime_json));
    let runtime: serde_json::Value = serde_json::from_slice(&std::fs::read(&runtime_json).unwrap()).unwrap();
    assert_eq!(runtime["engine"], "runtime");
    assert_eq!(names(&doc), names(&runtime));
    // The CPU kernel scored the probes where they lie: installs, but no weight bytes copied.
    let t = &runtime["summary"]["weight_traffic"];
    assert!(t["installs"].as_u64().unwrap() > 0, "{t}");
    assert_eq!((t["install_bytes_copied"].as_u64(), t["move_bytes_copied"].as_u64()), (Some(0), Some(0)), "{t}");
    // The busy preset asks for more children than the calm default.
    let busy = f.root.join("busy.npy");
    run_ok(
        bin()
            .args(["trace", "synth", "--tokens", "12", "--preset", "busy", "--pack"])
            .arg(&f.pack)
            .arg("--out")
            .arg(&busy),
    );
    let busy_json = f.root.join("busy.json");
    run_ok(run_cmd(&f, &busy).arg("--json").arg(&busy_json));
    let busy: serde_json::Value = serde_json::from_slice(&std::fs::read(&busy_json).unwrap()).unwrap();
    let children = |d: &serde_json::Value| d["summary"]["children_per_token"].as_f64().unwrap();
    assert!(children(&busy) > children(&doc), "busy {} vs demo {}", children(&busy), children(&doc));
}

#[test]
fn a_flipped_weight_byte_fails_verify_naming_the_probe() {
    let f = fixture();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.pack.join("manifest.json")).unwrap()).unwrap();
    let c = &manifest["concepts"][17];
    let shard = f.pack.join(manifest["shards"][c["weights"]["shard"].as_u64().unwrap() as usize].as_str().unwrap());
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = c["weights"]["offset"].as_u64().unwrap() as usize + 1000;
    bytes[at] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let out = failed(&bin().args(["pack", "verify"]).arg(&f.pack).output().unwrap());
    let label = format!("{}@{}", c["name"].as_str().unwrap(), c["layer"]);
    assert!(out.contains(&label) && out.contains("checksum"), "{out}");
}

#[test]
fn a_trace_of_the_wrong_width_names_the_token() {
    let f = fixture();
    let bad = f.root.join("wide.npy");
    npy::write(&bad, &Matrix { rows: 2, cols: 33, data: vec![0.5; 66] }).unwrap();
    let out = failed(&run_cmd(&f, &bad).output().unwrap());
    assert!(out.contains("token 0") && out.contains("33 values") && out.contains("D=32"), "{out}");
}

#[test]
fn nan_stops_the_run_or_is_skipped_on_request() {
    let f = fixture();
    let mut m = npy::read(&f.trace).unwrap();
    m.data[5 * 32 + 7] = f32::NAN;
    let bad = f.root.join("nan.npy");
    npy::write(&bad, &m).unwrap();
    let out = failed(&run_cmd(&f, &bad).output().unwrap());
    assert!(out.contains("token 5") && out.contains("[7] is NaN"), "{out}");
    let json = f.root.join("skip.json");
    run_ok(run_cmd(&f, &bad).arg("--skip-bad-tokens").arg("--json").arg(&json));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let tokens = doc["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 12, "every token gets an answer or an error");
    assert!(tokens[5]["error"].as_str().unwrap().contains("NaN"));
    assert!(tokens[6]["top"].is_array());
    assert_eq!(doc["summary"]["errors"], 1);
}

#[test]
fn a_missing_probe_file_is_an_error_naming_the_file() {
    let f = fixture();
    // Shard 3 holds concepts 48..60 (layer 2): the cascade reaches them only through expansion.
    std::fs::remove_file(f.pack.join("weights-00003.safetensors")).unwrap();
    let out = failed(&run_cmd(&f, &f.trace).output().unwrap());
    assert!(out.contains("weights-00003.safetensors"), "{out}");
}

#[test]
fn a_corrupt_probe_fails_the_token_that_loads_it() {
    let f = fixture();
    // Corrupt every layer-1 probe: the first token that expands a root must fail.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.pack.join("manifest.json")).unwrap()).unwrap();
    for c in manifest["concepts"].as_array().unwrap().iter().filter(|c| c["layer"] == 1) {
        let shard = f.pack.join(manifest["shards"][c["weights"]["shard"].as_u64().unwrap() as usize].as_str().unwrap());
        let mut bytes = std::fs::read(&shard).unwrap();
        bytes[c["weights"]["offset"].as_u64().unwrap() as usize + 3] ^= 0x40;
        std::fs::write(&shard, bytes).unwrap();
    }
    let out = failed(&run_cmd(&f, &f.trace).output().unwrap());
    assert!(out.contains("token ") && out.contains("checksum mismatch") && out.contains("@1"), "{out}");
    // With --skip-bad-tokens every token still gets an entry.
    let json = f.root.join("skip.json");
    run_ok(run_cmd(&f, &f.trace).arg("--skip-bad-tokens").arg("--json").arg(&json));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["tokens"].as_array().unwrap().len(), 12);
    assert!(doc["summary"]["errors"].as_u64().unwrap() > 0);
}

#[test]
fn bad_configs_name_the_key_and_file() {
    let f = fixture();
    let cfg = f.root.join("bad.toml");
    let run = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        let mut c = bin();
        c.arg("run").arg("--config").arg(&cfg).arg("--pack").arg(&f.pack).arg("--trace").arg(&f.trace);
        failed(&c.output().unwrap())
    };
    let out = run("[cascade]\nkeep_top_k = 30\n");
    assert!(out.contains("bad.toml") && out.contains("keep_top_k"), "{out}");
    let out = run("[cascade.expansion.threshold]\nload_threshold = -0.5\n");
    assert!(out.contains("bad.toml") && out.contains("cascade.expansion.threshold.load_threshold"), "{out}");
    let out = run("[cascade]\nbase_layers = [9]\n");
    assert!(out.contains("cascade.base_layers"), "{out}");
    let out = run("[device]\ndevice = \"cuda:7\"\n");
    assert!(out.contains("cuda:7"), "{out}");
    let missing = f.root.join("nope.toml");
    let mut c = bin();
    c.arg("run").arg("--config").arg(&missing).arg("--pack").arg(&f.pack).arg("--trace").arg(&f.trace);
    let out = failed(&c.output().unwrap());
    assert!(out.contains("nope.toml"), "{out}");
}

#[test]
fn bench_writes_every_row() {
    let f = fixture();
    let out = f.root.join("bench");
    run_ok(
        bin()
            .args(["bench", "--oracle", "--tokens", "6", "--warmup", "2", "--pack"])
            .arg(&f.pack)
            .arg("--trace")
            .arg(&f.trace)
            .arg("--out")
            .arg(&out),
    );
    let md = std::fs::read_to_string(out.join("bench.md")).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("bench.json")).unwrap()).unwrap();
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 16, "4 configurations × 4 engines");
    for key in [
        "engine",
        "mode",
        "config",
        "avg_ms",
        "p50_ms",
        "p95_ms",
        "max_ms",
        "final_active",
        "loads_per_token",
        "ratio_to_naive_p50",
        "b2b_p50_ms",
        "b2b_avg_ms",
        "b2b_cpu_ms",
    ] {
        assert!(rows.iter().all(|r| r.get(key).is_some()), "rows carry {key}");
    }
    assert!(rows.iter().all(|r| r["per_token_ms"].as_array().unwrap().len() == 6));
    assert!(rows.iter().all(|r| r["b2b_per_token_ms"].as_array().unwrap().len() == 6));
    assert!(rows.iter().all(|r| r["b2b_p50_ms"].as_f64().unwrap() > 0.0 && r["b2b_cpu_ms"].as_f64().unwrap() > 0.0));
    assert!(doc["machine"]["cpu_info"]["default_path"].is_string());
    assert!(md.contains("kernel paths"), "bench.md names the CPU's kernel paths");
    assert_eq!(doc["warmup_tokens_excluded"], 2);
    assert_eq!(doc["page_cache"], "warm");
    assert!(doc["machine"]["cores"].as_u64().unwrap() >= 1);
    for config in ["seed-no-pruning", "seed-top-50", "seed-top-30", "decompose"] {
        assert!(md.contains(config), "{config} in bench.md");
    }
    // Naive rows are the baseline.
    assert!(rows.iter().filter(|r| r["engine"] == "naive").all(|r| r["ratio_to_naive_p50"] == 1.0));
    // --oracle: every row's recall against the exhaustive oracle; engines in exact mode agree.
    assert!(md.contains("top-10 recall"), "{md}");
    for r in rows {
        let recall = r["fidelity"]["recall_top10"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&recall), "{r}");
    }
    for config in ["seed-top-30", "decompose"] {
        let recalls: Vec<f64> = rows
            .iter()
            .filter(|r| r["config"] == config && r["mode"] != "pipelined")
            .map(|r| r["fidelity"]["recall_top10"].as_f64().unwrap())
            .collect();
        assert!(recalls.windows(2).all(|w| w[0] == w[1]), "{config}: {recalls:?}");
    }
    // Without pruning the seed's cascade scores more, so it misses no more than with top-30.
    let of = |c: &str| {
        rows.iter().find(|r| r["config"] == c && r["engine"] == "reference").unwrap()["fidelity"]["recall_fired"]
            .as_f64()
            .unwrap_or(1.0)
    };
    assert!(of("seed-no-pruning") >= of("seed-top-30"));
}

#[test]
fn import_hatcat_prints_its_summary_and_names_bad_files() {
    let hatcat = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hatcat");
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("imported");
    let summary = run_ok(
        bin()
            .args(["pack", "import-hatcat"])
            .arg(hatcat.join("hierarchy_old"))
            .arg(hatcat.join("lenses"))
            .args(["--dtype", "bf16", "--out"])
            .arg(&pack),
    );
    for want in [
        "imported 11 probes",
        "D=16, bf16",
        "layer 2: 5 / 6",
        "skipped, no probe file: 1",
        "Motion@2",
        "links: 9 from hierarchy.json (won where the files disagree)",
        "logit check: worst difference",
    ] {
        assert!(summary.contains(want), "missing {want:?} in:\n{summary}");
    }
    let verify = run_ok(bin().args(["pack", "verify"]).arg(&pack));
    assert!(verify.contains("11 probes verified"), "{verify}");
    let trace = dir.path().join("trace.npy");
    run_ok(bin().args(["trace", "synth", "--tokens", "5", "--pack"]).arg(&pack).arg("--out").arg(&trace));
    let report =
        run_ok(bin().arg("run").arg("--config").arg(config()).arg("--pack").arg(&pack).arg("--trace").arg(&trace));
    assert!(report.contains("over 5 tokens (0 errors)"), "{report}");

    let out = bin()
        .args(["pack", "import-hatcat"])
        .arg(hatcat.join("hierarchy_bad"))
        .arg(hatcat.join("lenses_bad"))
        .arg("--out")
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    let message = failed(&out);
    assert!(
        message.contains("Truncated.pt: probe for Truncated@1: not a readable torch.save zip archive"),
        "{message}"
    );
    let skipped = run_ok(
        bin()
            .args(["pack", "import-hatcat", "--skip-bad"])
            .arg(hatcat.join("hierarchy_bad"))
            .arg(hatcat.join("lenses_bad"))
            .arg("--out")
            .arg(dir.path().join("bad")),
    );
    assert!(skipped.contains("imported 2 probes") && skipped.contains("skipped, bad probe file: 2"), "{skipped}");
}

#[test]
fn run_sessions_writes_each_sessions_tokens_from_its_offset() {
    let f = fixture();
    let json_path = f.root.join("sessions.json");
    let out = run_ok(
        run_cmd(&f, &f.trace)
            .args(["--engine", "runtime", "--sessions", "3", "--offset-stride", "5", "--json"])
            .arg(&json_path),
    );
    assert!(out.contains("3 sessions × 12 tokens") && out.contains("tokens/s"), "{out}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    let sessions = doc["sessions"].as_array().unwrap();
    assert_eq!(sessions.iter().map(|s| s["offset"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 5, 10]);
    assert!(sessions.iter().all(|s| s["tokens"].as_array().unwrap().len() == 12));
    assert_eq!(doc["summary"]["tokens"], 36);
    assert!(doc["summary"]["steps"]["requests"].as_u64().unwrap() >= 36);
    // Session 0 is the stream from token 0: its reports are the single run's, bit for bit.
    let single_path = f.root.join("single.json");
    run_ok(run_cmd(&f, &f.trace).args(["--engine", "runtime", "--json"]).arg(&single_path));
    let single: serde_json::Value = serde_json::from_slice(&std::fs::read(&single_path).unwrap()).unwrap();
    for t in 0..12 {
        let (a, b) = (&sessions[0]["tokens"][t], &single["tokens"][t]);
        assert_eq!(a["top"], b["top"], "token {t}");
        assert_eq!((&a["loaded"], &a["active"]), (&b["loaded"], &b["active"]), "token {t}");
    }
    // --sessions needs the runtime engine.
    let refused = run_cmd(&f, &f.trace).args(["--sessions", "2"]).output().unwrap();
    assert!(!refused.status.success() && failed(&refused).contains("--engine runtime"));
}

#[test]
fn bench_sessions_writes_a_row_per_count_and_separate_cascades() {
    let f = fixture();
    let out = f.root.join("bench-sessions");
    run_ok(
        bin()
            .args(["bench", "--tokens", "6", "--warmup", "2", "--sessions", "1,2,4", "--pack"])
            .arg(&f.pack)
            .arg("--trace")
            .arg(&f.trace)
            .arg("--out")
            .arg(&out),
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("bench.json")).unwrap()).unwrap();
    let rows = doc["sessions"].as_array().unwrap();
    let engines: Vec<(String, u64)> =
        rows.iter().map(|r| (r["engine"].as_str().unwrap().to_string(), r["sessions"].as_u64().unwrap())).collect();
    assert_eq!(
        engines,
        [
            ("runtime-sessions".into(), 1),
            ("runtime-sessions".into(), 2),
            ("runtime-sessions".into(), 4),
            ("separate-cascades".into(), 8)
        ]
    );
    for key in ["tokens_per_s", "p50_ms", "p95_ms", "union_probes_per_step", "ram_bytes", "arena_bytes"] {
        assert!(rows.iter().all(|r| r.get(key).is_some()), "rows carry {key}");
    }
    assert!(rows.iter().all(|r| r["tokens_per_s"].as_f64().unwrap() > 0.0));
    assert_eq!(rows[2]["tokens"], 24, "4 sessions × 6 tokens");
    assert!(rows[..3].iter().all(|r| r["union_probes_per_step"].as_f64().unwrap() > 0.0));
    assert!(doc["rows"].as_array().unwrap().is_empty(), "the engine table is skipped without --engines");
    let md = std::fs::read_to_string(out.join("bench.md")).unwrap();
    assert!(md.contains("## Sessions") && md.contains("separate-cascades"), "{md}");
}

#[test]
fn a_closed_stdout_ends_the_command_quietly_not_with_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let f = fixture();
    // The reader is gone before the command writes a byte (`probe-cascade ... | head -0`).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = bin()
        .args(["pack", "inspect"])
        .arg(&f.pack)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {stderr}", out.status);
}

#[test]
fn a_missing_config_file_is_named_once_with_its_cause() {
    let f = fixture();
    let missing = f.root.join("missing.toml");
    let mut c = bin();
    c.arg("run").arg("--config").arg(&missing).arg("--pack").arg(&f.pack).arg("--trace").arg(&f.trace);
    let out = failed(&c.output().unwrap());
    assert!(out.contains("missing.toml") && out.contains("os error 2"), "{out}");
    assert_eq!(out.matches("No such file or directory").count(), 1, "the cause is said once: {out}");
}

/// A headspace pack (lenses over model layers 4 and 7) through every command that reads a
/// trace: its rows hold the two layers side by side. A trace of one layer's width is refused
/// naming the layers.
#[test]
fn every_command_reads_traces_of_lenses_over_model_layers() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/headspace/pack");
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("pack");
    let said = run_ok(bin().args(["pack", "import-headspace"]).arg(&fixture).arg("--out").arg(&pack));
    assert!(said.contains("8 lenses (12 probes; 4 lenses of several probes)"), "{said}");
    let inspect = run_ok(bin().args(["pack", "inspect"]).arg(&pack));
    assert!(
        inspect.contains("format     v2") && inspect.contains("12 probes over model layers [4, 7], 9 calibrated"),
        "{inspect}"
    );
    let verify = run_ok(bin().args(["pack", "verify"]).arg(&pack));
    assert!(verify.contains("12 probes verified"), "{verify}");
    let rows = 24;
    let data: Vec<f32> = (0..rows * 32).map(|i| ((i * 37 % 101) as f32 / 10.0 - 5.0).sin() * 2.0).collect();
    let trace = dir.path().join("trace.npy");
    npy::write(&trace, &Matrix { rows, cols: 32, data }).unwrap();
    let decompose = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/decompose.toml");
    let run_on = |trace: &Path| {
        let mut c = bin();
        c.arg("run").arg("--config").arg(&decompose).arg("--pack").arg(&pack).arg("--trace").arg(trace);
        c
    };
    for engine in ["reference", "runtime", "oracle"] {
        let out = run_ok(run_on(&trace).args(["--engine", engine, "--oracle"]));
        assert!(out.contains("over 24 tokens (0 errors)") && out.contains("against the oracle"), "{engine}: {out}");
    }
    let sessions = run_ok(run_on(&trace).args(["--engine", "runtime", "--sessions", "3"]));
    assert!(sessions.contains("3 sessions"), "{sessions}");
    let out = dir.path().join("bench");
    run_ok(
        bin()
            .args([
                "bench",
                "--tokens",
                "6",
                "--warmup",
                "2",
                "--sessions",
                "1,2",
                "--engines",
                "reference,runtime-exact,runtime-pipelined",
                "--pack",
            ])
            .arg(&pack)
            .arg("--trace")
            .arg(&trace)
            .arg("--out")
            .arg(&out),
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("bench.json")).unwrap()).unwrap();
    assert!(!doc["rows"].as_array().unwrap().is_empty() && !doc["sessions"].as_array().unwrap().is_empty());
    let tuned = dir.path().join("tune");
    let mut tune = bin();
    tune.arg("tune").arg("--pack").arg(&pack).arg("--trace").arg(&trace).arg("--base").arg(&decompose);
    tune.args(["--grid", "cascade.report_top_k=3,5", "--objective", "max recall_top10", "--tokens", "6"]);
    run_ok(tune.args(["--warmup", "2", "--no-presets", "--out"]).arg(&tuned));
    assert!(tuned.join("chosen.toml").exists());
    let soaked = dir.path().join("soak");
    let mut soak = bin();
    soak.arg("soak").arg("--pack").arg(&pack).arg("--trace").arg(&trace);
    run_ok(soak.args(["--tokens", "200", "--sessions", "2", "--samples", "10", "--out"]).arg(&soaked));
    // One layer's width: refused before any token, naming the layers.
    let narrow = dir.path().join("narrow.npy");
    npy::write(&narrow, &Matrix { rows: 2, cols: 16, data: vec![0.5; 32] }).unwrap();
    let e = failed(&run_on(&narrow).output().unwrap());
    assert!(e.contains("model layers [4, 7]") && e.contains("give 32 values per token"), "{e}");
}

#[test]
fn a_headspace_pack_with_simplexes_and_concept_calibration_imports_inspects_and_runs() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/headspace");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("headspace");
    copy_dir(&fixture.join("pack"), &src);
    copy_dir(&fixture.join("simplex"), &src.join("simplex"));
    std::fs::copy(fixture.join("calibration.json"), src.join("calibration.json")).unwrap();
    let pack = dir.path().join("pack");
    let said = run_ok(bin().args(["pack", "import-headspace"]).arg(&src).arg("--out").arg(&pack));
    assert!(said.contains("concept calibration (calibration.json): 5 of 8 lenses"), "{said}");
    assert!(said.contains("simplex lenses (always on, 3 poles each): Autonomy"), "{said}");
    assert!(said.contains("left out: simplex Candor") && said.contains("Old_tripole.pt"), "{said}");
    let inspect = run_ok(bin().args(["pack", "inspect"]).arg(&pack));
    assert!(inspect.contains("simplex    Autonomy (always on): poles positive, neutral, negative, model layer 4"));
    assert!(inspect.contains("5 of 8 lenses have statistics"), "{inspect}");
    let rows = 12;
    let data: Vec<f32> = (0..rows * 32).map(|i| ((i * 37 % 101) as f32 / 10.0 - 5.0).sin() * 2.0).collect();
    let trace = dir.path().join("trace.npy");
    npy::write(&trace, &Matrix { rows, cols: 32, data }).unwrap();
    let json = dir.path().join("run.json");
    let decompose = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/decompose.toml");
    let out = run_ok(
        bin()
            .arg("run")
            .arg("--config")
            .arg(&decompose)
            .arg("--pack")
            .arg(&pack)
            .arg("--trace")
            .arg(&trace)
            .args(["--engine", "runtime", "--json"])
            .arg(&json),
    );
    assert!(out.contains("simplex Autonomy/positive"), "{out}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let tokens = v["tokens"].as_array().expect("tokens");
    let last = &tokens[rows - 1]["simplex"];
    assert_eq!(last.as_array().map(Vec::len), Some(3), "{last}");
    assert!(last[0]["deviation"].is_number() && tokens[0]["simplex"][0]["deviation"].is_null(), "{last}");
}

/// The data a page of the viewer carries (`<script type="application/json" id="pc-data">`).
fn page_data(page: &str) -> serde_json::Value {
    let open = r#"<script type="application/json" id="pc-data">"#;
    let start = page.find(open).expect("the page carries its data") + open.len();
    let end = start + page[start..].find("</script>").unwrap();
    serde_json::from_str(&page[start..end].replace("<\\/", "</")).unwrap()
}

#[test]
fn run_html_writes_one_offline_page_with_every_token_its_text_concepts_and_alerts() {
    let f = fixture();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.pack.join("manifest.json")).unwrap()).unwrap();
    let roots: Vec<&str> = manifest["concepts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["layer"] == 0)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let watch = f.root.join("roots.txt");
    std::fs::write(&watch, roots.join("\n")).unwrap();
    let texts: Vec<String> = (0..12).map(|i| format!(" tok</script>{i}")).collect();
    let text_file = f.root.join("texts.json");
    std::fs::write(&text_file, serde_json::to_vec(&texts).unwrap()).unwrap();
    let (html, json) = (f.root.join("run.html"), f.root.join("run.json"));
    let out = run_ok(
        run_cmd(&f, &f.trace)
            .args(["--engine", "runtime", "--watch"])
            .arg(&watch)
            .arg("--token-text")
            .arg(&text_file)
            .arg("--html")
            .arg(&html)
            .arg("--json")
            .arg(&json),
    );
    assert!(out.contains("wrote"), "{out}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(!page.contains("https://") && !page.contains("src="), "the page loads nothing");
    let data = page_data(&page);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let events = data["sessions"][0]["events"].as_array().unwrap();
    let tokens = doc["tokens"].as_array().unwrap();
    assert_eq!(events.len(), tokens.len());
    let mut alerts = 0;
    for (i, (e, t)) in events.iter().zip(tokens).enumerate() {
        assert_eq!(e["token"], t["index"]);
        assert_eq!(e["text"], texts[i], "token {i}'s text, even with a </script> in it");
        // The same concepts and scores (the JSON file writes f32s widened to f64).
        let scored = |v: &serde_json::Value, key: &str| -> Vec<(String, f32)> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|d| (d[key].as_str().unwrap().into(), d["prob"].as_f64().unwrap_or(-1.0) as f32))
                .collect()
        };
        assert_eq!(
            scored(&e["top"], "name"),
            scored(&t["top"], "name"),
            "token {i}: the page's top concepts are the run's"
        );
        assert_eq!(e["alerts"].as_array().unwrap().len(), t["alerts"].as_array().unwrap().len());
        alerts += e["alerts"].as_array().unwrap().len();
    }
    assert!(alerts > 0, "watching the roots raises alerts");
    assert_eq!(data["pack"]["concepts"], manifest["concepts"].as_array().unwrap().len());
    assert_eq!(data["pack"]["watched"], serde_json::json!(roots), "the watched concepts get sparklines from the start");
    // --token-text alone names nothing.
    let err = failed(&run_cmd(&f, &f.trace).arg("--token-text").arg(&text_file).output().unwrap());
    assert!(err.contains("--token-text") && err.contains("--html"), "{err}");
}
