//! `probe-cascade tune` end to end on a tiny pack: a small grid with the exhaustive mode, the
//! plots decoded, chosen.toml loaded and run, and bad grids and objectives named.

mod common;

use common::*;
use probe_cascade::config::Config;

fn tune(f: &Fixture, grid: &str, objective: &str, out: &std::path::Path) -> std::process::Command {
    let mut c = bin();
    c.arg("tune").arg("--pack").arg(&f.pack).arg("--trace").arg(&f.trace).arg("--base").arg(config());
    c.args(["--grid", grid, "--objective", objective, "--tokens", "12", "--warmup", "2", "--out"]).arg(out);
    c
}

#[test]
fn a_tiny_grid_runs_end_to_end() {
    let f = fixture();
    let out = f.root.join("tune");
    let grid = "cascade.expansion.threshold.load_threshold=0.2,0.6;cascade.expansion=exhaustive;\
                cascade.pruning.top_k.keep_top_k=8,30";
    let said = run_ok(&mut tune(&f, grid, "max recall_top10 where p50_ms <= 10000", &out));
    assert!(said.contains("chosen:"), "{said}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("tune.json")).unwrap()).unwrap();
    let points = doc["points"].as_array().unwrap();
    // (2 thresholds + exhaustive) × 2 top-k values, and the three shipped presets.
    assert_eq!(points.len(), 9);
    assert_eq!(points.iter().filter(|p| p["preset"] == true).count(), 3);
    for p in points {
        for mode in ["exact", "pipelined"] {
            let m = &p[mode];
            for key in [
                "p50_ms",
                "p95_ms",
                "settled_p50_ms",
                "settled_p95_ms",
                "loads_per_token",
                "bytes_read_per_token",
                "recall_top10",
                "rank_displacement",
                "agreement_with_exact",
            ] {
                assert!(m[key].as_f64().is_some_and(f64::is_finite), "{} {mode}: {key} = {}", p["label"], m[key]);
            }
            let recall = m["recall_top10"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&recall), "{}", p["label"]);
        }
        assert_eq!(p["exact"]["agreement_with_exact"], 1.0);
    }
    assert!(points.iter().all(|p| p["pipelined"]["agreement_with_exact"].as_f64().unwrap() <= 1.0));
    // The exhaustive mode scores every probe on every token: in exact mode it finds the
    // oracle's top 10 every time, whatever the pruning.
    let exhaustive: Vec<_> = points.iter().filter(|p| p["settings"]["cascade.expansion"] == "exhaustive").collect();
    assert_eq!(exhaustive.len(), 2);
    for p in &exhaustive {
        assert_eq!(p["exact"]["recall_top10"], 1.0, "{}", p["label"]);
        assert_eq!(p["exact"]["rank_displacement"], 0.0, "{}", p["label"]);
    }
    // The chosen candidate has the best recall of all (the condition admits every one).
    let best = points
        .iter()
        .flat_map(|p| ["exact", "pipelined"].map(|m| p[m]["recall_top10"].as_f64().unwrap()))
        .fold(0.0, f64::max);
    assert_eq!(doc["chosen"]["figures"]["recall_top10"].as_f64(), Some(best));
    assert!(points.iter().any(|p| p["on_front"]["exact"] == true || p["on_front"]["pipelined"] == true));
    let md = std::fs::read_to_string(out.join("tune.md")).unwrap();
    assert!(md.contains("**chosen**") && md.contains("pareto.png") && md.contains("preset decompose"), "{md}");

    // The plots decode: a PNG of the drawn size, an SVG with a dot per candidate.
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(out.join("pareto.png")).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    assert_eq!((frame.width, frame.height), (1100, 720));
    assert!(buf.iter().any(|&b| b != 255), "the PNG is not blank");
    let svg = std::fs::read_to_string(out.join("pareto.svg")).unwrap();
    let tree = roxmltree::Document::parse(&svg).unwrap();
    assert_eq!(tree.root_element().tag_name().name(), "svg");
    let circles = tree.descendants().filter(|n| n.tag_name().name() == "circle").count();
    assert!(circles >= 2 * points.len(), "{circles} circles for {} candidates", 2 * points.len());
    assert!(svg.contains("realtime") && svg.contains("Pareto front"), "presets and the front are labelled");

    // chosen.toml loads and `run` accepts it.
    let chosen = out.join("chosen.toml");
    let config = Config::load(&chosen).unwrap();
    assert_eq!(format!("{:?}", config.runtime.mode).to_lowercase(), doc["chosen"]["mode"].as_str().unwrap());
    let ran = run_ok(
        bin()
            .arg("run")
            .arg("--config")
            .arg(&chosen)
            .arg("--pack")
            .arg(&f.pack)
            .arg("--trace")
            .arg(&f.trace)
            .args(["--engine", "runtime", "--oracle"]),
    );
    assert!(ran.contains("against the oracle") && ran.contains("12 tokens"), "{ran}");
}

#[test]
fn bad_grids_and_objectives_are_named_before_anything_runs() {
    let f = fixture();
    let out = f.root.join("bad");
    let e = failed(&tune(&f, "cascade.pruning.top_k.keep_topk=3", "max recall_top10", &out).output().unwrap());
    assert!(e.contains("cascade.pruning.top_k.keep_topk"), "{e}");
    let e =
        failed(&tune(&f, "cascade.expansion.threshold.load_threshold=2", "max recall_top10", &out).output().unwrap());
    assert!(e.contains("cascade.expansion.threshold.load_threshold") && e.contains("[0, 1)"), "{e}");
    let e = failed(&tune(&f, "runtime.mode=fast", "max recall_top10", &out).output().unwrap());
    assert!(e.contains("runtime.mode") && e.contains("`fast`"), "{e}");
    let e = failed(&tune(&f, "cascade.report_top_k=5", "max recal", &out).output().unwrap());
    assert!(e.contains("unknown figure `recal`"), "{e}");
    assert!(!out.exists(), "nothing is written for a bad grid or objective");

    // A condition no candidate meets: the tables are written, chosen.toml is not. Only the
    // modes the grid names are measured.
    let out = f.root.join("none");
    let mut cmd = tune(&f, "cascade.report_top_k=5;runtime.mode=pipelined", "max recall_top10 where p50_ms < 0", &out);
    let e = failed(&cmd.arg("--no-presets").output().unwrap());
    assert!(e.contains("no candidate meets") && e.contains("p50_ms < 0"), "{e}");
    assert!(out.join("tune.md").exists() && !out.join("chosen.toml").exists());
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("tune.json")).unwrap()).unwrap();
    let points = doc["points"].as_array().unwrap();
    assert_eq!(points.len(), 1);
    assert!(points[0].get("exact").is_none() && points[0]["pipelined"]["agreement_with_exact"].is_null());
}
