//! The one way to stream: a [`Runtime`] owns the pack, the weight cache and its reader, the
//! step scheduler (with its scoring backend, on its own thread), the registry of open sessions
//! and the admission semaphores; each stream is a cheap [`Session`] with its own coordinator
//! (model pool and active set, token counter, pending loads, cascade settings). Tokens of
//! different sessions that wait at the same time are scored in one step (see [`super::steps`]).
//!
//! ```text
//!  Session ──Observe──▶ Coordinator (per session) ──Get/Peek/Prefetch──▶ WeightCache (shared)
//!  Session ──Observe──▶ Coordinator (per session) ──Work──▶ step scheduler (shared thread)
//! ```
//!
//! Admission is by semaphore permits that the `Session` holds and gives back when it goes:
//! one of `runtime.max_sessions` for each session. Each session's mailbox holds
//! `runtime.request_queue` requests. On the CPU kernel a session's active probes are
//! references to cache entries, so what is resident is the union of the sessions' active
//! sets, each probe once. The cache must hold one session's cap (checked at start and for each
//! session's options); beyond its budget, active probes stay pinned while used, so RAM is
//! bounded by `runtime.cache_bytes` plus, at worst, `max_sessions × max_loaded` probes that are
//! active at once and did not fit (docs/architecture.md, "Sessions"). On the tch backend (an
//! accelerator, or `device.cpu_kernel = "torch"`) residency is the resident store's, shared by
//! every session under `device.store_bytes` and nothing else: a session reserves no rows, and
//! is refused only when its base layers cannot be pinned ([`RuntimeError::StoreLimit`]).

use std::any::Any;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kameo::mailbox;
use kameo::prelude::{ActorRef, Spawn, WeakActorRef};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::cache::{self, CacheSettings, CacheStats, WeightCache};
pub use super::coordinator::FIXED_CASCADE_KEYS;
use super::coordinator::{ActiveSet, Coordinator, Drain, LayerPool, Observe, PendingLoads, Reconfigure};
use super::faults::Faults;
use super::pool::ModelPool;
use super::scoring::kernel::KernelBackend;
use super::scoring::torch::{free_memory, row_bytes, Resident, TorchBackend};
use super::scoring::{ScoringBackend, ScoringError};
use super::steps::{self, Lane, StepMsg, StepStats, Steps};
use super::{RuntimeError, StartError, TokenError, TokenErrorKind};
use crate::config::{CascadeConfig, Config, CpuKernel, Mode};
use crate::engine::tensors;
use crate::kernel::{Isa, Kernel};
use crate::pack::{ConceptId, Pack};
use crate::policy::{default_alert_threshold, Watch};
use crate::types::{Hidden, ReaderKind, SessionId, TokenReport};

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
    /// The registry of open sessions: the one place that knows which are open.
    sessions: Mutex<HashMap<SessionId, Registered>>,
    /// Admission: one permit per open session, `runtime.max_sessions` in all.
    session_permits: Arc<Semaphore>,
    /// On the tch backend: which probes its resident store holds, so that coordinators fetch
    /// no bytes for those, and its device (None on the CPU kernel, which scores in the cache).
    resident: Option<Resident>,
    /// The config's watch profiles, compiled once: sessions that keep them share it.
    watch: Arc<Watch>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    faults: Faults,
}

impl Shared {
    /// A session's compiled watch profiles: the runtime's own when it keeps the config's
    /// (compiled once, shared), else its own, checked against the pack.
    fn watch_for(&self, config: &Config) -> Result<Arc<Watch>, RuntimeError> {
        if config.cascade.watch == self.config.cascade.watch {
            return Ok(self.watch.clone());
        }
        let watch = Watch::compile(self.pack.hierarchy(), &config.cascade.watch, default_alert_threshold(&self.pack))
            .map_err(|e| RuntimeError::Options(e.into()))?;
        Ok(Arc::new(watch))
    }
}

