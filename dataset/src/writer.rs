//! A Parquet dataset on disk that a crash cannot corrupt and a second run can finish.
//!
//! Layout of `OUT_DIR`:
//! - `manifest.json`: what wrote it (the config, the pack's identity, the options), and, once
//!   the run is over, `complete` and the totals;
//! - `<table>/part-NNNNN.parquet` for each table of [`Table::ALL`]: part N of every table holds
//!   the same recordings, whole;
//! - `_parts/part-NNNNN.json`: part N's commit record (its recordings and row counts).
//!
//! Why parts with commit records: a part's files are written under hidden temporary names
//! (`.part-NNNNN.parquet.tmp`, which Parquet readers skip), synced, and renamed, and its commit
//! record is written last, the same way. A part without a commit record never happened: `--resume`
//! deletes its files and scores its recordings again, and skips every recording a commit record
//! names, so a run killed at any instant and resumed gives the same rows as a clean run.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::score::Outcome;
use crate::tables::{self, Table};

pub const MANIFEST: &str = "manifest.json";
pub const PARTS: &str = "_parts";
/// The `format` of a manifest this build writes and resumes.
pub const FORMAT: &str = "probe-cascade-parquet/1";

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: ParquetError,
    },
    #[error("building the {table} rows of recording {recording}")]
    Arrow {
        table: &'static str,
        recording: String,
        #[source]
        source: arrow_schema::ArrowError,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{dir} already holds files: give --resume to finish the run that wrote it, or choose an empty directory")]
    NotEmpty { dir: PathBuf },
    #[error("{dir}: --resume needs the dataset's {MANIFEST}, and there is none: is this a probe-cascade dataset?")]
    NoManifest { dir: PathBuf },
    #[error("{dir}: --resume would mix runs: the dataset was written with {what} {was}, and this run has {now}")]
    Mismatch { dir: PathBuf, what: &'static str, was: String, now: String },
    #[error(transparent)]
    Score(#[from] crate::score::ScoreError),
}

/// Which pack wrote a dataset: enough to refuse resuming with another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackIdentity {
    pub dir: String,
    /// CRC-32 of the pack's manifest.json: the same pack, wherever it lies.
    pub manifest_crc32: String,
    pub concepts: usize,
    pub hidden_dim: usize,
    pub model_layers: Vec<u32>,
}

impl PackIdentity {
    pub fn of(pack: &probe_cascade::pack::Pack) -> Result<Self, WriteError> {
        let path = pack.dir().join(probe_cascade::pack::MANIFEST_FILE);
        let bytes = std::fs::read(&path).map_err(|source| WriteError::Io { path, source })?;
        Ok(Self {
            dir: pack.dir().display().to_string(),
            manifest_crc32: format!("{:08x}", crc32fast::hash(&bytes)),
            concepts: pack.len(),
            hidden_dim: pack.hidden_dim(),
            model_layers: pack.model_layers().to_vec(),
        })
    }
}

/// The dataset's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub writer: String,
    /// The config as read (a TOML file as JSON, or the Python dict).
    pub config: Value,
    /// Where the config came from (a file, or "python").
    pub config_source: String,
    pub pack: PackIdentity,
    pub skip_bad_tokens: bool,
    pub tables: Vec<String>,
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<Totals>,
}

impl Manifest {
    pub fn new(config: Value, config_source: String, pack: PackIdentity, skip_bad_tokens: bool) -> Self {
        Self {
            format: FORMAT.into(),
            writer: format!("probe-cascade {}", env!("CARGO_PKG_VERSION")),
            config,
            config_source,
            pack,
            skip_bad_tokens,
            tables: Table::ALL.iter().map(|t| t.name().to_string()).collect(),
            complete: false,
            totals: None,
        }
    }

    /// The first difference that makes `self` (a dataset's) another run than `now`.
    fn differs(&self, now: &Manifest) -> Option<(&'static str, String, String)> {
        let show = |v: &dyn std::fmt::Debug| format!("{v:?}");
        if self.format != now.format {
            return Some(("format", self.format.clone(), now.format.clone()));
        }
        if self.pack.manifest_crc32 != now.pack.manifest_crc32 {
            let pack = |p: &PackIdentity| format!("{} (manifest crc32 {})", p.dir, p.manifest_crc32);
            return Some(("the pack", pack(&self.pack), pack(&now.pack)));
        }
        if self.config != now.config {
            return Some(("the config of", self.config_source.clone(), now.config_source.clone()));
        }
        if self.skip_bad_tokens != now.skip_bad_tokens {
            return Some(("skip_bad_tokens", show(&self.skip_bad_tokens), show(&now.skip_bad_tokens)));
        }
        None
    }
}

