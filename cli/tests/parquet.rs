//! `run --traces ... --parquet ...` end to end: the dataset's tables hold every recording's
//! reports, a bad recording is a `failures` row while the rest go on, and a run killed half-way
//! (SIGKILL, from outside) and resumed gives the same rows as a clean run, bit for bit.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow_array::{Array, RecordBatch};
use common::*;
use probe_cascade::npy::{self, Matrix};

const TABLES: [&str; 5] = ["detections", "tokens", "alerts", "simplex", "failures"];

/// A tiny pack and `n` busy recordings of 300 tokens, plus one with a NaN at token 7.
fn recordings(n: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("pack");
    let recs = dir.path().join("recs");
    std::fs::create_dir(&recs).unwrap();
    run_ok(bin().args(["pack", "synth", "--preset", "tiny", "--out"]).arg(&pack));
    for i in 0..n {
        let out = recs.join(format!("rec{i:02}.npy"));
        run_ok(
            bin()
                .args(["trace", "synth", "--preset", "busy", "--tokens", "300", "--seed"])
                .arg(i.to_string())
                .arg("--pack")
                .arg(&pack)
                .arg("--out")
                .arg(&out),
        );
    }
    let mut bad = npy::read(&recs.join("rec00.npy")).unwrap();
    bad.data[7 * bad.cols + 2] = f32::NAN;
    npy::write(&recs.join("bad.npy"), &Matrix { rows: 20, cols: bad.cols, data: bad.data[..20 * bad.cols].to_vec() })
        .unwrap();
    (dir, pack, recs)
}

fn parquet_run(pack: &Path, recs: &Path, out: &Path) -> std::process::Command {
    let mut c = bin();
    c.arg("run")
        .arg("--config")
        .arg(config())
        .arg("--pack")
        .arg(pack)
        .arg("--traces")
        .arg(recs)
        .arg("--parquet")
        .arg(out);
    c
}

fn batches(dir: &Path, table: &str) -> Vec<RecordBatch> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(table))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let file = std::fs::File::open(&f).unwrap();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
        out.extend(reader.map(|b| b.unwrap()));
    }
    out
}

/// Every row of a table, each column shown exactly (floats by their shortest round-trip form),
/// sorted; the wall-time column `ms` left out, as it differs between runs.
fn rows(dir: &Path, table: &str) -> Vec<String> {
    let mut rows = Vec::new();
    for b in batches(dir, table) {
        let schema = b.schema();
        for i in 0..b.num_rows() {
            let cells: Vec<String> = b
                .columns()
                .iter()
                .zip(schema.fields())
                .filter(|(_, f)| f.name() != "ms")
                .map(|(c, f)| format!("{}={:?}", f.name(), c.slice(i, 1)))
                .collect();
            rows.push(cells.join(" "));
        }
    }
    rows.sort();
    rows
}

/// Recordings in the parts committed so far (their commit records).
fn committed_recordings(out: &Path) -> usize {
    let Ok(dir) = std::fs::read_dir(out.join("_parts")) else { return 0 };
    dir.map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let c: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            c["recordings"].as_array().unwrap().len()
        })
        .sum()
}

