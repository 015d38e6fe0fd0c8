//! The coordinator: one per session. It owns the stream's cascade state (the model pool, which
//! owns the active set; pending loads; the token counter) and runs each token's decisions (the
//! pure `TokenCascade`), asking the cache for bytes and the step scheduler, through the
//! session's lane, for scores. It also acts as the pruner: evictions and speculative prefetch
//! hints go out from here. Asks only go downstream (to the cache and the scheduler), never back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use kameo::error::{Infallible, SendError};
use kameo::message::{Context, Message};
use kameo::prelude::ActorRef;
use kameo::Actor;
use tracing::{debug_span, Instrument};

use super::cache::{Get, Peek, Prefetch, ProbeBytes, ReadError, WeightCache};
use super::faults::{Faults, PanicSite};
use super::pool::{ModelPool, SlotOp};
use super::scoring::store::ResidentView;
use super::scoring::ScoringError;
use super::steps::Lane;
use super::{RuntimeError, TokenErrorKind};
use crate::config::{CascadeConfig, Mode, Normalization};
use crate::engine::{alert_entries, check_hidden, report_entries, Hidden, StageTimings, TokenReport};
use crate::pack::{ConceptId, Pack};
use crate::policy::lens::score_lens;
use crate::policy::{ConceptSet, Scored, TokenCascade, Watch};

pub struct Coordinator {
    pub(super) pack: Arc<Pack>,
    pub(super) config: Arc<CascadeConfig>,
    /// `config.watch`, compiled against the pack.
    pub(super) watch: Arc<Watch>,
    pub(super) normalization: Normalization,
    pub(super) hint_margin: f32,
    pub(super) base: ConceptSet,
    pub(super) pool: ModelPool,
    pub(super) cache: ActorRef<WeightCache>,
    pub(super) lane: Lane,
    /// On the tch backend: what its resident store holds. A probe in it needs no bytes to be
    /// installed, so none are fetched from the cache.
    pub(super) resident: Option<Arc<ResidentView>>,
    pub(super) next_token: usize,
    /// Set when the coordinator panicked mid-token: its pool and the session's slots may be
    /// out of step, so every later request is refused with this (the slots' own poisoned
    /// state is the step scheduler's).
    pub(super) broken: Option<Broken>,
    pub(super) mode: Mode,
    pub(super) latency_budget: Duration,
    /// Pipelined mode: children requested but not landed yet.
    pub(super) pending: ConceptSet,
    /// Pipelined mode: late loads that failed, reported with the next token.
    pub(super) failed_late: Vec<String>,
    /// Hints on their way to the resident store (read from the cache, not yet sent to be
    /// warmed): `settle` waits for them as it does for pending loads.
    pub(super) warming: Arc<AtomicUsize>,
    /// Time the step scheduler spent scoring (as opposed to installing), summed.
    pub(super) scoring_time: Duration,
    /// Injected faults (tests only).
    pub(super) faults: Faults,
}

/// Why a stream stopped serving: its coordinator panicked at a token.
#[derive(Debug, Clone, thiserror::Error)]
#[error("its coordinator panicked at token {token} ({panic})")]
pub struct Broken {
    pub token: usize,
    pub panic: String,
}

fn steps_gone() -> RuntimeError {
    RuntimeError::ActorStopped { actor: "step scheduler", detail: "it stopped before replying" }
}

fn stopped<M, E>(actor: &'static str) -> impl FnOnce(SendError<M, E>) -> RuntimeError {
    move |e| RuntimeError::ActorStopped { actor, detail: super::describe(&e) }
}

impl Coordinator {
    /// Loads the base layers. Called once, before the actor starts taking requests.
    pub(super) async fn load_base(&mut self) -> Result<(), RuntimeError> {
        let ids: Vec<ConceptId> = self.base.iter().collect();
        let hidden = Arc::new(vec![0.0; self.pack.hidden_dim()]);
        self.activate(usize::MAX, &ids, hidden).await.map(|_| ())
    }

