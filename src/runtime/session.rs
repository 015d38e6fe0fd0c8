//! Many streams on one runtime: a [`Runtime`] owns the pack, the weight cache and its reader,
//! and the step scheduler (the CPU kernel, or one shared tch arena, on its own thread); each
//! stream is a cheap
//! [`Session`] with its own coordinator (active set, token counter, pending loads, cascade
//! settings). Tokens of different sessions that wait at the same time are scored in one step
//! (see [`super::steps`]).
//!
//! ```text
//!  Session ──Observe──▶ Coordinator (per session) ──Get/Peek/Prefetch──▶ WeightCache (shared)
//!  Session ──Observe──▶ Coordinator (per session) ──Work──▶ step scheduler (shared thread)
//! ```
//!
//! Admission: `runtime.max_sessions` bounds open sessions, and each session's mailbox holds
//! `runtime.request_queue` requests. On the CPU a session reserves nothing: its active probes
//! are references to cache entries, so what is resident is the union of the sessions' active
//! sets, each probe once. The cache must hold one session's cap (`cascade.max_loaded` probes,
//! checked at start and for each session's options); beyond its budget, active probes stay
//! pinned while used, so RAM is bounded by `runtime.cache_bytes` plus, at worst,
//! `max_sessions × max_loaded` probes that are active at once and did not fit. On a shared
//! arena each session reserves its cap of `runtime.pool_slots` slots when it opens, so no
//! token fails for want of a slot (docs/architecture.md, "Sessions").

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kameo::mailbox;
use kameo::prelude::{ActorRef, Spawn, WeakActorRef};

use super::cache::{self, CacheStats, WeightCache};
pub use super::coordinator::FIXED_CASCADE_KEYS;
use super::coordinator::{ActiveSet, Coordinator, Reconfigure, Scorer};
use super::faults::Faults;
use super::inference::TorchArena;
use super::reader::ReaderKind;
use super::steps::{self, Lane, Scoring, SessionId, SharedArena, StepMsg, StepStats, Steps};
use super::{check_cache_holds_the_cap, new_coordinator, observe_on, settle_on, spawn_cache, RuntimeError};
use crate::config::{CascadeConfig, Config, CpuKernel, Mode};
use crate::engine::tensors::{self, RowSplit};
use crate::engine::{Hidden, TokenReport};
use crate::kernel::{Isa, Kernel};
use crate::pack::{ConceptId, Pack};

/// A session's own settings; what is `None` comes from the runtime's config. Checked like a
/// config file's (errors name the key), and against the runtime's limits.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// The cascade knobs (expansion, pruning, base layers, report size, `max_loaded`).
    pub cascade: Option<CascadeConfig>,
    pub mode: Option<Mode>,
    pub latency_budget_us: Option<u64>,
}

struct Shared {
    pack: Arc<Pack>,
    config: Config,
    cache: ActorRef<WeightCache>,
    reader: ReaderKind,
    /// None once shut down: no new sessions.
    steps: Mutex<Option<flume::Sender<StepMsg>>>,
    sessions: Mutex<HashMap<SessionId, WeakActorRef<Coordinator>>>,
    open: AtomicUsize,
    /// The shared arena's slots, when sessions score on one (an accelerator, or
    /// `device.cpu_kernel = "torch"`); `reserved` of them are promised to open sessions.
    arena: Option<usize>,
    reserved: AtomicUsize,
    next_id: AtomicU64,
    stopping: AtomicBool,
    faults: Faults,
}

/// One shared runtime for many streams. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    shared: Arc<Shared>,
}

impl Runtime {
    /// Starts the cache and the step scheduler. Needs a multi-threaded tokio runtime. On the
    /// CPU sessions score on the kernel, in place in the cache; on an accelerator (or with
    /// `device.cpu_kernel = "torch"`) on one tch arena of `runtime.pool_slots` slots shared by
    /// all sessions, each of which reserves its cap of them when it opens.
    pub async fn start(pack: Arc<Pack>, config: &Config) -> Result<Self, RuntimeError> {
        Self::start_with_faults(pack, config, Faults::none()).await
    }

