//! The actor runtime: every stream is a [`Session`] on a shared [`Runtime`]; reads on
//! io_uring, a byte-budgeted RAM cache, and one step scheduler that scores every session's
//! tokens together through a scoring backend (docs/architecture.md follows one token).
//!
//! ```text
//!  Session ──Observe──▶ Coordinator ──Get/Peek/Prefetch──▶ WeightCache ──ReadRequest──▶ reader thread
//!  (one per stream)     (policies,   ──Work (lane)──▶ step scheduler ◀──ReadDone──      (io_uring
//!                        model pool)                 (own thread,                        or threads)
//!                                                     ScoringBackend)
//! ```
//!
//! [`Cascade`] is one session on a runtime of its own, for callers with one stream; it runs
//! the same code as every other session, so what `bench` and `tune` measure is what `serve`
//! and the Python package run.

pub mod cache;
pub mod coordinator;
pub mod faults;
pub mod pool;
pub mod reader;
pub mod scoring;
pub mod session;
pub mod steps;

pub use crate::types::{SessionId, WeightTraffic};
pub use session::{Runtime, Session, SessionOptions};
pub use steps::StepStats;

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::engine::EngineError;
use crate::kernel::KernelError;
use crate::pack::{ConceptId, Pack};
use crate::types::{Hidden, HiddenError, ReaderKind, TokenReport};
use cache::{CacheStats, ReadError};
use coordinator::Broken;
use faults::Faults;
use pool::PoolFull;
use scoring::ScoringError;