/// What the registry keeps of an open session: its coordinator, and what the embedder (the
/// server) attached to it when it opened.
struct Registered {
    coordinator: WeakActorRef<Coordinator>,
    attached: Option<Arc<dyn Any + Send + Sync>>,
}

/// One shared runtime for many streams. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    shared: Arc<Shared>,
}

impl Runtime {
    /// Starts the cache and the step scheduler. Needs a multi-threaded tokio runtime. On the
    /// CPU sessions score on the kernel, in place in the cache; on an accelerator (or with
    /// `device.cpu_kernel = "torch"`) on the tch backend's resident store, shared by every
    /// session (`device.store_bytes`).
    pub async fn start(pack: Arc<Pack>, config: &Config) -> Result<Self, RuntimeError> {
        Self::start_with_faults(pack, config, Faults::none()).await
    }

    /// [`Runtime::start`] with faults injected (tests only; see [`super::faults`]).
    pub async fn start_with_faults(pack: Arc<Pack>, config: &Config, faults: Faults) -> Result<Self, RuntimeError> {
        let base = crate::policy::base_set(pack.hierarchy(), &config.cascade).map_err(StartError::Config)?;
        let watch = Arc::new(
            Watch::compile(pack.hierarchy(), &config.cascade.watch, default_alert_threshold(&pack))
                .map_err(StartError::Config)?,
        );
        let device = tensors::open_device(&config.device).map_err(StartError::Device)?;
        let window = std::time::Duration::from_micros(config.runtime.batch_window_us);
        let on_store = device != tch::Device::Cpu || config.device.cpu_kernel == CpuKernel::Torch;
        let mut resident = None;
        let backend: Box<dyn ScoringBackend> = if on_store {
            // Staged uploads on an accelerator; on the CPU `copy_` reads the cache's bytes directly.
            let staging = (device != tch::Device::Cpu).then_some(config.runtime.staging_bytes);
            let compute = tensors::kind_of(config.device.compute_dtype);
            let row_bytes = row_bytes(pack.hidden_dim(), compute);
            let base = pinned_set(&pack, &base);
            let rows = store_rows(&pack, config.device.store_bytes, row_bytes, device, base.len())?;
            let backend = TorchBackend::new(pack.clone(), rows, device, compute, staging, base, faults.clone())
                .map_err(|source| StartError::Store { rows, row_bytes, source })?
                .use_cuda_graphs(config.device.cuda_graphs);
            resident = Some(backend.resident());
            Box::new(backend)
        } else {
            check_cache_holds_the_cap(&pack, config)?;
            let isa = config.device.cpu_kernel.isa().unwrap_or_else(Isa::best);
            let kernel = Kernel::new(&pack.layout(), isa, tensors::math_threads(&config.device))
                .map_err(|source| StartError::Kernel { name: config.device.cpu_kernel.name(), source })?;
            Box::new(KernelBackend::new(pack.clone(), kernel, isa.name()))
        };
        let tx = steps::spawn(Steps::new(pack.clone(), backend, window, faults.clone())).map_err(StartError::Thread)?;
        let (cache, reader) = spawn_cache(&pack, &config.runtime, &faults)?;
        Ok(Self {
            shared: Arc::new(Shared {
                pack,
                config: config.clone(),
                cache,
                reader,
                steps: Mutex::new(Some(tx)),
                sessions: Mutex::new(HashMap::new()),
                session_permits: Arc::new(Semaphore::new(config.runtime.max_sessions)),
                resident,
                watch,
                next_id: AtomicU64::new(0),
                stopping: AtomicBool::new(false),
                faults,
            }),
        })
    }

    pub fn pack(&self) -> &Arc<Pack> {
        &self.shared.pack
    }