    /// [`Runtime::start`] with faults injected (tests only; see [`super::faults`]).
    pub async fn start_with_faults(pack: Arc<Pack>, config: &Config, faults: Faults) -> Result<Self, RuntimeError> {
        crate::policy::base_set(pack.hierarchy(), &config.cascade).map_err(RuntimeError::Setup)?;
        let device = tensors::open_device(&config.device)?;
        let window = std::time::Duration::from_micros(config.runtime.batch_window_us);
        let on_arena = device != tch::Device::Cpu || config.device.cpu_kernel == CpuKernel::Torch;
        let (scoring, path) = if on_arena {
            // One arena for all sessions, `runtime.pool_slots` slots; each session reserves
            // its cap of them when it opens (see `open_session`).
            let staging = (device != tch::Device::Cpu).then_some(config.runtime.staging_bytes);
            let compute = tensors::kind_of(config.device.compute_dtype);
            let torch = TorchArena::new(&pack, config.runtime.pool_slots, device, compute, staging, RowSplit::none())
                .map_err(|e| RuntimeError::Setup(format!("allocating the shared arena: {e}")))?;
            let path = torch.path();
            (Scoring::Arena(SharedArena::new(torch, config.runtime.pool_slots)), path)
        } else {
            check_cache_holds_the_cap(&pack, config)?;
            let isa = config.device.cpu_kernel.isa().unwrap_or_else(Isa::best);
            let kernel = Kernel::new(&pack.layout(), isa, tensors::math_threads(&config.device)).map_err(|e| {
                RuntimeError::Setup(format!("device.cpu_kernel = \"{}\": {e}", config.device.cpu_kernel.name()))
            })?;
            (Scoring::Kernel(kernel), isa.name())
        };
        let tx = steps::spawn(Steps::new(pack.clone(), scoring, window, path, faults.clone()))
            .map_err(|e| RuntimeError::Setup(format!("starting the step scheduler: {e}")))?;
        let (cache, reader) = spawn_cache(&pack, &config.runtime, &faults)?;
        Ok(Self {
            shared: Arc::new(Shared {
                pack,
                config: config.clone(),
                cache,
                reader,
                steps: Mutex::new(Some(tx)),
                arena: on_arena.then_some(config.runtime.pool_slots),
                reserved: AtomicUsize::new(0),
                sessions: Mutex::new(HashMap::new()),
                open: AtomicUsize::new(0),
                next_id: AtomicU64::new(0),
                stopping: AtomicBool::new(false),
                faults,
            }),
        })
    }