/// What a finished dataset holds (every part, resumed ones included).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub parts: usize,
    pub recordings: usize,
    /// Recordings with at least one failure row.
    pub failed: usize,
    pub rows: std::collections::BTreeMap<String, usize>,
}

/// A part's commit record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Commit {
    part: u32,
    recordings: Vec<String>,
    failed: Vec<String>,
    rows: std::collections::BTreeMap<String, usize>,
}

/// How parts are cut.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// A part is committed once it holds this many detection rows (and at the end).
    pub part_rows: usize,
    /// Rows per Parquet row group: large enough for column reads to stream, small enough that
    /// a reader's threads each get some of a part.
    pub row_group_rows: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self { part_rows: 1 << 20, row_group_rows: 128 * 1024 }
    }
}

struct OpenTable {
    table: Table,
    writer: ArrowWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
}

struct Part {
    index: u32,
    tables: Vec<OpenTable>,
    recordings: Vec<String>,
    failed: Vec<String>,
    rows: [usize; 5],
}

/// The one writer of a dataset directory.
pub struct DatasetWriter {
    dir: PathBuf,
    manifest: Manifest,
    options: WriteOptions,
    next_part: u32,
    open: Option<Part>,
}

impl DatasetWriter {
    /// Opens `dir` for a run: a new dataset in an empty or absent directory, or, with
    /// `resume`, the dataset a run with the same config and pack left there. Returns the
    /// writer and the recordings already written (to skip).
    pub fn open(
        dir: &Path,
        manifest: Manifest,
        options: WriteOptions,
        resume: bool,
    ) -> Result<(Self, BTreeSet<String>), WriteError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WriteError::Io { path, source }
        };
        let has_files = dir.is_dir() && std::fs::read_dir(dir).map_err(io(dir))?.next().is_some();
        let mut done = BTreeSet::new();
        let mut next_part = 0;
        if has_files {
            if !resume {
                return Err(WriteError::NotEmpty { dir: dir.into() });
            }
            let path = dir.join(MANIFEST);
            if !path.exists() {
                return Err(WriteError::NoManifest { dir: dir.into() });
            }
            let old: Manifest = read_json(&path)?;
            if let Some((what, was, now)) = old.differs(&manifest) {
                return Err(WriteError::Mismatch { dir: dir.into(), what, was, now });
            }
            let commits = commits(dir)?;
            let committed: BTreeSet<u32> = commits.iter().map(|c| c.part).collect();
            next_part = committed.iter().max().map_or(0, |m| m + 1);
            for c in commits {
                done.extend(c.recordings);
            }
            // What a killed run left half-written: temporary files, and parts never committed.
            for sub in Table::ALL.iter().map(|t| t.name()).chain([PARTS]) {
                remove_files(&dir.join(sub), |name| {
                    name.ends_with(".tmp") || part_index(name).is_some_and(|k| !committed.contains(&k))
                })?;
            }
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for sub in Table::ALL.iter().map(|t| t.name()).chain([PARTS]) {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        write_json_atomic(&dir.join(MANIFEST), &manifest)?;
        Ok((Self { dir: dir.into(), manifest, options, next_part, open: None }, done))
    }

    /// Adds one recording's rows to the open part, and commits the part once it is full.
    pub fn append(&mut self, outcome: &Outcome) -> Result<(), WriteError> {
        if self.open.is_none() {
            self.open = Some(self.start_part()?);
        }
        let part = self.open.as_mut().expect("a part was just opened");
        for (t, rows) in part.tables.iter_mut().zip(&mut part.rows) {
            let batch = tables::batch(t.table, std::slice::from_ref(outcome)).map_err(|source| WriteError::Arrow {
                table: t.table.name(),
                recording: outcome.recording.clone(),
                source,
            })?;
            if batch.num_rows() > 0 {
                t.writer.write(&batch).map_err(|source| WriteError::Parquet { path: t.tmp.clone(), source })?;
            }
            *rows += batch.num_rows();
        }
        part.recordings.push(outcome.recording.clone());
        if !outcome.failures.is_empty() {
            part.failed.push(outcome.recording.clone());
        }
        if part.rows[0] >= self.options.part_rows {
            self.commit()?;
        }
        Ok(())
    }

    /// Commits the open part and marks the dataset complete, with its totals.
    pub fn finish(mut self) -> Result<Totals, WriteError> {
        self.commit()?;
        let mut totals = Totals::default();
        for c in commits(&self.dir)? {
            totals.parts += 1;
            totals.recordings += c.recordings.len();
            totals.failed += c.failed.len();
            for (k, v) in c.rows {
                *totals.rows.entry(k).or_default() += v;
            }
        }
        self.manifest.complete = true;
        self.manifest.totals = Some(totals.clone());
        write_json_atomic(&self.dir.join(MANIFEST), &self.manifest)?;
        Ok(totals)
    }

    fn start_part(&mut self) -> Result<Part, WriteError> {
        let index = self.next_part;
        self.next_part += 1;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(self.options.row_group_rows))
            .build();
        let mut tables = Vec::with_capacity(Table::ALL.len());
        for table in Table::ALL {
            let tdir = self.dir.join(table.name());
            let tmp = tdir.join(format!(".part-{index:05}.parquet.tmp"));
            let path = tdir.join(format!("part-{index:05}.parquet"));
            let file = File::create(&tmp).map_err(|source| WriteError::Io { path: tmp.clone(), source })?;
            let writer = ArrowWriter::try_new(file, table.schema(), Some(props.clone()))
                .map_err(|source| WriteError::Parquet { path: tmp.clone(), source })?;
            tables.push(OpenTable { table, writer, tmp, path });
        }
        Ok(Part { index, tables, recordings: Vec::new(), failed: Vec::new(), rows: [0; 5] })
    }

    fn commit(&mut self) -> Result<(), WriteError> {
        let Some(part) = self.open.take() else { return Ok(()) };
        for t in part.tables {
            let file = t.writer.into_inner().map_err(|source| WriteError::Parquet { path: t.tmp.clone(), source })?;
            file.sync_all().map_err(|source| WriteError::Io { path: t.tmp.clone(), source })?;
            std::fs::rename(&t.tmp, &t.path).map_err(|source| WriteError::Io { path: t.path.clone(), source })?;
        }
        let commit = Commit {
            part: part.index,
            recordings: part.recordings,
            failed: part.failed,
            rows: Table::ALL.iter().map(|t| t.name().to_string()).zip(part.rows).collect(),
        };
        write_json_atomic(&self.dir.join(PARTS).join(format!("part-{:05}.json", part.index)), &commit)?;
        tracing::debug!(part = part.index, recordings = commit.recordings.len(), "committed a part");
        Ok(())
    }
}

