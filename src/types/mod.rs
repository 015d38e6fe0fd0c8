//! The types every layer shares: what a token reports, how long its stages took, a hidden
//! state as a caller hands it over, weight traffic, and which reader the runtime uses.
//!
//! Why a leaf: the engines, the runtime, the config and the bindings all name these, and a
//! type that lived in one of them made the others depend on it (the engines on the runtime,
//! the config on the reader). This module depends only on `pack` (a concept's id), so no
//! cycle can form through it; `tests/layering.rs` keeps it that way.

pub mod cuda;
pub mod hidden;

use std::time::Duration;

pub use hidden::{Hidden, HiddenSource, HiddenValues};

use crate::pack::ConceptId;

/// One reported concept.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReportEntry {
    #[serde(skip)]
    pub id: ConceptId,
    pub name: String,
    pub layer: u16,
    pub prob: f32,
    pub logit: f32,
    /// In a v2 pack, the lens's probes this token, one per model layer (empty in a v1 pack,
    /// whose one probe's score is the entry's own).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeScore>,
}

/// One probe of a reported lens: its model layer, logit, raw score `sigmoid(logit)`, and its
/// calibrated score where the pack calibrates it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProbeScore {
    pub model_layer: u32,
    pub logit: f32,
    pub prob: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibrated: Option<f32>,
}

/// A watch profile's alert: a concept scored this token, in a watched subtree, at or above
/// the profile's threshold (docs/cascade-semantics.md, "Alerts").
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Alert {
    /// The profile's name.
    pub profile: String,
    #[serde(skip)]
    pub id: ConceptId,
    pub concept: String,
    pub layer: u16,
    /// The watched concept whose subtree holds `concept` (itself, or its nearest watched
    /// ancestor).
    pub watched: String,
    /// The score compared with the threshold: the probe's probability.
    pub score: f32,
    pub logit: f32,
}

/// One simplex pole's reading on a token (docs/cascade-semantics.md, "Simplex lenses"):
/// scored every token, apart from the hierarchy.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SimplexReading {
    /// The simplex's name.
    pub simplex: String,
    pub pole: String,
    /// `sigmoid(logit)`.
    pub prob: f32,
    pub logit: f32,
    /// Standard deviations of `prob` from the pole's rolling baseline in this stream (its last
    /// 100 scores); `None` for the first 9 tokens.
    pub deviation: Option<f32>,
}

/// Wall time of each stage of one token, as the seed's profile split it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StageTimings {
    #[serde(serialize_with = "ms")]
    pub initial_scoring: Duration,
    #[serde(serialize_with = "ms")]
    pub expansion_lookup: Duration,
    #[serde(serialize_with = "ms")]
    pub loading: Duration,
    #[serde(serialize_with = "ms")]
    pub new_scoring: Duration,
    #[serde(serialize_with = "ms")]
    pub pruning: Duration,
    #[serde(serialize_with = "ms")]
    pub sorting: Duration,
}

fn ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// What one token did and found.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenReport {
    pub index: usize,
    pub top: Vec<ReportEntry>,
    /// Distinct inactive children the expansion asked for.
    pub children: usize,
    /// Probes loaded (activated) this token.
    pub loaded: usize,
    /// Probes unloaded (deactivated) by pruning this token.
    pub unloaded: usize,
    /// Children left out because the active set would pass max_loaded.
    pub skipped_by_cap: usize,
    /// Probes scored this token.
    pub scored: usize,
    /// Which probes were scored this token, ascending: what a fidelity check against the
    /// exhaustive oracle needs (a concept the cascade never scored is one it missed).
    pub scored_ids: Vec<ConceptId>,
    /// The logit of each of `scored_ids`, in the same order (a lens's largest probe logit).
    pub scored_logits: Vec<f32>,
    /// The score of each of `scored_ids` (a lens's score), in the same order.
    pub scored_probs: Vec<f32>,
    /// Active probes after pruning.
    pub active: usize,
    pub stages: StageTimings,
    pub elapsed: Duration,
    /// Pipelined runtime: requested children still loading when the report was made.
    pub in_flight: Vec<String>,
    /// Pipelined runtime: children of earlier tokens whose late loads failed.
    pub failed_loads: Vec<String>,
    /// The watch profiles' alerts over everything scored this token, whatever the report's
    /// size: profiles in config order, each best first.
    pub alerts: Vec<Alert>,
    /// Every simplex pole of the pack, simplex by simplex, pole by pole (empty without
    /// simplexes).
    pub simplex: Vec<SimplexReading>,
}