    pub fn pack(&self) -> &Arc<Pack> {
        &self.shared.pack
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Opens a session: its own cascade settings (checked), its base layers loaded (shared
    /// with other sessions in the cache).
    pub async fn open_session(&self, options: SessionOptions) -> Result<Session, RuntimeError> {
        let shared = &self.shared;
        let config = session_config(&shared.config, &options)?;
        if shared.arena.is_none() {
            check_cache_holds_the_cap(&shared.pack, &config).map_err(|e| RuntimeError::Options(e.to_string()))?;
        }
        let base = crate::policy::base_set(shared.pack.hierarchy(), &config.cascade).map_err(RuntimeError::Options)?;
        let limit = config.runtime.max_sessions;
        // Reserve a place first, so that concurrent opens cannot pass the limit together.
        if shared.open.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1)).is_err() {
            return Err(RuntimeError::SessionLimit { limit });
        }
        let mut reservation = Reservation { shared, slots: 0 };
        if let Some(slots) = shared.arena {
            // The arena holds what every open session may need: its cap of active probes.
            let need = config.cascade.max_loaded.min(config.runtime.pool_slots);
            let taken = shared
                .reserved
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| (r + need <= slots).then_some(r + need));
            match taken {
                Ok(_) => reservation.slots = need,
                Err(reserved) => return Err(RuntimeError::ArenaLimit { slots, reserved, need }),
            }
        }
        let id = SessionId(shared.next_id.fetch_add(1, Ordering::SeqCst));
        let tx = shared.steps.lock().expect("steps lock").clone().ok_or(RuntimeError::ShutDown)?;
        let lane = Lane::open(id, config.runtime.pool_slots, tx).map_err(|_| RuntimeError::ShutDown)?;
        let rt = &config.runtime;
        let scorer = Scorer::Shared(lane);
        let mut coordinator =
            new_coordinator(shared.pack.clone(), &config.cascade, rt, base, shared.cache.clone(), scorer, false);
        coordinator.faults = shared.faults.clone();
        coordinator.load_base().await?;
        let coordinator = Coordinator::spawn_with_mailbox(coordinator, mailbox::bounded(rt.request_queue));
        shared.sessions.lock().expect("sessions lock").insert(id, coordinator.downgrade());
        let arena_slots = std::mem::replace(&mut reservation.slots, 0);
        std::mem::forget(reservation);
        Ok(Session { id, coordinator, shared: shared.clone(), closed: false, arena_slots })
    }

    /// One decode step of many sessions: each `(session, hidden)` is observed, all at once,
    /// so that their scoring shares steps. Answers come back in the order asked, one per
    /// item, each a report or that item's error (an unknown session, a bad hidden state).
    pub async fn observe_batch<H: Into<Hidden>>(
        &self,
        items: Vec<(SessionId, H)>,
    ) -> Vec<Result<TokenReport, RuntimeError>> {
        let coordinators: Vec<_> = {
            let sessions = self.shared.sessions.lock().expect("sessions lock");
            items.iter().map(|(id, _)| sessions.get(id).and_then(WeakActorRef::upgrade)).collect()
        };
        let asks = items.into_iter().zip(coordinators).map(|((id, hidden), c)| async move {
            match c {
                Some(c) => observe_on(&c, hidden.into(), &self.shared.stopping).await,
                None => Err(RuntimeError::UnknownSession(id)),
            }
        });
        futures::future::join_all(asks).await
    }

    /// Gives an open session new live settings from its next token on: its cascade knobs
    /// (all but those in [`FIXED_CASCADE_KEYS`]) and latency budget. `options` are checked as
    /// `open_session` checks them; `options.mode` is ignored (a session keeps its mode).
    pub async fn reconfigure(&self, id: SessionId, options: &SessionOptions) -> Result<(), RuntimeError> {
        let config = session_config(&self.shared.config, options)?;
        // What the pack itself rules out (the exhaustive mode under a smaller max_loaded).
        crate::policy::base_set(self.shared.pack.hierarchy(), &config.cascade).map_err(RuntimeError::Options)?;
        let coordinator = self.shared.sessions.lock().expect("sessions lock").get(&id).and_then(WeakActorRef::upgrade);
        let coordinator = coordinator.ok_or(RuntimeError::UnknownSession(id))?;
        let reconfigure = Reconfigure {
            cascade: config.cascade,
            latency_budget: std::time::Duration::from_micros(config.runtime.latency_budget_us),
        };
        match coordinator.ask(reconfigure).await {
            Ok(()) => Ok(()),
            Err(kameo::error::SendError::HandlerError(e)) => Err(e),
            Err(_) => Err(RuntimeError::UnknownSession(id)),
        }
    }

    /// Open sessions.
    pub fn sessions(&self) -> Vec<SessionId> {
        let mut ids: Vec<SessionId> = self.shared.sessions.lock().expect("sessions lock").keys().copied().collect();
        ids.sort();
        ids
    }

    /// What the step scheduler has done, and what the sessions hold.
    pub async fn step_stats(&self) -> Result<StepStats, RuntimeError> {
        let tx = self.shared.steps.lock().expect("steps lock").clone().ok_or(RuntimeError::ShutDown)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(StepMsg::Stats(reply)).map_err(|_| RuntimeError::ShutDown)?;
        answer.await.map_err(|_| RuntimeError::ShutDown)
    }

    pub async fn cache_stats(&self) -> Result<CacheStats, RuntimeError> {
        self.shared.cache.ask(cache::Stats).await.map_err(|_| RuntimeError::ShutDown)
    }

    pub fn reader(&self) -> ReaderKind {
        self.shared.reader
    }

    /// Stops new sessions, answers every request already queued in every session, then stops
    /// the sessions, the cache and (when the last lane closes) the step scheduler. Requests
    /// sent afterwards get `RuntimeError::ShutDown`.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        shared.stopping.store(true, Ordering::SeqCst);
        shared.steps.lock().expect("steps lock").take();
        let sessions: Vec<_> = shared.sessions.lock().expect("sessions lock").drain().map(|(_, c)| c).collect();
        for c in sessions.iter().filter_map(WeakActorRef::upgrade) {
            let _ = c.stop_gracefully().await;
            let _ = c.wait_for_shutdown_result().await;
        }
        let _ = shared.cache.stop_gracefully().await;
        let _ = shared.cache.wait_for_shutdown_result().await;
    }
}

