//! Which engine `run` runs: one of the engines module's (reference, naive, the oracle), or the
//! actor runtime. The choice of the runtime lives here, above both, so that the engines never
//! name the runtime (the runtime depends on them, not the other way round).

use std::sync::Arc;

use probe_cascade::config::Config;
use probe_cascade::engine::{self, Engine};
use probe_cascade::pack::Pack;
use probe_cascade::runtime::BlockingCascade;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    Reference,
    Naive,
    /// The actor runtime (`runtime.mode` picks exact or pipelined): one session, the same
    /// code path as `serve` and the Python package.
    Runtime,
    /// Every probe of the pack on every token (the CPU kernel): the ground truth.
    Oracle,
}

/// Builds the engine, loading the base layers.
pub fn build(kind: EngineKind, pack: Arc<Pack>, config: &Config) -> anyhow::Result<Box<dyn Engine>> {
    let of_module = match kind {
        EngineKind::Reference => engine::EngineKind::Reference,
        EngineKind::Naive => engine::EngineKind::Naive,
        EngineKind::Oracle => engine::EngineKind::Oracle,
        EngineKind::Runtime => return Ok(Box::new(BlockingCascade::start(pack, config)?)),
    };
    Ok(engine::build_engine(of_module, pack, config)?)
}
