//! The actor runtime: reads on io_uring, a byte-budgeted RAM cache, slots in a device arena,
//! batched inference on its own thread, and the cascade policies on top (docs/architecture.md).
//!
//! ```text
//!  caller ──Observe──▶ Coordinator ──Get/Prefetch──▶ WeightCache ──ReadRequest──▶ reader thread
//!   (Cascade handle)   (policies,      ──ApplyAndScore──▶ Inference      ◀──ReadDone── (io_uring
//!                       model pool)                      (own thread)                   or threads)
//! ```

pub mod cache;
pub mod coordinator;
pub mod faults;
pub mod inference;
pub mod pool;
pub mod reader;
pub mod session;
pub mod steps;

pub use session::{Runtime, Session, SessionOptions};
pub use steps::{SessionId, StepStats};

use std::sync::Arc;

use kameo::mailbox;
use kameo::prelude::{ActorRef, Spawn};

use crate::config::{CascadeConfig, Config, CpuKernel, RuntimeConfig};
use crate::engine::{tensors, EngineError, Hidden, TokenReport};
use crate::pack::{ConceptId, Pack};
use crate::policy::ConceptSet;
use cache::{CacheSettings, CacheStats, ReadError, WeightCache};
use coordinator::{ActiveSet, Coordinator, Drain, Observe, PendingLoads, Scorer};
use faults::Faults;
use inference::{Inference, InferenceError, InferenceSettings, WeightTraffic};
use pool::ModelPool;
use reader::ReaderKind;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A bad hidden state (wrong width, NaN): names the token.
    #[error(transparent)]
    Hidden(#[from] EngineError),
    #[error("token {token}: {source}")]
    Probe {
        token: usize,
        #[source]
        source: ReadError,
    },
    #[error("token {token}: inference failed: {source}")]
    Inference {
        token: usize,
        #[source]
        source: InferenceError,
    },
    #[error("the {actor} actor did not answer ({detail})")]
    ActorStopped { actor: &'static str, detail: String },
    #[error("the runtime stopped serving after an earlier failure: {0}")]
    Broken(String),
    #[error("the cascade has shut down")]
    ShutDown,
    #[error("{0}")]
    Setup(String),
    #[error("starting the probe reader: {0}")]
    Reader(#[source] std::io::Error),
    #[error("runtime.max_sessions = {limit}: that many sessions are open already")]
    SessionLimit { limit: usize },
    #[error(
        "runtime.pool_slots = {slots}: the shared arena has {} slots left unreserved, and a session reserves \
         cascade.max_loaded = {need} (close a session, or raise runtime.pool_slots)",
        slots - reserved
    )]
    ArenaLimit { slots: usize, reserved: usize, need: usize },
    #[error("{0} is not open on this runtime")]
    UnknownSession(steps::SessionId),
    #[error("session options: {0}")]
    Options(String),
}

