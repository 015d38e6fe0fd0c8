//! Engines run the cascade token by token. The algorithm is written once (`cascade.rs`, on top
//! of the pure policies); engines differ only in their backend: how probes are loaded and
//! scored.

mod cascade;
pub mod naive;
pub mod oracle;
pub mod reference;
pub mod tensors;

use std::sync::Arc;

pub use crate::types::{
    hidden, Alert, Hidden, HiddenSource, HiddenValues, ReportEntry, SimplexReading, StageTimings, TokenReport,
};
pub use cascade::{
    alert_entries, check_hidden, check_tensor, layer_norm, layer_norm_f64, prepare_hidden, prepare_states,
    probe_scores, report_entries, simplex_readings, tensor_to_host, token_states, token_views, CascadeEngine,
    LAYER_NORM_EPS,
};

use crate::config::Config;
use crate::pack::{ConceptId, Pack, PackError, ProbeId};

/// Loads and scores probes for the cascade driver.
pub trait ProbeBackend {
    fn name(&self) -> &'static str;
    /// Makes inactive probes ready to score.
    fn load(&mut self, ids: &[ProbeId]) -> Result<(), BackendError>;
    /// Releases deactivated probes.
    fn unload(&mut self, ids: &[ProbeId]);
    /// Logits of loaded probes on an already normalized hidden state (the one they all read).
    fn score(&mut self, ids: &[ProbeId], hidden: &[f32]) -> Result<Vec<f32>, BackendError>;
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("tensor math failed: {0}")]
    Tch(#[from] tch::TchError),
    #[error("probe {0:?} was scored before it was loaded")]
    NotLoaded(ProbeId),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A bad hidden state (wrong width, NaN).
    #[error("token {token}: {source}")]
    Hidden {
        token: usize,
        #[source]
        source: crate::types::HiddenError,
    },
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
    #[error("token {token}: the oracle's kernel: {source}")]
    Kernel {
        token: usize,
        #[source]
        source: crate::kernel::KernelError,
    },
    /// The config does not fit the pack: names the key.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// From an engine built on something else (the actor runtime): names the token where
    /// there is one.
    #[error("{error}")]
    Other { token: Option<usize>, error: Box<dyn std::error::Error + Send + Sync> },
}

impl EngineError {
    /// The token the error belongs to, if it is about one token.
    pub fn token(&self) -> Option<usize> {
        match self {
            EngineError::Hidden { token, .. }
            | EngineError::Backend { token, .. }
            | EngineError::Kernel { token, .. } => Some(*token),
            EngineError::Other { token, .. } => *token,
            _ => None,
        }
    }
}

/// A cascade engine: one hidden state in, one report out.
pub trait Engine {
    fn name(&self) -> &'static str;
    /// One token from one hidden state per model layer the pack reads, in
    /// [`Pack::model_layers`] order (one state for a pack that names no model layer).
    fn observe_states(&mut self, token: usize, states: &[&[f32]]) -> Result<TokenReport, EngineError>;
    /// One token from one hidden state, on a pack whose probes read one model layer.
    fn observe(&mut self, token: usize, hidden: &[f32]) -> Result<TokenReport, EngineError> {
        self.observe_states(token, &[hidden])
    }
    /// Active probes, ascending.
    fn active(&self) -> Vec<ConceptId>;
    /// Weight bytes copied into scoring buffers so far, where the engine counts them.
    fn weight_traffic(&self) -> Option<crate::types::WeightTraffic> {
        None
    }
}

/// The engines of this module. The actor runtime is an engine too (`runtime::BlockingCascade`),
/// but the engines do not name the runtime: the command line offers it beside these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    Reference,
    Naive,
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
