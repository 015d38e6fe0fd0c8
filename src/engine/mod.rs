//! Engines run the cascade token by token. The algorithm is written once (`cascade.rs`, on top
//! of the pure policies); engines differ only in their backend: how probes are loaded and
//! scored.

mod cascade;
pub mod hidden;
pub mod naive;
pub mod oracle;
pub mod reference;
pub mod tensors;

use std::sync::Arc;
use std::time::Duration;

pub use cascade::{layer_norm, layer_norm_f64, prepare_hidden, report_entries, CascadeEngine, LAYER_NORM_EPS};
pub use hidden::{Hidden, HiddenSource, HiddenValues};

use crate::config::Config;
use crate::pack::{ConceptId, Pack, PackError};

/// Loads and scores probes for the cascade driver.
pub trait ProbeBackend {
    fn name(&self) -> &'static str;
    /// Makes inactive probes ready to score.
    fn load(&mut self, ids: &[ConceptId]) -> Result<(), BackendError>;
    /// Releases deactivated probes.
    fn unload(&mut self, ids: &[ConceptId]);
    /// Logits of loaded probes on an already normalized hidden state.
    fn score(&mut self, ids: &[ConceptId], hidden: &[f32]) -> Result<Vec<f32>, BackendError>;
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("tensor math failed: {0}")]
    Tch(#[from] tch::TchError),
    #[error("probe {0:?} was scored before it was loaded")]
    NotLoaded(ConceptId),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("token {token}: the hidden state has {got} values but the pack's probes read D={expected}")]
    Width { token: usize, got: usize, expected: usize },
    #[error("token {token}: hidden state value [{index}] is {value}")]
    NonFinite { token: usize, index: usize, value: f32 },
    #[error("token {token}: {source}")]
    Backend {
        token: usize,
        #[source]
        source: BackendError,
    },
    #[error("loading the base layer: {0}")]
    BaseLoad(#[source] BackendError),
    #[error("{0}")]
    Device(String),
    #[error("{0}")]
    Setup(String),
    /// From the actor runtime (already names the token where there is one).
    #[error("{message}")]
    Runtime { token: Option<usize>, message: String },
}

impl EngineError {
    /// The token the error belongs to, if it is about one token.
    pub fn token(&self) -> Option<usize> {
        match self {
            EngineError::Width { token, .. }
            | EngineError::NonFinite { token, .. }
            | EngineError::Backend { token, .. } => Some(*token),
            EngineError::Runtime { token, .. } => *token,
            _ => None,
        }
    }
}

/// One reported concept.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReportEntry {
    #[serde(skip)]
    pub id: ConceptId,
    pub name: String,
    pub layer: u16,
    pub prob: f32,
    pub logit: f32,
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
    /// Active probes after pruning.
    pub active: usize,
    pub stages: StageTimings,
    pub elapsed: Duration,
    /// Pipelined runtime: requested children still loading when the report was made.
    pub in_flight: Vec<String>,
    /// Pipelined runtime: children of earlier tokens whose late loads failed.
    pub failed_loads: Vec<String>,
}

/// A cascade engine: one hidden state in, one report out.
pub trait Engine {
    fn name(&self) -> &'static str;
    fn observe(&mut self, token: usize, hidden: &[f32]) -> Result<TokenReport, EngineError>;
    /// Active probes, ascending.
    fn active(&self) -> Vec<ConceptId>;
    /// Weight bytes copied into scoring buffers so far, where the engine counts them.
    fn weight_traffic(&self) -> Option<crate::runtime::inference::WeightTraffic> {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    Reference,
    Naive,
    /// The actor runtime (`runtime.mode` picks exact or pipelined).
    Runtime,
    /// Every probe of the pack on every token (the CPU kernel): the ground truth.
    Oracle,
}

/// Builds an engine for `pack` from `config`, loading the base layer.
pub fn build_engine(kind: EngineKind, pack: Arc<Pack>, config: &Config) -> Result<Box<dyn Engine>, EngineError> {
    let device = tensors::open_device(&config.device)?;
    let compute = tensors::kind_of(config.device.compute_dtype);
    Ok(match kind {
        EngineKind::Reference => Box::new(CascadeEngine::new(
            pack.clone(),
            &config.cascade,
            reference::ReferenceBackend::new(pack, device, compute),
        )?),
        EngineKind::Naive => Box::new(CascadeEngine::new(
            pack.clone(),
            &config.cascade,
            naive::NaiveBackend::new(pack, device, compute),
        )?),
        EngineKind::Oracle => Box::new(oracle::OracleEngine::new(pack, config)?),
        EngineKind::Runtime => Box::new(
            crate::runtime::BlockingCascade::start(pack, config)
                .map_err(|e| EngineError::Setup(format!("starting the runtime: {e}")))?,
        ),
    })
}

/// Nearest-rank percentile of sorted values (0 for none): how `run` and `bench` summarize.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 5.0);
        assert_eq!(percentile(&v, 95.0), 10.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