#[test]
fn the_dataset_holds_every_recording_and_names_a_bad_one_in_failures() {
    let (dir, pack, recs) = recordings(3);
    let out = dir.path().join("out");
    let printed = run_ok(parquet_run(&pack, &recs, &out).args(["--concurrency", "4"]));
    assert!(printed.contains("4 recordings") && printed.contains("1 failed"), "{printed}");
    let tokens = rows(&out, "tokens");
    assert_eq!(tokens.len(), 900, "3 recordings of 300 tokens; the bad one has none");
    let failures = rows(&out, "failures");
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].contains("bad") && failures[0].contains("token 7") && failures[0].contains("NaN"),
        "{failures:?}"
    );
    // The detections are what `run --trace` reports for the same recording, token by token.
    let json = dir.path().join("one.json");
    run_ok(
        bin()
            .arg("run")
            .arg("--config")
            .arg(config())
            .arg("--pack")
            .arg(&pack)
            .arg("--engine")
            .arg("runtime")
            .arg("--trace")
            .arg(recs.join("rec01.npy"))
            .arg("--json")
            .arg(&json),
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let mut from_json: Vec<(u32, u16, String, u32)> = Vec::new();
    for t in doc["tokens"].as_array().unwrap() {
        for (rank, e) in t["top"].as_array().unwrap().iter().enumerate() {
            let logit = e["logit"].as_f64().unwrap() as f32;
            from_json.push((
                t["index"].as_u64().unwrap() as u32,
                rank as u16 + 1,
                e["name"].as_str().unwrap().into(),
                logit.to_bits(),
            ));
        }
    }
    let mut from_parquet = Vec::new();
    for b in batches(&out, "detections") {
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let rec = col("recording");
        let rec = rec.as_any().downcast_ref::<arrow_array::StringArray>().unwrap();
        let token = col("token");
        let token = token.as_any().downcast_ref::<arrow_array::UInt32Array>().unwrap();
        let rank = col("rank");
        let rank = rank.as_any().downcast_ref::<arrow_array::UInt16Array>().unwrap();
        let name = col("name");
        let name = name.as_any().downcast_ref::<arrow_array::StringArray>().unwrap();
        let logit = col("logit");
        let logit = logit.as_any().downcast_ref::<arrow_array::Float32Array>().unwrap();
        for i in 0..b.num_rows() {
            if rec.value(i) == "rec01" {
                from_parquet.push((token.value(i), rank.value(i), name.value(i).to_string(), logit.value(i).to_bits()));
            }
        }
    }
    from_parquet.sort();
    from_json.sort();
    assert_eq!(from_parquet.len(), from_json.len());
    assert_eq!(from_parquet, from_json);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["complete"], true);
    assert_eq!(manifest["totals"]["recordings"], 4);
    assert_eq!(manifest["totals"]["rows"]["tokens"], 900);
    // With --skip-bad-tokens, the bad token is a failure row and the rest of its recording is kept.
    let skipping = dir.path().join("skipping");
    run_ok(parquet_run(&pack, &recs, &skipping).arg("--skip-bad-tokens"));
    let tokens = rows(&skipping, "tokens");
    assert_eq!(tokens.len(), 900 + 19, "the bad recording's 19 good tokens are kept");
    assert_eq!(tokens.iter().filter(|r| r.contains("recording=StringArray\n[\n  \"bad\",\n]")).count(), 19);
    let failures = rows(&skipping, "failures");
    assert!(failures.len() == 1 && failures[0].contains("token 7"), "{failures:?}");
    // A second run into the same directory is refused, naming --resume.
    let again = failed(&parquet_run(&pack, &recs, &out).output().unwrap());
    assert!(again.contains("--resume") && again.contains(&out.display().to_string()), "{again}");
}

#[test]
fn a_run_killed_half_way_and_resumed_gives_the_same_dataset_as_a_clean_run() {
    let (dir, pack, recs) = recordings(24);
    let clean = dir.path().join("clean");
    run_ok(parquet_run(&pack, &recs, &clean).args(["--concurrency", "8"]));

    let out = dir.path().join("killed");
    let mut child = parquet_run(&pack, &recs, &out)
        .args(["--concurrency", "1", "--part-rows", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while committed_recordings(&out) < 3 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(start.elapsed() < Duration::from_secs(120), "no part was committed in 2 minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = committed_recordings(&out);
    assert!(at_kill < 25, "killed half-way: {at_kill} of 25 recordings committed");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["complete"], false);
    // What a crash can leave besides: a part with no commit record, and a temporary file.
    std::fs::write(out.join("detections/part-09999.parquet"), b"half a part").unwrap();
    std::fs::write(out.join("tokens/.part-09999.parquet.tmp"), b"half a part").unwrap();

    let resumed = run_ok(parquet_run(&pack, &recs, &out).args(["--resume", "--concurrency", "4"]));
    assert!(
        resumed.contains(&format!("{at_kill} already written, skipped")),
        "{at_kill} recordings committed at the kill:\n{resumed}"
    );
    assert!(
        !out.join("detections/part-09999.parquet").exists() && !out.join("tokens/.part-09999.parquet.tmp").exists()
    );
    let mut sizes = BTreeMap::new();
    for table in TABLES {
        let (a, b) = (rows(&clean, table), rows(&out, table));
        assert_eq!(a.len(), b.len(), "{table}: row counts");
        assert!(a == b, "{table}: the resumed dataset differs from the clean one");
        sizes.insert(table, a.len());
    }
    assert_eq!(sizes["tokens"], 24 * 300);
    assert_eq!(sizes["failures"], 1);
    assert!(sizes["detections"] > 24 * 300, "{sizes:?}");
    // Resuming with another config is refused, naming both.
    let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/offline.toml");
    let mismatch = failed(
        &bin()
            .arg("run")
            .arg("--config")
            .arg(&other)
            .arg("--pack")
            .arg(&pack)
            .arg("--traces")
            .arg(&recs)
            .arg("--parquet")
            .arg(&out)
            .arg("--resume")
            .output()
            .unwrap(),
    );
    assert!(mismatch.contains("offline.toml") && mismatch.contains("realtime.toml"), "{mismatch}");
}