    async fn apply_and_score(
        &mut self,
        token: usize,
        ops: Vec<SlotOp>,
        bytes: HashMap<ConceptId, Arc<super::cache::ProbeBytes>>,
        start: usize,
        len: usize,
        hidden: Arc<Vec<f32>>,
    ) -> Result<Vec<f32>, RuntimeError> {
        let retry = (!ops.is_empty() && self.resident.is_some()).then(|| ops.clone());
        let mut answer = self.lane.apply_and_score(ops, bytes, start, len, hidden.clone()).await;
        // Probes seen resident were evicted before the install (another session needed the
        // room): nothing was applied, so the same operations go again, with the bytes of
        // every probe they install (a rare path: the cache has most of them in RAM).
        if let (Some(ops), Ok(Err(ScoringError::Evicted(_)))) = (retry, &answer) {
            let ids: Vec<ConceptId> = ops.iter().filter_map(SlotOp::installed).collect();
            let fetched = self.cache.ask(Get(ids.clone())).await.map_err(stopped("cache"))?;
            let mut bytes = HashMap::with_capacity(ids.len());
            for (id, f) in ids.into_iter().zip(fetched) {
                bytes.insert(id, f.map_err(|e| RuntimeError::token_error(token, TokenErrorKind::Probe(e)))?);
            }
            answer = self.lane.apply_and_score(ops, bytes, start, len, hidden).await;
        }
        let scores = match answer {
            Ok(scores) => scores.map_err(|e| RuntimeError::token_error(token, TokenErrorKind::Scoring(e)))?,
            Err(_) => return Err(steps_gone()),
        };
        self.scoring_time += scores.scoring;
        Ok(scores.logits)
    }

    /// Lens scores of concepts from their probes' logits (the runtime's packs have one probe
    /// per concept, checked at start; a calibrated probe is still calibrated here).
    fn lenses(&self, ids: &[ConceptId], logits: &[f32]) -> Vec<Scored> {
        ids.iter().zip(logits).map(|(&id, &logit)| score_lens(&self.pack, id, &[logit])).collect()
    }