/// Removes the files of `dir` (if it exists) whose names `stale` picks.
fn remove_files(dir: &Path, stale: impl Fn(&str) -> bool) -> Result<(), WriteError> {
    if !dir.is_dir() {
        return Ok(());
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError::Io { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let p = entry.map_err(io(dir))?.path();
        if p.file_name().and_then(|n| n.to_str()).is_some_and(&stale) {
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// `part-00012.parquet` → 12.
fn part_index(name: &str) -> Option<u32> {
    name.strip_prefix("part-")?.strip_suffix(".parquet")?.parse().ok()
}

fn commits(dir: &Path) -> Result<Vec<Commit>, WriteError> {
    let pdir = dir.join(PARTS);
    let mut out = Vec::new();
    if !pdir.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(&pdir).map_err(|source| WriteError::Io { path: pdir.clone(), source })? {
        let p = entry.map_err(|source| WriteError::Io { path: pdir.clone(), source })?.path();
        if p.extension().is_some_and(|e| e == "json") {
            out.push(read_json::<Commit>(&p)?);
        }
    }
    out.sort_by_key(|c| c.part);
    Ok(out)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, WriteError> {
    let bytes = std::fs::read(path).map_err(|source| WriteError::Io { path: path.into(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| WriteError::Json { path: path.into(), source })
}

/// Writes `value` to `path` through a synced temporary file and a rename.
fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), WriteError> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| WriteError::Json { path: path.into(), source })?;
    let io = |source| WriteError::Io { path: tmp.clone(), source };
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|source| WriteError::Io { path: path.into(), source })?;
    if let Some(parent) = path.parent() {
        // The rename itself, made durable (best effort: not every filesystem syncs directories).
        let _ = File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}