/// Why a hidden state was refused (the caller adds which token it was).
#[derive(Debug, Clone, thiserror::Error)]
pub enum HiddenError {
    #[error("the hidden state has {got} values but the pack's probes read D={expected}")]
    Width { got: usize, expected: usize },
    #[error("hidden state value [{index}] is {value}")]
    NonFinite { index: usize, value: f32 },
    /// An observation with another number of hidden states than the pack's model layers.
    #[error(
        "{got} hidden states, but the pack's probes read {}",
        if layers.is_empty() { "one".to_string() } else { format!("model layers {layers:?}: one hidden state each, in that order") }
    )]
    States { got: usize, layers: Vec<u32> },
    #[error("the hidden state has dtype {dtype}; the runtime reads float32, bfloat16 or float16")]
    Dtype { dtype: String },
    /// Checking or normalizing a tensor on its device failed.
    #[error("reading the hidden state on {device} failed")]
    Device {
        device: String,
        #[source]
        source: std::sync::Arc<tch::TchError>,
    },
    /// The runtime could not order its reads after the caller's CUDA stream.
    #[error("ordering the runtime's reads after the caller's CUDA stream")]
    Order(#[source] cuda::CudaError),
}

/// Weight bytes copied by installs and slot moves, and how many of each: the CPU kernel's
/// stay at zero bytes (its slots are references to the cache's entries).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WeightTraffic {
    /// Which backend scores: the kernel's instruction-set path, or the tch arena.
    pub path: String,
    pub installs: u64,
    pub install_bytes_copied: u64,
    pub moves: u64,
    pub move_bytes_copied: u64,
    /// The tch backend's resident store (none for the CPU kernel, which scores in the cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreStats>,
}

/// What the tch backend's resident store holds and has done (`WeightTraffic::store`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Rows in the store (its budget, in probes).
    pub rows: usize,
    /// Bytes of one row in the compute dtype.
    pub row_bytes: usize,
    /// Rows holding a probe.
    pub resident: usize,
    /// Of those, rows pinned (held by a session, or a base probe).
    pub pinned: usize,
    /// Installs that found their probe resident: a reference, no copy.
    pub hits: u64,
    /// Probes copied in.
    pub uploads: u64,
    /// Warm probes evicted to make room.
    pub evictions: u64,
    /// Probes copied in ahead of their activation (prefetch hints), and of those, how many a
    /// session then activated.
    pub prefetched: u64,
    pub prefetch_used: u64,
    /// Hidden states a scoring round read where they lay on the store's device (a caller's
    /// tensor handed over there), and those it sent from host memory: one per state and round.
    pub states_in_place: u64,
    pub states_sent: u64,
}

impl WeightTraffic {
    pub fn new(path: &str) -> Self {
        Self { path: path.into(), ..Default::default() }
    }

    /// An install that copied `bytes`.
    pub fn copied(&mut self, bytes: usize) {
        self.installs += 1;
        self.install_bytes_copied += bytes as u64;
    }
}

/// Which reader to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ReaderKind {
    /// io_uring, falling back to threads where the kernel refuses it.
    #[default]
    Auto,
    IoUring,
    Threads,
}

/// A session's number on its runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "session {}", self.0)
    }
}