/// Why a runtime (or a session) could not start. Nothing was left running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config does not fit the pack (base layers, the exhaustive mode under a cap), or a
    /// session's options are not a valid config: names the key.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "runtime.cache_bytes = {budget} holds {} probes of this pack ({probe} bytes each), but up to {cap} \
         can be active (cascade.max_loaded): the CPU kernel scores active probes in place in the cache, \
         so set runtime.cache_bytes to at least {} (or device.cpu_kernel = \"torch\" to copy them into an \
         arena instead)",
        budget / probe,
        cap * probe
    )]
    CacheTooSmall { budget: u64, probe: u64, cap: u64 },
    /// `device.device` names no device libtorch can use.
    #[error(transparent)]
    Device(EngineError),
    #[error("allocating the resident store ({rows} probes of {row_bytes} bytes; device.store_bytes): {source}")]
    Store {
        rows: usize,
        row_bytes: usize,
        #[source]
        source: tch::TchError,
    },
    #[error(
        "device.store_bytes = {store_bytes} holds {} probes of {row_bytes} bytes, fewer than the {base} base \
         probes every session pins (raise device.store_bytes, or 0 for the default)",
        store_bytes / *row_bytes as u64
    )]
    StoreTooSmall { store_bytes: u64, row_bytes: usize, base: usize },
    #[error("device.cpu_kernel = \"{name}\": {source}")]
    Kernel {
        name: &'static str,
        #[source]
        source: KernelError,
    },
    #[error("starting the probe reader: {0}")]
    Reader(#[source] std::io::Error),
    #[error("starting the step scheduler's thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What went wrong with one token, and which token it was.
#[derive(Debug, thiserror::Error)]
#[error("token {token}: {kind}")]
pub struct TokenError {
    pub token: usize,
    #[source]
    pub kind: TokenErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenErrorKind {
    /// A bad hidden state (wrong width, NaN).
    #[error(transparent)]
    Hidden(HiddenError),
    /// A probe the token needed could not be read (names the concept and the file).
    #[error(transparent)]
    Probe(ReadError),
    #[error(transparent)]
    Scoring(ScoringError),
    #[error(transparent)]
    Pool(PoolFull),
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// One token failed; the stream goes on from the state before it.
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the {actor} actor did not answer ({detail})")]
    ActorStopped { actor: &'static str, detail: &'static str },
    #[error("the stream stopped serving after an earlier failure: {0}")]
    Broken(#[source] Broken),
    #[error("the cascade has shut down")]
    ShutDown,
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("runtime.max_sessions = {limit}: that many sessions are open already")]
    SessionLimit { limit: usize },
    /// The resident store cannot pin even the session's base layers (other sessions pin the
    /// rest): names `device.store_bytes` and what is left.
    #[error("a new session's base layers do not fit: {0}")]
    StoreLimit(#[source] scoring::store::StoreFull),
    #[error("{0} is not open on this runtime")]
    UnknownSession(SessionId),
    /// A session's options (at open or reconfigure) are not valid: names the key.
    #[error("session options: {0}")]
    Options(#[source] StartError),
    #[error("session options: `{key}` cannot change on an open session")]
    FixedKey { key: &'static str },
}

impl RuntimeError {
    /// The token the error belongs to, if it is about one token.
    pub fn token(&self) -> Option<usize> {
        match self {
            RuntimeError::Token(e) => Some(e.token),
            _ => None,
        }
    }

    /// A token's error of this kind.
    pub(crate) fn token_error(token: usize, kind: TokenErrorKind) -> Self {
        RuntimeError::Token(TokenError { token, kind })
    }
}

/// One stream: a session on a runtime of its own. The same code as every session of a
/// shared runtime (there is no other way to stream); cheap to clone.
#[derive(Clone)]
pub struct Cascade {
    runtime: Runtime,
    session: Arc<Session>,
}

impl Cascade {
    /// Starts a runtime and opens its one session. Needs a multi-threaded tokio runtime.
    pub async fn start(pack: Arc<Pack>, config: &Config) -> Result<Self, RuntimeError> {
        Self::start_with_faults(pack, config, Faults::none()).await
    }

    /// [`Cascade::start`] with faults injected (tests only; see [`faults`]).
    pub async fn start_with_faults(pack: Arc<Pack>, config: &Config, faults: Faults) -> Result<Self, RuntimeError> {
        let runtime = Runtime::start_with_faults(pack, config, faults).await?;
        let session = Arc::new(runtime.open_session(SessionOptions::default()).await?);
        Ok(Self { runtime, session })
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Scores one hidden state; tokens are numbered in the order their requests arrive.
    pub async fn observe(&self, hidden: impl Into<Hidden>) -> Result<TokenReport, RuntimeError> {
        self.session.observe(hidden).await
    }

    /// Scores one token from one hidden state per model layer (see [`Session::observe_states`]).
    pub async fn observe_states(&self, states: Vec<Hidden>) -> Result<TokenReport, RuntimeError> {
        self.session.observe_states(states).await
    }

    /// The active probes, ascending.
    pub async fn active(&self) -> Result<Vec<ConceptId>, RuntimeError> {
        self.session.active().await
    }

    /// See [`Session::settle`].
    pub async fn settle(&self) -> Result<(), RuntimeError> {
        self.session.settle().await
    }

    /// Weight bytes the scoring backend has copied (none with the CPU kernel), and its path.
    pub async fn weight_traffic(&self) -> Result<WeightTraffic, RuntimeError> {
        Ok(self.runtime.step_stats().await?.traffic)
    }

    pub async fn cache_stats(&self) -> Result<CacheStats, RuntimeError> {
        self.runtime.cache_stats().await
    }

    /// The reader actually in use (io_uring, or threads after a fallback).
    pub fn reader(&self) -> ReaderKind {
        self.runtime.reader()
    }

    /// Finishes every request already queued, then stops the runtime. Requests sent after
    /// this get `RuntimeError::ShutDown`.
    pub async fn shutdown(&self) {
        self.runtime.shutdown().await;
    }
}

/// A [`Cascade`] behind the synchronous [`Engine`](crate::engine::Engine) interface, for the
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
            .map_err(StartError::Thread)?;
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

    fn observe_states(&mut self, _token: usize, states: &[&[f32]]) -> Result<TokenReport, EngineError> {
        let states = states.iter().map(|h| Hidden::from(*h)).collect();
        self.rt.block_on(self.cascade.observe_states(states)).map_err(|e| match e {
            RuntimeError::Token(TokenError { token, kind: TokenErrorKind::Hidden(source) }) => {
                EngineError::Hidden { token, source }
            }
            other => EngineError::Other { token: other.token(), error: Box::new(other) },
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