    /// Speculative prefetch of probes the next token may activate. Never holds up the token.
    /// On the CPU kernel: into the cache (RAM). On the tch store: fetched in a task of its own,
    /// then copied into the store by the scheduler between steps (`Lane::warmer`), so that their
    /// activation finds them resident.
    fn hint(&self, hints: Vec<ConceptId>) {
        if self.resident.is_none() {
            // A tell: hints must never hold up the token.
            let _ = self.cache.tell(Prefetch(hints)).try_send();
            return;
        }
        let hints: Vec<ConceptId> = hints.into_iter().filter(|&id| self.needs_bytes(id)).collect();
        if hints.is_empty() {
            return;
        }
        let (cache, warm, warming) = (self.cache.clone(), self.lane.warmer(), self.warming.clone());
        warming.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            if let Ok(fetched) = cache.ask(Get(hints.clone())).await {
                // A hint that cannot be read is no error: its activation will say why.
                let bytes = hints.into_iter().zip(fetched).filter_map(|(id, b)| Some((id, b.ok()?))).collect();
                warm.send(bytes);
            }
            warming.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Whether installing `id` needs its bytes: not if the resident store holds it.
    fn needs_bytes(&self, id: ConceptId) -> bool {
        !self.resident.as_ref().is_some_and(|r| r.contains(id))
    }

    /// Activates `ids` (fetching bytes for absent ones) and returns their logits, in order.
    async fn activate(
        &mut self,
        token: usize,
        ids: &[ConceptId],
        hidden: Arc<Vec<f32>>,
    ) -> Result<Vec<f32>, RuntimeError> {
        let absent: Vec<ConceptId> =
            ids.iter().copied().filter(|&id| !self.pool.is_active(id) && self.needs_bytes(id)).collect();
        let mut bytes = HashMap::with_capacity(absent.len());
        if !absent.is_empty() {
            let fetched = self.cache.ask(Get(absent.clone())).await.map_err(stopped("cache"))?;
            for (id, f) in absent.iter().zip(fetched) {
                let b = f.map_err(|e| RuntimeError::token_error(token, TokenErrorKind::Probe(e)))?;
                bytes.insert(*id, b);
            }
        }
        self.activate_with(token, ids, bytes, hidden).await
    }

    /// Activates `ids`, whose absent members' bytes are in `bytes`; returns logits in order.
    async fn activate_with(
        &mut self,
        token: usize,
        ids: &[ConceptId],
        bytes: HashMap<ConceptId, Arc<ProbeBytes>>,
        hidden: Arc<Vec<f32>>,
    ) -> Result<Vec<f32>, RuntimeError> {
        self.faults.maybe_panic(PanicSite::Coordinator, ids.iter().copied());
        let start = self.pool.active_len();
        let mut ops = Vec::new();
        for &id in ids {
            self.pool.activate(id, &mut ops).map_err(|e| RuntimeError::token_error(token, TokenErrorKind::Pool(e)))?;
        }
        // A failed scoring leaves the slots as planned (the caller rolls the token back); a
        // failed slot operation poisons the session's slots at the scheduler, which then
        // refuses its later requests with the cause.
        let by_slot = self.apply_and_score(token, ops, bytes, start, ids.len(), hidden).await?;
        // Back to the caller's order: `ids` took slots `start..` in order.
        Ok(by_slot)
    }

    /// Pipelined mode: asks for the bytes of `absent` probes and waits at most the latency
    /// budget. Returns what landed in time; the rest land later as `Landed` messages.
    async fn fetch_within_budget(&mut self, absent: Vec<ConceptId>, me: &ActorRef<Self>) -> Vec<(ConceptId, LateLoad)> {
        let mut reads: FuturesUnordered<_> = absent
            .into_iter()
            .map(|id| {
                let cache = self.cache.clone();
                let concept = self.pack.hierarchy().label(id);
                async move {
                    let fetched = match cache.ask(Get(vec![id])).await {
                        Ok(mut v) => v.pop().expect("one result per id").map_err(LoadError::Read),
                        Err(e) => Err(LoadError::CacheStopped { concept, detail: super::describe(&e) }),
                    };
                    (id, fetched)
                }
            })
            .collect();
        let deadline = tokio::time::Instant::now() + self.latency_budget;
        let mut landed = Vec::new();
        // A zero budget takes only what is ready at once (the timer would round up to 1 ms).
        if self.latency_budget.is_zero() {
            while let Some(Some(x)) = reads.next().now_or_never() {
                landed.push(x);
            }
        }
        while !self.latency_budget.is_zero() {
            tokio::select! {
                biased;
                next = reads.next() => match next {
                    Some(x) => landed.push(x),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        for (id, _) in &landed {
            self.pending.remove(*id);
        }
        if !reads.is_empty() {
            // A tell back to us from a plain task: we never wait on it, so no cycle.
            let weak = me.downgrade();
            // Reads that complete together travel together, so that their installs share one
            // round (one host-to-device transfer on an accelerator); none waits for another.
            let mut batches = reads.ready_chunks(LANDED_BATCH);
            tokio::spawn(async move {
                while let Some(items) = batches.next().await {
                    let Some(me) = weak.upgrade() else { break };
                    if me.tell(Landed { items }).await.is_err() {
                        break;
                    }
                }
            });
        }
        landed
    }

    /// Pipelined mode: activates and scores the children that are resident or land within the
    /// budget; the rest stay pending. Returns the ids scored and their logits.
    async fn activate_landed(
        &mut self,
        token: usize,
        ids: &[ConceptId],
        hidden: Arc<Vec<f32>>,
        me: &ActorRef<Self>,
    ) -> Result<(Vec<ConceptId>, Vec<f32>), RuntimeError> {
        // Active, or in the resident store: ready without any bytes.
        let (mut ready, absent): (Vec<ConceptId>, Vec<ConceptId>) =
            ids.iter().partition(|&&id| self.pool.is_active(id) || !self.needs_bytes(id));
        absent.iter().for_each(|&id| {
            self.pending.insert(id);
        });
        let mut bytes = HashMap::new();
        if !absent.is_empty() {
            // Bytes already in RAM count as resident: installing them takes microseconds.
            let hits = match self.cache.ask(Peek(absent.clone())).await {
                Ok(hits) => hits,
                Err(e) => {
                    // Nothing was asked for: none of them is in flight.
                    absent.iter().for_each(|&id| {
                        self.pending.remove(id);
                    });
                    return Err(stopped("cache")(e));
                }
            };
            for (id, b) in hits {
                self.pending.remove(id);
                bytes.insert(id, b);
                ready.push(id);
            }
        }
        let absent: Vec<ConceptId> = absent.into_iter().filter(|id| !bytes.contains_key(id)).collect();
        if !absent.is_empty() {
            for (id, fetched) in self.fetch_within_budget(absent, me).await {
                match fetched {
                    Ok(b) => {
                        bytes.insert(id, b);
                        ready.push(id);
                    }
                    // As for a child that lands late and fails: the report names it in
                    // `failed_loads`, and the token goes on without it.
                    Err(e) => self.failed_late.push(e.to_string()),
                }
            }
        }
        if ready.is_empty() {
            return Ok((ready, Vec::new()));
        }
        let logits = self.activate_with(token, &ready, bytes, hidden).await?;
        Ok((ready, logits))
    }

    async fn deactivate(&mut self, ids: &[ConceptId]) -> Result<(), RuntimeError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut ops = Vec::new();
        for &id in ids {
            self.pool.deactivate(id, &mut ops);
        }
        // The moves run after the report, in the generation gap; if they fail, the step
        // scheduler poisons the session's slots and refuses its later requests with the cause.
        self.lane.rearrange(ops).map_err(|_| steps_gone())
    }

    async fn observe(
        &mut self,
        token: usize,
        hidden: Hidden,
        me: &ActorRef<Self>,
    ) -> Result<TokenReport, RuntimeError> {
        if let Some(why) = &self.broken {
            return Err(RuntimeError::Broken(why.clone()));
        }
        let start = Instant::now();
        let h = check_hidden(hidden.values(), self.pack.hidden_dim(), self.normalization)
            .map_err(|e| RuntimeError::token_error(token, TokenErrorKind::Hidden(e)))?;
        let h = Arc::new(h);
        // The caller's memory (a tensor or an array it lent) is released as soon as it is read.
        drop(hidden);
        let mut stages = StageTimings::default();

        let t = Instant::now();
        let initial = self.pool.active();
        let n = initial.len();
        let logits = self
            .apply_and_score(token, Vec::new(), HashMap::new(), 0, n, h.clone())
            .instrument(debug_span!("initial_scoring", token, probes = n))
            .await?;
        let initial: Vec<Scored> = self.lenses(&initial, &logits);
        stages.initial_scoring += t.elapsed();

        let pack = self.pack.clone();
        let config = Arc::clone(&self.config);
        let mut tc = TokenCascade::new(pack.hierarchy(), &config, initial);
        let mut activated: Vec<ConceptId> = Vec::new();
        loop {
            let t = Instant::now();
            // Children in flight count as active: not asked for twice, and they take room.
            let active = self.pool.active_set();
            let wanted = if self.pending.is_empty() { active.clone() } else { active.union(&self.pending) };
            let next = tc.next_expansion(&wanted);
            stages.expansion_lookup += t.elapsed();
            let Some(ids) = next else { break };
            let t = Instant::now();
            let scored_before = self.scoring_time;
            let result = if self.mode == Mode::Exact {
                self.activate(token, &ids, h.clone())
                    .instrument(debug_span!("load_and_score", token, probes = ids.len()))
                    .await
            } else {
                self.activate_landed(token, &ids, h.clone(), me).await.map(|(ready, logits)| {
                    tc.add_scores(&self.lenses(&ready, &logits));
                    activated.extend_from_slice(&ready);
                    Vec::new()
                })
            };
            let logits = match result {
                Ok(l) => l,
                Err(e) => {
                    // Leave the active set as it was before the token.
                    let mut undo = activated.clone();
                    undo.extend(ids.iter().copied().filter(|&id| self.pool.is_active(id)));
                    let _ = self.deactivate(&undo).await;
                    return Err(e);
                }
            };
            // One round trip installs and scores; split it by the scoring time the thread measured.
            let scoring = self.scoring_time - scored_before;
            stages.new_scoring += scoring;
            stages.loading += t.elapsed().saturating_sub(scoring);
            if self.mode == Mode::Exact {
                activated.extend_from_slice(&ids);
                tc.add_scores(&self.lenses(&ids, &logits));
            }
        }

        let t = Instant::now();
        let dropped = tc.prune(|id| self.base.contains(id));
        self.deactivate(&dropped).instrument(debug_span!("pruning", token, dropped = dropped.len())).await?;
        if self.hint_margin > 0.0 {
            let hints = tc.near_misses(self.hint_margin, |c| self.pool.is_active(c));
            if !hints.is_empty() {
                self.hint(hints);
            }
        }
        stages.pruning += t.elapsed();

        let t = Instant::now();
        let top = report_entries(pack.hierarchy(), &tc.report());
        let alerts = alert_entries(pack.hierarchy(), &self.watch, tc.scored());
        stages.sorting += t.elapsed();
        let in_flight = self.pending.iter().map(|c| pack.hierarchy().label(c)).collect();
        let failed_loads = std::mem::take(&mut self.failed_late);
        let (scored_ids, scored_logits, scored_probs) = crate::policy::scored_by_id(tc.scored());
        Ok(TokenReport {
            in_flight,
            failed_loads,
            alerts,
            index: token,
            top,
            children: tc.children,
            loaded: activated.len(),
            unloaded: dropped.len(),
            skipped_by_cap: tc.skipped_by_cap,
            scored: tc.scored().len(),
            scored_ids,
            scored_logits,
            scored_probs,
            active: self.pool.active_len(),
            stages,
            elapsed: start.elapsed(),
        })
    }
}

impl Actor for Coordinator {
    type Args = Self;
    type Error = Infallible;

    async fn on_start(state: Self, _: ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(state)
    }

    /// A panic mid-token leaves the active set, the pool and the slots out of step, so the
    /// stream is marked broken: every later request is answered with the reason, and closing
    /// the session frees what it holds. The actor itself goes on, so that its handle keeps
    /// answering (a stopped actor would read as "shut down").
    async fn on_panic(
        &mut self,
        _: kameo::prelude::WeakActorRef<Self>,
        err: kameo::error::PanicError,
    ) -> Result<std::ops::ControlFlow<kameo::error::ActorStopReason>, Self::Error> {
        let token = self.next_token.saturating_sub(1);
        tracing::error!("a stream's coordinator panicked at token {token}: {err}");
        self.broken.get_or_insert_with(|| Broken { token, panic: err.to_string() });
        Ok(std::ops::ControlFlow::Continue(()))
    }

    async fn on_stop(
        &mut self,
        _: kameo::prelude::WeakActorRef<Self>,
        _: kameo::prelude::ActorStopReason,
    ) -> Result<(), Self::Error> {
        // The cache and the scheduler belong to the runtime; only the session's lane closes.
        // Now, not when the state is dropped: kameo reports the actor stopped before it drops
        // the state, and `Session::close` promises the slots are freed when it returns.
        self.lane.close();
        Ok(())
    }
}

/// Score one hidden state. The token index is assigned in arrival order.
pub struct Observe(pub Hidden);

impl Message<Observe> for Coordinator {
    type Reply = Result<TokenReport, RuntimeError>;

    async fn handle(&mut self, Observe(hidden): Observe, ctx: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let token = self.next_token;
        self.next_token += 1;
        let me = ctx.actor_ref().clone();
        self.observe(token, hidden, &me).instrument(debug_span!("token", index = token)).await
    }
}

/// A child's bytes, or why a pipelined load failed (reported in `failed_loads`).
type LateLoad = Result<Arc<ProbeBytes>, LoadError>;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Read(ReadError),
    #[error("{concept}: the cache actor did not answer ({detail})")]
    CacheStopped { concept: String, detail: &'static str },
}

/// Most late reads delivered in one `Landed` (and installed in one round).
const LANDED_BATCH: usize = 64;

/// Pipelined mode: children asked for by earlier tokens have landed (or failed to).
pub struct Landed {
    items: Vec<(ConceptId, LateLoad)>,
}

impl Message<Landed> for Coordinator {
    type Reply = ();

    async fn handle(&mut self, Landed { items }: Landed, _: &mut Context<Self, Self::Reply>) {
        let mut ids = Vec::new();
        let mut bytes = HashMap::new();
        for (id, fetched) in items {
            if !self.pending.remove(id) || self.broken.is_some() {
                continue;
            }
            match fetched {
                Err(e) => self.failed_late.push(e.to_string()),
                Ok(b) if !self.pool.is_active(id) && self.pool.active_len() + ids.len() < self.config.max_loaded => {
                    ids.push(id);
                    bytes.insert(id, b);
                }
                Ok(_) => {}
            }
        }
        if ids.is_empty() {
            return;
        }
        // Installed now, while the caller generates the next token; scored with it.
        let hidden = Arc::new(vec![0.0; self.pack.hidden_dim()]);
        if let Err(e) = self.activate_with(usize::MAX, &ids, bytes, hidden).await {
            self.failed_late.push(e.to_string());
        }
    }
}

/// Waits until the step scheduler has done everything this session sent it so far (pruning's
/// slot moves are told, not asked).
pub struct Drain;

impl Message<Drain> for Coordinator {
    type Reply = Result<(), RuntimeError>;

    async fn handle(&mut self, _: Drain, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        if self.broken.is_some() {
            return Ok(());
        }
        let hidden = Arc::new(Vec::new());
        self.apply_and_score(usize::MAX, Vec::new(), HashMap::new(), 0, 0, hidden).await.map(|_| ())
    }
}

/// How many loads have not landed yet: requested children (pipelined mode) and hints on
/// their way to the resident store.
pub struct PendingLoads;

impl Message<PendingLoads> for Coordinator {
    type Reply = usize;

    async fn handle(&mut self, _: PendingLoads, _: &mut Context<Self, Self::Reply>) -> usize {
        self.pending.len() + self.warming.load(Ordering::SeqCst)
    }
}

/// The active probes, ascending.
pub struct ActiveSet;

impl Message<ActiveSet> for Coordinator {
    type Reply = Vec<ConceptId>;

    async fn handle(&mut self, _: ActiveSet, _: &mut Context<Self, Self::Reply>) -> Vec<ConceptId> {
        self.pool.active_set().iter().collect()
    }
}

/// New live settings for a stream, applied from its next token on: the mailbox keeps order,
/// so every token queued before this one is scored under the old settings.
pub struct Reconfigure {
    pub cascade: CascadeConfig,
    /// `cascade.watch`, compiled against the pack.
    pub watch: Arc<Watch>,
    pub latency_budget: Duration,
}

/// The cascade keys a stream cannot change while open: the base set is loaded and pinned
/// when it opens, the cap sizes its reservation, and normalization changes every score.
pub const FIXED_CASCADE_KEYS: [&str; 3] = ["cascade.base_layers", "cascade.normalization", "cascade.max_loaded"];

impl Message<Reconfigure> for Coordinator {
    type Reply = Result<(), RuntimeError>;

    async fn handle(&mut self, m: Reconfigure, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let (old, new) = (&*self.config, &m.cascade);
        let same = [
            old.base_layers == new.base_layers,
            old.normalization == new.normalization,
            old.max_loaded == new.max_loaded,
        ];
        if let Some(i) = same.iter().position(|s| !s) {
            return Err(RuntimeError::FixedKey { key: FIXED_CASCADE_KEYS[i] });
        }
        self.config = Arc::new(m.cascade);
        self.watch = m.watch;
        self.latency_budget = m.latency_budget;
        Ok(())
    }
}