/// Gives back a reserved session place (and arena slots) unless the open completed.
struct Reservation<'a> {
    shared: &'a Shared,
    slots: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
        self.shared.reserved.fetch_sub(self.slots, Ordering::SeqCst);
    }
}

/// The runtime's config with a session's options applied, validated.
fn session_config(base: &Config, options: &SessionOptions) -> Result<Config, RuntimeError> {
    let mut config = base.clone();
    if let Some(cascade) = &options.cascade {
        config.cascade = cascade.clone();
    }
    if let Some(mode) = options.mode {
        config.runtime.mode = mode;
    }
    if let Some(us) = options.latency_budget_us {
        config.runtime.latency_budget_us = us;
    }
    config.validate(Path::new("session options")).map_err(|e| RuntimeError::Options(e.to_string()))?;
    Ok(config)
}

/// One stream on a [`Runtime`]. Closing it (or dropping it) answers what it has queued and
/// frees what only it used.
pub struct Session {
    id: SessionId,
    coordinator: ActorRef<Coordinator>,
    shared: Arc<Shared>,
    closed: bool,
    /// Slots of the shared arena reserved for this session (0 on the CPU kernel).
    arena_slots: usize,
}

impl Session {
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Scores one hidden state; this session's tokens are numbered from 0 in arrival order.
    pub async fn observe(&self, hidden: impl Into<Hidden>) -> Result<TokenReport, RuntimeError> {
        observe_on(&self.coordinator, hidden.into(), &self.shared.stopping).await
    }

    /// The session's active probes, ascending.
    pub async fn active(&self) -> Result<Vec<ConceptId>, RuntimeError> {
        self.coordinator.ask(ActiveSet).await.map_err(|_| RuntimeError::ShutDown)
    }

    /// Waits until this session has no load in flight (see `Cascade::settle`).
    pub async fn settle(&self) -> Result<(), RuntimeError> {
        settle_on(&self.coordinator, &self.shared.cache).await
    }

    /// Answers every request already queued, then frees the session's slots (its references
    /// to cache entries) and its place under `runtime.max_sessions`. When it returns, the
    /// step scheduler has been told to free them, ahead of anything sent after.
    pub async fn close(mut self) {
        self.closed = true;
        self.unregister();
        let _ = self.coordinator.stop_gracefully().await;
        let _ = self.coordinator.wait_for_shutdown_result().await;
    }

    fn unregister(&self) {
        if self.shared.sessions.lock().expect("sessions lock").remove(&self.id).is_some() {
            self.shared.open.fetch_sub(1, Ordering::SeqCst);
            self.shared.reserved.fetch_sub(self.arena_slots, Ordering::SeqCst);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        self.unregister();
        // A graceful stop still answers what is queued; nobody waits for it here.
        let coordinator = self.coordinator.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let _ = coordinator.stop_gracefully().await;
                });
            }
            Err(_) => coordinator.kill(),
        }
    }
}