    /// The device of the resident store that scores (`None`: the CPU kernel scores). A
    /// [`Hidden::tensor`](crate::types::Hidden::tensor) on it is read there, never copied to
    /// the host; the Python binding hands such tensors over as they are.
    pub fn store_device(&self) -> Option<tch::Device> {
        self.shared.resident.as_ref().map(|r| r.device)
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Opens a session: its own cascade settings (checked), its base layers loaded (shared
    /// with other sessions in the cache).
    pub async fn open_session(&self, options: SessionOptions) -> Result<Session, RuntimeError> {
        self.open(options, |_| None).await
    }

    /// [`Runtime::open_session`], attaching what `attach` makes of the new session's id to its
    /// registry entry, where [`Runtime::attached`] finds it until the session closes: the
    /// server keeps its per-session facts (peer, label, token count) there, so that the
    /// runtime's registry is the one list of open sessions.
    pub async fn open_session_with<T: Any + Send + Sync>(
        &self,
        options: SessionOptions,
        attach: impl FnOnce(SessionId) -> Arc<T>,
    ) -> Result<Session, RuntimeError> {
        self.open(options, |id| Some(attach(id) as Arc<dyn Any + Send + Sync>)).await
    }

    /// What was attached to open session `id`, if it is open and holds a `T`.
    pub fn attached<T: Any + Send + Sync>(&self, id: SessionId) -> Option<Arc<T>> {
        let sessions = self.shared.sessions.lock().expect("sessions lock");
        sessions.get(&id)?.attached.clone()?.downcast().ok()
    }

    /// Every open session's attachment of type `T`, by session id.
    pub fn attachments<T: Any + Send + Sync>(&self) -> Vec<(SessionId, Arc<T>)> {
        let sessions = self.shared.sessions.lock().expect("sessions lock");
        let mut all: Vec<(SessionId, Arc<T>)> =
            sessions.iter().filter_map(|(&id, r)| Some((id, r.attached.clone()?.downcast().ok()?))).collect();
        all.sort_by_key(|(id, _)| *id);
        all
    }

    async fn open(
        &self,
        options: SessionOptions,
        attach: impl FnOnce(SessionId) -> Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<Session, RuntimeError> {
        let shared = &self.shared;
        let config = session_config(&shared.config, &options)?;
        if shared.resident.is_none() {
            check_cache_holds_the_cap(&shared.pack, &config).map_err(RuntimeError::Options)?;
        }
        let base = crate::policy::base_set(shared.pack.hierarchy(), &config.cascade)
            .map_err(|e| RuntimeError::Options(e.into()))?;
        let watch = shared.watch_for(&config)?;
        // Permits first, so that concurrent opens cannot pass the limits together; held by the
        // session, they go back when it does (or now, if the open fails below).
        let limit = config.runtime.max_sessions;
        let session_permit = match shared.session_permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => return Err(RuntimeError::SessionLimit { limit }),
            Err(TryAcquireError::Closed) => return Err(RuntimeError::ShutDown),
        };
        // One lane per model layer, each with its own slots at the scheduler: the first has the
        // session's id, the others the ids after it.
        let lanes = shared.pack.hidden_states() as u64;
        let id = SessionId(shared.next_id.fetch_add(lanes, Ordering::SeqCst));
        let tx = shared.steps.lock().expect("steps lock").clone().ok_or(RuntimeError::ShutDown)?;
        let mut layers = Vec::with_capacity(lanes as usize);
        for l in 0..lanes {
            // The lane's simplex poles stay active beside the lenses: slots of their own.
            let pack = &shared.pack;
            let slots =
                config.runtime.pool_slots + pack.pole_probes().filter(|&p| pack.probe(p).state as u64 == l).count();
            let lane = Lane::open(SessionId(id.0 + l), slots, tx.clone()).map_err(|_| RuntimeError::ShutDown)?;
            layers.push(LayerPool { pool: ModelPool::new(slots, pack.probe_count()), lane });
        }
        let mut coordinator = new_coordinator(shared, &config, base, watch, layers);
        coordinator.load_base().await.map_err(|e| match e {
            RuntimeError::Token(TokenError {
                kind: TokenErrorKind::Scoring(ScoringError::StoreFull(full)), ..
            }) => RuntimeError::StoreLimit(full),
            e => e,
        })?;
        let coordinator = Coordinator::spawn_with_mailbox(coordinator, mailbox::bounded(config.runtime.request_queue));
        let registered = Registered { coordinator: coordinator.downgrade(), attached: attach(id) };
        shared.sessions.lock().expect("sessions lock").insert(id, registered);
        Ok(Session { id, coordinator, shared: shared.clone(), closed: false, _permit: session_permit })
    }

    /// One decode step of many sessions: each `(session, hidden)` is observed, all at once,
    /// so that their scoring shares steps. Answers come back in the order asked, one per
    /// item, each a report or that item's error (an unknown session, a bad hidden state).
    pub async fn observe_batch<H: Into<Hidden>>(
        &self,
        items: Vec<(SessionId, H)>,
    ) -> Vec<Result<TokenReport, RuntimeError>> {
        self.observe_batch_states(items.into_iter().map(|(id, h)| (id, vec![h.into()])).collect()).await
    }

    /// [`Runtime::observe_batch`] with one hidden state per model layer of the pack for each
    /// session (see [`Session::observe_states`]).
    pub async fn observe_batch_states(
        &self,
        items: Vec<(SessionId, Vec<Hidden>)>,
    ) -> Vec<Result<TokenReport, RuntimeError>> {
        let coordinators: Vec<_> = items.iter().map(|(id, _)| self.coordinator(*id)).collect();
        let asks = items.into_iter().zip(coordinators).map(|((id, states), c)| async move {
            match c {
                Some(c) => observe_on(&c, states, &self.shared.stopping).await,
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
        crate::policy::base_set(self.shared.pack.hierarchy(), &config.cascade)
            .map_err(|e| RuntimeError::Options(e.into()))?;
        let watch = self.shared.watch_for(&config)?;
        let coordinator = self.coordinator(id).ok_or(RuntimeError::UnknownSession(id))?;
        let reconfigure = Reconfigure {
            watch,
            cascade: config.cascade,
            latency_budget: std::time::Duration::from_micros(config.runtime.latency_budget_us),
        };
        match coordinator.ask(reconfigure).await {
            Ok(()) => Ok(()),
            Err(kameo::error::SendError::HandlerError(e)) => Err(e),
            Err(_) => Err(RuntimeError::UnknownSession(id)),
        }
    }

    /// Open session `id`'s coordinator, from the registry.
    fn coordinator(&self, id: SessionId) -> Option<ActorRef<Coordinator>> {
        self.shared.sessions.lock().expect("sessions lock").get(&id)?.coordinator.upgrade()
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
        shared.session_permits.close();
        shared.steps.lock().expect("steps lock").take();
        // Taken out under the lock, dropped after it: an attachment may own a `Session`,
        // whose drop takes the lock again.
        let registered: Vec<Registered> =
            shared.sessions.lock().expect("sessions lock").drain().map(|(_, r)| r).collect();
        for c in registered.iter().filter_map(|r| r.coordinator.upgrade()) {
            let _ = c.stop_gracefully().await;
            let _ = c.wait_for_shutdown_result().await;
        }
        drop(registered);
        let _ = shared.cache.stop_gracefully().await;
        let _ = shared.cache.wait_for_shutdown_result().await;
    }
}

/// Starts the weight cache (and its reader) under the configured budget.
fn spawn_cache(
    pack: &Arc<Pack>,
    rt: &crate::config::RuntimeConfig,
    faults: &Faults,
) -> Result<(ActorRef<WeightCache>, ReaderKind), StartError> {
    let settings = CacheSettings {
        budget_bytes: rt.cache_bytes,
        queue_depth: rt.prefetch_queue_depth,
        reader: rt.reader,
        fallback_threads: rt.fallback_io_threads,
        faults: faults.clone(),
    };
    let cache = WeightCache::new(pack.clone(), &settings).map_err(StartError::Reader)?;
    let reader = cache.reader_kind();
    Ok((WeightCache::spawn_with_mailbox(cache, mailbox::bounded(rt.request_queue.max(16) * 4)), reader))
}

/// A session's coordinator (not started; the caller loads its base layers).
fn new_coordinator(
    shared: &Shared,
    config: &Config,
    base: crate::policy::ConceptSet,
    watch: Arc<Watch>,
    layers: Vec<LayerPool>,
) -> Coordinator {
    let (pack, cascade, rt) = (&shared.pack, &config.cascade, &config.runtime);
    Coordinator {
        active: crate::policy::ConceptSet::with_capacity(pack.len()),
        layers,
        probe_logits: HashMap::new(),
        baselines: crate::policy::simplex::Baselines::for_pack(pack),
        normalization: cascade.normalization_for(pack.input_normalization()),
        pack: pack.clone(),
        config: Arc::new(cascade.clone()),
        watch,
        hint_margin: rt.prefetch_hint_margin,
        base,
        cache: shared.cache.clone(),
        resident: shared.resident.clone(),
        next_token: 0,
        broken: None,
        mode: rt.mode,
        latency_budget: std::time::Duration::from_micros(rt.latency_budget_us),
        pending: crate::policy::ConceptSet::default(),
        failed_late: Vec::new(),
        warming: Default::default(),
        scoring_time: std::time::Duration::ZERO,
        faults: shared.faults.clone(),
    }
}

/// Share of the free memory (of the device, or of RAM for the CPU store) that the default
/// resident store (`device.store_bytes = 0`) may take: the rest is the model's, and its
/// activations'.
pub const STORE_SHARE_OF_FREE: f64 = 0.5;

/// Rows of the resident store: `device.store_bytes` of them, or by default the whole pack
/// where it fits in [`STORE_SHARE_OF_FREE`] of free memory (as much of it as does otherwise;
/// the whole pack where free memory cannot be read). Never more rows than the pack has
/// probes, and never fewer than the base layers need.
fn store_rows(
    pack: &Pack,
    store_bytes: u64,
    row_bytes: usize,
    device: tch::Device,
    base: usize,
) -> Result<usize, StartError> {
    let budget = match store_bytes {
        0 => free_memory(device).map_or(u64::MAX, |free| (free as f64 * STORE_SHARE_OF_FREE) as u64),
        b => b,
    };
    let rows = (budget / row_bytes as u64).min(pack.probe_count() as u64) as usize;
    if rows < base.max(1) {
        let store_bytes = if store_bytes == 0 { budget } else { store_bytes };
        return Err(StartError::StoreTooSmall { store_bytes, row_bytes, base });
    }
    Ok(rows)
}

/// The CPU kernel scores active probes where they lie in the weight cache, which keeps them
/// pinned while they are active: the cache must hold as many as can be active at once.
fn check_cache_holds_the_cap(pack: &Pack, config: &Config) -> Result<(), StartError> {
    let probe = pack.layout().byte_len() as u64;
    // Active lenses, times the most probes a lens has (each lane has its own slots).
    let lenses = config.cascade.max_loaded.min(config.runtime.pool_slots);
    let cap = (lenses * pack.max_probes_per_lens() + pack.pole_probes().len()) as u64;
    let budget = config.runtime.cache_bytes;
    if budget < cap * probe {
        return Err(StartError::CacheTooSmall { budget, probe, cap });
    }
    Ok(())
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
    config.validate(Path::new("session options")).map_err(|e| RuntimeError::Options(e.into()))?;
    Ok(config)
}

/// The probes always active ([`crate::policy::pinned_probes`]), as a set.
fn pinned_set(pack: &Pack, base: &crate::policy::ConceptSet) -> crate::policy::ProbeSet {
    let mut out = crate::policy::ProbeSet::with_capacity(pack.probe_count());
    for p in crate::policy::pinned_probes(pack, base) {
        out.insert(p);
    }
    out
}

/// Asks a coordinator to score a token (one hidden state per model layer), naming why if it
/// cannot.
async fn observe_on(
    coordinator: &ActorRef<Coordinator>,
    hidden: Vec<Hidden>,
    stopping: &AtomicBool,
) -> Result<TokenReport, RuntimeError> {
    coordinator.ask(Observe(hidden)).await.map_err(|e| match e {
        kameo::error::SendError::HandlerError(e) => e,
        kameo::error::SendError::ActorNotRunning(_) => RuntimeError::ShutDown,
        _ if stopping.load(Ordering::SeqCst) => RuntimeError::ShutDown,
        other => RuntimeError::ActorStopped { actor: "coordinator", detail: super::describe(&other) },
    })
}

/// One stream on a [`Runtime`]. Closing it (or dropping it) answers what it has queued and
/// frees what only it used. It holds its admission permit: a place under
/// `runtime.max_sessions`.
pub struct Session {
    id: SessionId,
    coordinator: ActorRef<Coordinator>,
    shared: Arc<Shared>,
    closed: bool,
    _permit: OwnedSemaphorePermit,
}

impl Session {
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Scores one hidden state, on a pack whose probes read one model layer; this session's
    /// tokens are numbered from 0 in arrival order.
    pub async fn observe(&self, hidden: impl Into<Hidden>) -> Result<TokenReport, RuntimeError> {
        observe_on(&self.coordinator, vec![hidden.into()], &self.shared.stopping).await
    }

    /// Scores one token from one hidden state per model layer of the pack
    /// ([`Pack::model_layers`], in that order); another count is an error naming the layers.
    pub async fn observe_states(&self, states: Vec<Hidden>) -> Result<TokenReport, RuntimeError> {
        observe_on(&self.coordinator, states, &self.shared.stopping).await
    }

    /// The session's active probes, ascending.
    pub async fn active(&self) -> Result<Vec<ConceptId>, RuntimeError> {
        self.coordinator.ask(ActiveSet).await.map_err(|_| RuntimeError::ShutDown)
    }

    /// Waits until no load is in flight: no child pending in the coordinator (pipelined mode),
    /// no hint on its way to the resident store, no read outstanding in the cache (hints
    /// included), and no slot rearrangement (pruning's
    /// moves) queued at the step scheduler. A generation loop gets this for free while it
    /// computes the next token; tests and benchmarks call it to model that gap.
    pub async fn settle(&self) -> Result<(), RuntimeError> {
        loop {
            let pending = self.coordinator.ask(PendingLoads).await.map_err(|_| RuntimeError::ShutDown)?;
            let stats = self.shared.cache.ask(cache::Stats).await.map_err(|_| RuntimeError::ShutDown)?;
            if pending == 0 && stats.in_flight == 0 {
                return match self.coordinator.ask(Drain).await {
                    Ok(()) => Ok(()),
                    Err(kameo::error::SendError::HandlerError(e)) => Err(e),
                    Err(_) => Err(RuntimeError::ShutDown),
                };
            }
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
    }

    /// Answers every request already queued, then frees the session's slots and its permits.
    /// When it returns, the step scheduler has been told to free the slots, ahead of anything
    /// sent after.
    pub async fn close(mut self) {
        self.closed = true;
        self.unregister();
        let _ = self.coordinator.stop_gracefully().await;
        let _ = self.coordinator.wait_for_shutdown_result().await;
    }

    fn unregister(&self) {
        // Dropped after the lock is released (see `Runtime::shutdown`).
        let registered = self.shared.sessions.lock().expect("sessions lock").remove(&self.id);
        drop(registered);
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
