//! `run --traces DIR_OR_GLOB --parquet OUT_DIR`: many recordings, each its own session on one
//! runtime, many at once, into a Parquet dataset (`probe_cascade_dataset::writer`) with a
//! progress bar; `--resume` finishes what a killed run left.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use probe_cascade::config::Config;
use probe_cascade::pack::Pack;
use probe_cascade::runtime::Runtime;
use probe_cascade_dataset::{self as dataset, DatasetWriter, Manifest, PackIdentity, WriteError, WriteOptions};

/// What `run` hands over for a dataset run.
pub struct Job<'a> {
    pub spec: &'a str,
    pub out: PathBuf,
    pub resume: bool,
    pub concurrency: usize,
    pub part_rows: u64,
    pub skip_bad_tokens: bool,
    /// The config as given (the file as JSON, with the command line's overrides).
    pub config_json: serde_json::Value,
    pub config_source: String,
}

pub fn run(job: Job<'_>, config: Config, pack: Arc<Pack>) -> anyhow::Result<ExitCode> {
    let recordings = dataset::discover(job.spec)?;
    let found = recordings.len();
    let manifest = Manifest::new(
        job.config_json.clone(),
        job.config_source.clone(),
        PackIdentity::of(&pack)?,
        job.skip_bad_tokens,
    );
    let options = WriteOptions { part_rows: job.part_rows as usize, ..WriteOptions::default() };
    let (mut writer, done) = DatasetWriter::open(&job.out, manifest, options, job.resume)?;
    let todo: Vec<_> = recordings.into_iter().filter(|r| !done.contains(&r.name)).collect();
    let to_score = todo.len();
    println!(
        "{found} recordings in {}: {} to score{}, {} at once, into {}",
        job.spec,
        to_score,
        if done.is_empty() { String::new() } else { format!(" ({} already written, skipped)", found - to_score) },
        job.concurrency,
        job.out.display()
    );
    let bar = super::progress::bar(todo.len(), "recordings");
    let start = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (tokens, failed) = rt.block_on(async {
        let runtime = Runtime::start(pack.clone(), &config).await?;
        let (mut tokens, mut failed) = (0usize, 0usize);
        let options = dataset::Options { concurrency: job.concurrency, skip_bad_tokens: job.skip_bad_tokens };
        let scored = dataset::score_all(&runtime, todo, options, |outcome| {
            tokens += outcome.reports.len();
            if !outcome.failures.is_empty() {
                failed += 1;
                let first = outcome.failures.first().map_or("", |f| f.error.as_str());
                bar.suspend(|| eprintln!("recording {} failed: {first}", outcome.recording));
            }
            writer.append(&outcome)?;
            bar.inc(1);
            bar.set_message(format!("{:.0} tok/s", tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)));
            Ok::<_, WriteError>(())
        })
        .await;
        runtime.shutdown().await;
        scored.with_context(|| format!("writing {}", job.out.display()))?;
        Ok::<_, anyhow::Error>((tokens, failed))
    })?;
    bar.finish_and_clear();
    let wall = start.elapsed().as_secs_f64();
    let totals = writer.finish()?;
    println!(
        "scored {tokens} tokens of {to_score} recordings in {wall:.2} s ({:.0} tokens/s); {failed} failed",
        tokens as f64 / wall.max(1e-9)
    );
    let rows: Vec<String> = totals.rows.iter().map(|(t, n)| format!("{t} {n}")).collect();
    println!(
        "{}: {} recordings ({} with failures) in {} parts; rows: {}",
        job.out.display(),
        totals.recordings,
        totals.failed,
        totals.parts,
        rows.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}