/// A running cascade: a cheap handle onto the coordinator actor.
#[derive(Clone)]
pub struct Cascade {
    coordinator: ActorRef<Coordinator>,
    cache: ActorRef<WeightCache>,
    /// Weak: the coordinator owns the inference actor, which stops with it.
    inference: kameo::prelude::WeakActorRef<Inference>,
    reader: ReaderKind,
    /// Set by `shutdown`, so that a request caught by the stop is told so, not "panicked".
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Cascade {
    /// Starts the actors and loads the base layers. Needs a multi-threaded tokio runtime.
    pub async fn start(pack: Arc<Pack>, config: &Config) -> Result<Self, RuntimeError> {
        Self::start_with_faults(pack, config, Faults::none()).await
    }

    /// [`Cascade::start`] with faults injected (tests only; see [`faults`]).
    pub async fn start_with_faults(pack: Arc<Pack>, config: &Config, faults: Faults) -> Result<Self, RuntimeError> {
        // Check the configuration against the pack before starting anything.
        let base = crate::policy::base_set(pack.hierarchy(), &config.cascade).map_err(RuntimeError::Setup)?;
        let device = tensors::open_device(&config.device)?;
        let compute = tensors::kind_of(config.device.compute_dtype);
        let rt = &config.runtime;
        let (cache, reader) = spawn_cache(&pack, rt, &faults)?;
        let cpu_kernel = config.device.cpu_kernel;
        if device == tch::Device::Cpu && cpu_kernel != CpuKernel::Torch {
            check_cache_holds_the_cap(&pack, config)?;
        }
        let settings = InferenceSettings {
            slots: rt.pool_slots,
            device,
            compute,
            staging_bytes: rt.staging_bytes,
            math_threads: tensors::math_threads(&config.device),
            cpu_kernel,
        };
        let inference = Inference::new(pack.clone(), &settings)
            .map_err(|e| RuntimeError::Setup(format!("setting up inference: {e}")))?
            .with_faults(faults.clone());
        let inference = Inference::spawn_in_thread_with_mailbox(inference, mailbox::bounded(16));

        let scorer = Scorer::Own(inference.clone());
        let mut coordinator =
            new_coordinator(pack, &config.cascade, rt, base, cache.clone(), scorer, device != tch::Device::Cpu);
        coordinator.faults = faults;
        coordinator.load_base().await?;
        let coordinator = Coordinator::spawn_with_mailbox(coordinator, mailbox::bounded(rt.request_queue));
        Ok(Self { coordinator, cache, inference: inference.downgrade(), reader, stopping: Default::default() })
    }

    /// Weight bytes the scoring backend has copied (none with the CPU kernel), and its path.
    pub async fn weight_traffic(&self) -> Result<WeightTraffic, RuntimeError> {
        let inference = self.inference.upgrade().ok_or(RuntimeError::ShutDown)?;
        inference.ask(inference::Traffic).await.map_err(|_| RuntimeError::ShutDown)
    }

    /// Scores one hidden state; tokens are numbered in the order their requests arrive.
    pub async fn observe(&self, hidden: impl Into<Hidden>) -> Result<TokenReport, RuntimeError> {
        observe_on(&self.coordinator, hidden.into(), &self.stopping).await
    }

    /// The active probes, ascending.
    pub async fn active(&self) -> Result<Vec<ConceptId>, RuntimeError> {
        self.coordinator.ask(ActiveSet).await.map_err(|_| RuntimeError::ShutDown)
    }

    /// Waits until no load is in flight: no child pending in the coordinator (pipelined mode),
    /// no read outstanding in the cache (hints included), and no slot rearrangement (pruning's
    /// copies) queued on the inference thread. A generation loop gets this for free while it
    /// computes the next token; tests and benchmarks call it to model that gap.
    pub async fn settle(&self) -> Result<(), RuntimeError> {
        settle_on(&self.coordinator, &self.cache).await
    }

    pub async fn cache_stats(&self) -> Result<CacheStats, RuntimeError> {
        self.cache.ask(cache::Stats).await.map_err(|_| RuntimeError::ShutDown)
    }

    /// The reader actually in use (io_uring, or threads after a fallback).
    pub fn reader(&self) -> ReaderKind {
        self.reader
    }

    /// Finishes every request already queued, then stops the actors. Requests sent after this
    /// get `RuntimeError::ShutDown`.
    pub async fn shutdown(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.coordinator.stop_gracefully().await;
        let _ = self.coordinator.wait_for_shutdown_result().await;
        let _ = self.cache.wait_for_shutdown_result().await;
    }
}

/// Starts the weight cache (and its reader) under the configured budget.
fn spawn_cache(
    pack: &Arc<Pack>,
    rt: &RuntimeConfig,
    faults: &Faults,
) -> Result<(ActorRef<WeightCache>, ReaderKind), RuntimeError> {
    let settings = CacheSettings {
        budget_bytes: rt.cache_bytes,
        queue_depth: rt.prefetch_queue_depth,
        reader: rt.reader,
        fallback_threads: rt.fallback_io_threads,
        faults: faults.clone(),
    };
    let cache = WeightCache::new(pack.clone(), &settings).map_err(RuntimeError::Reader)?;
    let reader = cache.reader_kind();
    Ok((WeightCache::spawn_with_mailbox(cache, mailbox::bounded(rt.request_queue.max(16) * 4)), reader))
}

/// One stream's coordinator (not started; the caller loads its base layers).
fn new_coordinator(
    pack: Arc<Pack>,
    cascade: &CascadeConfig,
    rt: &RuntimeConfig,
    base: ConceptSet,
    cache: ActorRef<WeightCache>,
    scorer: Scorer,
    keep_warm: bool,
) -> Coordinator {
    Coordinator {
        active: ConceptSet::with_capacity(pack.len()),
        pool: ModelPool::new(rt.pool_slots, keep_warm),
        normalization: cascade.normalization_for(pack.input_normalization()),
        pack,
        config: Arc::new(cascade.clone()),
        hint_margin: rt.prefetch_hint_margin,
        base,
        cache,
        scorer,
        next_token: 0,
        broken: None,
        mode: rt.mode,
        latency_budget: std::time::Duration::from_micros(rt.latency_budget_us),
        pending: ConceptSet::default(),
        failed_late: Vec::new(),
        scoring_time: std::time::Duration::ZERO,
        faults: Faults::none(),
    }
}

/// Asks a coordinator to score a hidden state, naming why if it cannot.
async fn observe_on(
    coordinator: &ActorRef<Coordinator>,
    hidden: Hidden,
    stopping: &std::sync::atomic::AtomicBool,
) -> Result<TokenReport, RuntimeError> {
    coordinator.ask(Observe(hidden)).await.map_err(|e| match e {
        kameo::error::SendError::HandlerError(e) => e,
        kameo::error::SendError::ActorNotRunning(_) => RuntimeError::ShutDown,
        _ if stopping.load(std::sync::atomic::Ordering::SeqCst) => RuntimeError::ShutDown,
        other => RuntimeError::ActorStopped { actor: "coordinator", detail: describe(&other).into() },
    })
}

/// Waits until a stream has no load in flight (see [`Cascade::settle`]).
async fn settle_on(coordinator: &ActorRef<Coordinator>, cache: &ActorRef<WeightCache>) -> Result<(), RuntimeError> {
    loop {
        let pending = coordinator.ask(PendingLoads).await.map_err(|_| RuntimeError::ShutDown)?;
        let stats = cache.ask(cache::Stats).await.map_err(|_| RuntimeError::ShutDown)?;
        if pending == 0 && stats.in_flight == 0 {
            return match coordinator.ask(Drain).await {
                Ok(()) => Ok(()),
                Err(kameo::error::SendError::HandlerError(e)) => Err(e),
                Err(_) => Err(RuntimeError::ShutDown),
            };
        }
        tokio::time::sleep(std::time::Duration::from_micros(200)).await;
    }
}

/// The CPU kernel scores active probes where they lie in the weight cache, which keeps them
/// pinned while they are active: the cache must hold as many as can be active at once.
fn check_cache_holds_the_cap(pack: &Pack, config: &Config) -> Result<(), RuntimeError> {
    let probe = pack.layout().byte_len() as u64;
    let cap = config.cascade.max_loaded.min(config.runtime.pool_slots) as u64;
    let budget = config.runtime.cache_bytes;
    if budget < cap * probe {
        return Err(RuntimeError::Setup(format!(
            "runtime.cache_bytes = {budget} holds {} probes of this pack ({probe} bytes each), but up to {cap} \
             can be active (cascade.max_loaded): the CPU kernel scores active probes in place in the cache, \
             so set runtime.cache_bytes to at least {} (or device.cpu_kernel = \"torch\" to copy them into an \
             arena instead)",
            budget / probe,
            cap * probe
        )));
    }
    Ok(())
}

impl RuntimeError {
    /// The token the error belongs to, if it is about one token.
    pub fn token(&self) -> Option<usize> {
        match self {
            RuntimeError::Hidden(e) => e.token(),
            RuntimeError::Probe { token, .. } | RuntimeError::Inference { token, .. } => Some(*token),
            _ => None,
        }
    }
}

/// The runtime behind the synchronous [`Engine`](crate::engine::Engine) interface, for the
/// command line and benchmarks: it owns a tokio runtime and blocks on each request.
pub struct BlockingCascade {
    rt: tokio::runtime::Runtime,
    cascade: Cascade,
}

impl BlockingCascade {
    pub fn start(pack: Arc<Pack>, config: &Config) -> Result<Self, RuntimeError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("probe-cascade-rt")
            .enable_all()
            .build()
            .map_err(|e| RuntimeError::Setup(format!("starting tokio: {e}")))?;
        let cascade = rt.block_on(Cascade::start(pack, config))?;
        Ok(Self { rt, cascade })
    }

