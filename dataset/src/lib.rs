//! Offline scoring at scale: many recordings, each its own session on one runtime, and their
//! results as Arrow tables, written as a Parquet dataset that survives a crash
//! (`probe-cascade run --traces ... --parquet ...`) or handed to Python as Arrow IPC (the Ray
//! path, `probe_cascade.ray`).
//!
//! Why its own crate: Arrow and Parquet are large, and only the command line and the Python
//! binding need them; the core and the server build without. The layers stay one way: this
//! crate uses the core, and the binaries use both.

pub mod recordings;
pub mod score;
pub mod tables;
pub mod writer;

pub use recordings::{discover, Recording, RecordingError, Source};
pub use score::{score_all, Failure, Options, Outcome, ScoreError};
pub use tables::Table;
pub use writer::{DatasetWriter, Manifest, PackIdentity, Totals, WriteError, WriteOptions};