    pub fn cascade(&self) -> &Cascade {
        &self.cascade
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

impl crate::engine::Engine for BlockingCascade {
    fn name(&self) -> &'static str {
        "runtime"
    }

    fn observe(&mut self, _token: usize, hidden: &[f32]) -> Result<TokenReport, EngineError> {
        self.rt.block_on(self.cascade.observe(hidden.to_vec())).map_err(|e| match e {
            RuntimeError::Hidden(e) => e,
            other => EngineError::Runtime { token: other.token(), message: other.to_string() },
        })
    }

    fn active(&self) -> Vec<ConceptId> {
        self.rt.block_on(self.cascade.active()).unwrap_or_default()
    }

    fn weight_traffic(&self) -> Option<WeightTraffic> {
        self.rt.block_on(self.cascade.weight_traffic()).ok()
    }
}

impl Drop for BlockingCascade {
    fn drop(&mut self) {
        self.rt.block_on(self.cascade.shutdown());
    }
}

/// Why a message to an actor got no reply.
fn describe<M, E>(e: &kameo::error::SendError<M, E>) -> &'static str {
    use kameo::error::SendError::*;
    match e {
        ActorNotRunning(_) => "it is not running",
        ActorStopped => "it stopped or panicked before replying",
        ActorRestarting(_) => "it is restarting",
        MailboxFull(_) => "its mailbox is full",
        HandlerError(_) => "its handler failed",
        Timeout(_) => "it timed out",
    }
}
