//! The coordinator: one per session. It owns the stream's cascade state (the active lenses,
//! and per model layer a model pool of their probes; pending loads; the token counter) and
//! runs each token's decisions (the pure `TokenCascade`), asking the cache for bytes and the
//! step scheduler, through the session's lanes, for scores. It also acts as the pruner:
//! evictions and speculative prefetch hints go out from here. Asks only go downstream (to the
//! cache and the scheduler), never back.
//!
//! **Lenses and model layers.** The cascade decides on concepts (lenses); the cache, the pools
//! and the scheduler deal in probes. A pack whose probes read L model layers gives the session
//! L lanes, one per model layer, each with its own slots at the scheduler: every request of a
//! lane scores its probes against that layer's hidden state, and the lanes of one round are
//! sent together so that they share a step. A lens's score is `policy::lens::score_lens` of its
//! probes' logits, as in every engine.

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
use super::scoring::torch::Resident;
use super::scoring::{DeviceState, ScoringError, State};
use super::steps::Lane;
use super::{RuntimeError, TokenErrorKind};
use crate::config::{CascadeConfig, Mode, Normalization};
use crate::engine::{
    alert_entries, check_hidden, check_tensor, probe_scores, report_entries, simplex_readings, tensor_to_host, Hidden,
    StageTimings, TokenReport,
};
use crate::pack::{ConceptId, Pack, ProbeId};
use crate::policy::lens::score_lenses;
use crate::policy::{simplex::Baselines, ConceptSet, Scored, TokenCascade, Watch};
use crate::types::hidden::HiddenRef;
use crate::types::HiddenError;

/// One model layer's share of a session: the slots of its probes at the step scheduler.
pub(super) struct LayerPool {
    pub(super) pool: ModelPool,
    pub(super) lane: Lane,
}

/// The hidden states of one token, one per model layer of the pack, checked and normalized.
type States = Vec<Arc<State>>;

/// Bytes of probes to install, by probe.
type Bytes = HashMap<ProbeId, Arc<ProbeBytes>>;

pub struct Coordinator {
    pub(super) pack: Arc<Pack>,
    pub(super) config: Arc<CascadeConfig>,
    /// `config.watch`, compiled against the pack.
    pub(super) watch: Arc<Watch>,
    pub(super) normalization: Normalization,
    pub(super) hint_margin: f32,
    pub(super) base: ConceptSet,
    /// The active lenses: each has every probe active in its layer's pool.
    pub(super) active: ConceptSet,
    /// One per model layer of the pack (one for a pack that names none).
    pub(super) layers: Vec<LayerPool>,
    pub(super) cache: ActorRef<WeightCache>,
    /// On the tch backend: what its resident store holds (a probe in it needs no bytes to be
    /// installed, so none are fetched from the cache) and its device (a hidden state handed
    /// over as a tensor there is checked and scored where it lies).
    pub(super) resident: Option<Resident>,
    pub(super) next_token: usize,
    /// Set when the coordinator panicked mid-token: its pools and the session's slots may be
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
    /// v2 packs: this token's probe logits of every lens scored, for the report.
    pub(super) probe_logits: HashMap<ConceptId, Vec<f32>>,
    /// The simplex poles' rolling baselines in this stream (their probes are always active).
    pub(super) baselines: Baselines,
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

/// One lane's part of a round: slot operations (with the bytes they install), then the
/// scores of slots `[start, start + len)`.
#[derive(Default)]
struct LayerWork {
    ops: Vec<SlotOp>,
    bytes: Bytes,
    start: usize,
    len: usize,
}

impl Coordinator {
    /// Loads the base layers and the simplex poles, which stay active for the session's life.
    /// Called once, before the actor starts taking requests.
    pub(super) async fn load_base(&mut self) -> Result<(), RuntimeError> {
        let ids: Vec<ConceptId> = self.base.iter().collect();
        self.activate(usize::MAX, &ids, None).await?;
        let poles: Vec<ProbeId> = self.pack.pole_probes().collect();
        if poles.is_empty() {
            return Ok(());
        }
        let bytes = self.fetch(usize::MAX, poles.iter().copied().filter(|&p| self.needs_bytes(p)).collect()).await?;
        self.install(usize::MAX, &poles, bytes, None).await.map(|_| ())
    }

    /// The bytes of probes `ids`, from the cache.
    async fn fetch(&self, token: usize, ids: Vec<ProbeId>) -> Result<Bytes, RuntimeError> {
        let mut bytes = HashMap::with_capacity(ids.len());
        if ids.is_empty() {
            return Ok(bytes);
        }
        let fetched = self.cache.ask(Get(ids.clone())).await.map_err(stopped("cache"))?;
        for (id, f) in ids.into_iter().zip(fetched) {
            bytes.insert(id, f.map_err(|e| RuntimeError::token_error(token, TokenErrorKind::Probe(e)))?);
        }
        Ok(bytes)
    }

    /// No hidden states, one empty per lane: for rounds that only apply slot operations
    /// (installs outside a token, a drain), which score nothing.
    fn no_states(&self) -> States {
        let none = Arc::new(State::Host(Vec::new()));
        (0..self.layers.len()).map(|_| none.clone()).collect()
    }

    /// The probes of `ids`, in order.
    fn probes_of<'a>(&'a self, ids: &'a [ConceptId]) -> impl Iterator<Item = ProbeId> + 'a {
        ids.iter().flat_map(|&c| self.pack.probes_of(c))
    }

    /// The model layer pool (index into `layers`) a probe lives in.
    fn layer_of(&self, p: ProbeId) -> usize {
        self.pack.probe(p).state as usize
    }

    /// Runs one round on every lane with work, all sent before any is awaited so that they
    /// share a step; returns each lane's logits (empty for lanes without work).
    async fn apply_and_score(
        &mut self,
        token: usize,
        work: Vec<LayerWork>,
        states: &States,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let lanes = self.layers.iter().zip(work).zip(states).map(|((layer, w), hidden)| {
            let cache = self.cache.clone();
            let store = self.resident.is_some();
            async move {
                if w.ops.is_empty() && w.len == 0 {
                    return Ok((Vec::new(), Duration::ZERO));
                }
                let retry = (!w.ops.is_empty() && store).then(|| w.ops.clone());
                let mut answer = layer.lane.apply_and_score(w.ops, w.bytes, w.start, w.len, hidden.clone()).await;
                // Probes seen resident were evicted before the install (another session needed
                // the room): nothing was applied, so the same operations go again, with the
                // bytes of every probe they install (a rare path: the cache has most of them
                // in RAM).
                if let (Some(ops), Ok(Err(ScoringError::Evicted(_)))) = (retry, &answer) {
                    let ids: Vec<ProbeId> = ops.iter().filter_map(SlotOp::installed).collect();
                    let fetched = cache.ask(Get(ids.clone())).await.map_err(stopped("cache"))?;
                    let mut bytes = HashMap::with_capacity(ids.len());
                    for (id, f) in ids.into_iter().zip(fetched) {
                        bytes.insert(id, f.map_err(|e| RuntimeError::token_error(token, TokenErrorKind::Probe(e)))?);
                    }
                    answer = layer.lane.apply_and_score(ops, bytes, w.start, w.len, hidden.clone()).await;
                }
                match answer {
                    Ok(scores) => scores
                        .map(|s| (s.logits, s.scoring))
                        .map_err(|e| RuntimeError::token_error(token, TokenErrorKind::Scoring(e))),
                    Err(_) => Err(steps_gone()),
                }
            }
        });
        let answers = futures::future::join_all(lanes).await;
        let mut out = Vec::with_capacity(answers.len());
        for a in answers {
            let (logits, scoring) = a?;
            self.scoring_time += scoring;
            out.push(logits);
        }
        Ok(out)
    }

    /// Speculative prefetch of the probes of lenses the next token may activate. Never holds
    /// up the token. On the CPU kernel: into the cache (RAM). On the tch store: fetched in a
    /// task of its own, then copied into the store by the scheduler between steps
    /// (`Lane::warmer`), so that their activation finds them resident.
    fn hint(&self, hints: Vec<ConceptId>) {
        let probes: Vec<ProbeId> = self.probes_of(&hints).collect();
        if self.resident.is_none() {
            // A tell: hints must never hold up the token.
            let _ = self.cache.tell(Prefetch(probes)).try_send();
            return;
        }
        let hints: Vec<ProbeId> = probes.into_iter().filter(|&id| self.needs_bytes(id)).collect();
        if hints.is_empty() {
            return;
        }
        let (cache, warm, warming) = (self.cache.clone(), self.layers[0].lane.warmer(), self.warming.clone());
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

    /// Whether installing probe `id` needs its bytes: not if the resident store holds it.
    fn needs_bytes(&self, id: ProbeId) -> bool {
        !self.resident.as_ref().is_some_and(|r| r.view.contains(id))
    }

    /// The probes of `ids` whose installs need bytes.
    fn absent_probes(&self, ids: &[ConceptId]) -> Vec<ProbeId> {
        self.probes_of(ids)
            .filter(|&p| !self.layers[self.layer_of(p)].pool.is_active(p) && self.needs_bytes(p))
            .collect()
    }

    /// Activates inactive lenses `ids` (fetching bytes for absent probes) and returns their
    /// scores, in order.
    async fn activate(
        &mut self,
        token: usize,
        ids: &[ConceptId],
        states: Option<&States>,
    ) -> Result<Vec<Scored>, RuntimeError> {
        let bytes = self.fetch(token, self.absent_probes(ids)).await?;
        self.activate_with(token, ids, bytes, states).await
    }

    /// Activates inactive lenses `ids`, whose absent probes' bytes are in `bytes`; returns
    /// their scores on `states`, in order (none outside a token: `states` is `None`).
    async fn activate_with(
        &mut self,
        token: usize,
        ids: &[ConceptId],
        bytes: Bytes,
        states: Option<&States>,
    ) -> Result<Vec<Scored>, RuntimeError> {
        let probes: Vec<ProbeId> = self.probes_of(ids).collect();
        self.faults.maybe_panic(PanicSite::Coordinator, probes.iter().copied());
        for &c in ids {
            self.active.insert(c);
        }
        let logits = self.install(token, &probes, bytes, states).await?;
        if states.is_none() {
            return Ok(Vec::new());
        }
        Ok(self.lenses(ids, &logits))
    }

    /// Activates inactive probes `probes` in their layers' pools (the absent ones' bytes in
    /// `bytes`) and returns their logits on `states`, in order. Outside a token (`states` is
    /// `None`: the session's base set at open, probes that landed between tokens) the slots
    /// are only filled: the next token scores every active probe anyway, so nothing is scored
    /// and no logits are returned.
    async fn install(
        &mut self,
        token: usize,
        probes: &[ProbeId],
        mut bytes: Bytes,
        states: Option<&States>,
    ) -> Result<Vec<f32>, RuntimeError> {
        let mut work: Vec<LayerWork> =
            self.layers.iter().map(|l| LayerWork { start: l.pool.active_len(), ..LayerWork::default() }).collect();
        for &p in probes {
            let l = self.layer_of(p);
            let w = &mut work[l];
            self.layers[l]
                .pool
                .activate(p, &mut w.ops)
                .map_err(|e| RuntimeError::token_error(token, TokenErrorKind::Pool(e)))?;
            w.len += usize::from(states.is_some());
            if let Some(b) = bytes.remove(&p) {
                w.bytes.insert(p, b);
            }
        }
        // A failed scoring leaves the slots as planned (the caller rolls the token back); a
        // failed slot operation poisons the session's slots at the scheduler, which then
        // refuses its later requests with the cause.
        let Some(states) = states else {
            let none = self.no_states();
            self.apply_and_score(token, work, &none).await?;
            return Ok(Vec::new());
        };
        let by_layer = self.apply_and_score(token, work, states).await?;
        // Each lane's probes took its slots `start..` in the order of `probes`.
        let mut cursor = vec![0usize; self.layers.len()];
        let mut logits = Vec::with_capacity(probes.len());
        for &p in probes {
            let l = self.layer_of(p);
            logits.push(by_layer[l][cursor[l]]);
            cursor[l] += 1;
        }
        Ok(logits)
    }

    /// Lens scores of `ids` from their probes' logits (all of `ids`' probes, in order). In a
    /// v2 pack the probes' logits are kept for the token's report.
    fn lenses(&mut self, ids: &[ConceptId], logits: &[f32]) -> Vec<Scored> {
        score_lenses(&self.pack, ids, logits, &mut self.probe_logits)
    }

    /// Scores every active lens (step 1 of a token): each lane scores all its active slots.
    /// Also returns the simplex poles' logits (in `Pack::pole_probes` order).
    async fn score_active(&mut self, token: usize, states: &States) -> Result<(Vec<Scored>, Vec<f32>), RuntimeError> {
        let work: Vec<LayerWork> =
            self.layers.iter().map(|l| LayerWork { len: l.pool.active_len(), ..LayerWork::default() }).collect();
        let by_layer = self.apply_and_score(token, work, states).await?;
        if self.layers.len() == 1 && self.pack.one_probe_per_concept() {
            // Probe i is concept i's only probe: the slots are the lenses.
            let active = self.layers[0].pool.active();
            let ids: Vec<ConceptId> = active.iter().map(|p| ConceptId(p.0)).collect();
            return Ok((self.lenses(&ids, &by_layer[0]), Vec::new()));
        }
        // Probe ids run in concept order, a lens's probes side by side, then the simplex
        // poles': sorted by probe, the lanes' logits are every active lens's probes, lens by
        // lens, in ascending lens order, then every pole's.
        let mut by_probe: Vec<(ProbeId, f32)> = Vec::with_capacity(by_layer.iter().map(Vec::len).sum());
        for (layer, logits) in self.layers.iter().zip(&by_layer) {
            by_probe.extend(layer.pool.active().into_iter().zip(logits.iter().copied()));
        }
        by_probe.sort_unstable_by_key(|&(p, _)| p);
        let ids: Vec<ConceptId> = self.active.iter().collect();
        let mut logits: Vec<f32> = by_probe.into_iter().map(|(_, l)| l).collect();
        let poles = logits.split_off(logits.len() - self.pack.pole_probes().len());
        Ok((self.lenses(&ids, &logits), poles))
    }

    /// Pipelined mode: asks for the bytes of each lens's absent probes and waits at most the
    /// latency budget. Returns the lenses whose probes all landed in time; the rest land later
    /// as `Landed` messages.
    async fn fetch_within_budget(
        &mut self,
        absent: Vec<(ConceptId, Vec<ProbeId>)>,
        me: &ActorRef<Self>,
    ) -> Vec<(ConceptId, LateLoad)> {
        let mut reads: FuturesUnordered<_> = absent
            .into_iter()
            .map(|(id, probes)| {
                let cache = self.cache.clone();
                let concept = self.pack.hierarchy().label(id);
                async move {
                    let fetched = match cache.ask(Get(probes.clone())).await {
                        Ok(v) => probes.into_iter().zip(v).map(|(p, b)| Ok((p, b.map_err(LoadError::Read)?))).collect(),
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

    /// Pipelined mode: activates and scores the children whose probes are resident or land
    /// within the budget; the rest stay pending. Returns the lenses scored and their scores.
    async fn activate_landed(
        &mut self,
        token: usize,
        ids: &[ConceptId],
        states: &States,
        me: &ActorRef<Self>,
    ) -> Result<(Vec<ConceptId>, Vec<Scored>), RuntimeError> {
        // Every probe in the resident store: ready without any bytes.
        let (mut ready, mut absent) = (Vec::new(), Vec::new());
        for &id in ids {
            match self.absent_probes(&[id]) {
                probes if probes.is_empty() => ready.push(id),
                probes => absent.push((id, probes)),
            }
        }
        absent.iter().for_each(|&(id, _)| {
            self.pending.insert(id);
        });
        let mut bytes = HashMap::new();
        let mut waiting = Vec::new();
        if !absent.is_empty() {
            // Bytes already in RAM count as resident: installing them takes microseconds.
            let wanted = absent.iter().flat_map(|(_, probes)| probes.iter().copied()).collect();
            let hits: HashMap<ProbeId, Arc<ProbeBytes>> = match self.cache.ask(Peek(wanted)).await {
                Ok(hits) => hits.into_iter().collect(),
                Err(e) => {
                    // Nothing was asked for: none of them is in flight.
                    absent.iter().for_each(|&(id, _)| {
                        self.pending.remove(id);
                    });
                    return Err(stopped("cache")(e));
                }
            };
            for (id, mine) in absent {
                if mine.iter().all(|p| hits.contains_key(p)) {
                    self.pending.remove(id);
                    bytes.extend(mine.into_iter().map(|p| (p, hits[&p].clone())));
                    ready.push(id);
                } else {
                    waiting.push((id, mine));
                }
            }
        }
        if !waiting.is_empty() {
            for (id, fetched) in self.fetch_within_budget(waiting, me).await {
                match fetched {
                    Ok(b) => {
                        bytes.extend(b);
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
        let scored = self.activate_with(token, &ready, bytes, Some(states)).await?;
        Ok((ready, scored))
    }

    /// Deactivates lenses (where active): their probes leave their pools.
    async fn deactivate(&mut self, ids: &[ConceptId]) -> Result<(), RuntimeError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut ops: Vec<Vec<SlotOp>> = vec![Vec::new(); self.layers.len()];
        for &c in ids {
            self.active.remove(c);
            for p in self.pack.probes_of(c) {
                let l = self.layer_of(p);
                self.layers[l].pool.deactivate(p, &mut ops[l]);
            }
        }
        // The moves run after the report, in the generation gap; if they fail, the step
        // scheduler poisons the session's slots and refuses its later requests with the cause.
        for (layer, ops) in self.layers.iter().zip(ops) {
            if !ops.is_empty() {
                layer.lane.rearrange(ops).map_err(|_| steps_gone())?;
            }
        }
        Ok(())
    }

    /// Checks and normalizes one token's hidden states (one per model layer).
    fn prepare(&self, token: usize, hidden: Vec<Hidden>) -> Result<States, RuntimeError> {
        let bad = |e| RuntimeError::token_error(token, TokenErrorKind::Hidden(e));
        if hidden.len() != self.layers.len() {
            return Err(bad(HiddenError::States { got: hidden.len(), layers: self.pack.model_layers().to_vec() }));
        }
        hidden.into_iter().map(|h| self.prepare_one(h).map(Arc::new).map_err(bad)).collect()
    }

    /// One hidden state: a tensor on the store's device is checked there and scored where it
    /// lies (kept until the token is answered); anything else is read into host memory, and
    /// the caller's memory (a tensor or an array it lent) is released as soon as it is read.
    fn prepare_one(&self, h: Hidden) -> Result<State, HiddenError> {
        let (d, normalization) = (self.pack.hidden_dim(), self.normalization);
        let x = match h.get() {
            HiddenRef::Host(values) => return check_hidden(values, d, normalization).map(State::Host),
            HiddenRef::Device(t) if Some(t.tensor.device()) == self.resident.as_ref().map(|r| r.device) => {
                check_tensor(t, d, normalization)?
            }
            HiddenRef::Device(t) => return check_hidden(&tensor_to_host(t, d)?, d, normalization).map(State::Host),
        };
        Ok(State::Device(DeviceState::new(x, h)))
    }

    async fn observe(
        &mut self,
        token: usize,
        hidden: Vec<Hidden>,
        me: &ActorRef<Self>,
    ) -> Result<TokenReport, RuntimeError> {
        if let Some(why) = &self.broken {
            return Err(RuntimeError::Broken(why.clone()));
        }
        let start = Instant::now();
        let h = self.prepare(token, hidden)?;
        self.probe_logits.clear();
        let mut stages = StageTimings::default();

        let t = Instant::now();
        let n = self.active.len();
        let (initial, pole_logits) =
            self.score_active(token, &h).instrument(debug_span!("initial_scoring", token, probes = n)).await?;
        stages.initial_scoring += t.elapsed();

        let pack = self.pack.clone();
        let config = Arc::clone(&self.config);
        let mut tc = TokenCascade::new(pack.hierarchy(), &config, initial);
        let mut activated: Vec<ConceptId> = Vec::new();
        loop {
            let t = Instant::now();
            // Children in flight count as active: not asked for twice, and they take room.
            let wanted = if self.pending.is_empty() { self.active.clone() } else { self.active.union(&self.pending) };
            let next = tc.next_expansion(&wanted);
            stages.expansion_lookup += t.elapsed();
            let Some(ids) = next else { break };
            let t = Instant::now();
            let scored_before = self.scoring_time;
            let result = if self.mode == Mode::Exact {
                self.activate(token, &ids, Some(&h))
                    .instrument(debug_span!("load_and_score", token, probes = ids.len()))
                    .await
                    .inspect(|_| activated.extend_from_slice(&ids))
            } else {
                self.activate_landed(token, &ids, &h, me).await.map(|(ready, scored)| {
                    activated.extend_from_slice(&ready);
                    scored
                })
            };
            match result {
                Ok(scored) => tc.add_scores(&scored),
                Err(e) => {
                    // Leave the active set as it was before the token.
                    let mut undo = activated.clone();
                    undo.extend(ids.iter().copied().filter(|&id| self.active.contains(id)));
                    let _ = self.deactivate(&undo).await;
                    return Err(e);
                }
            }
            // One round trip installs and scores; split it by the scoring time the thread measured.
            let scoring = self.scoring_time - scored_before;
            stages.new_scoring += scoring;
            stages.loading += t.elapsed().saturating_sub(scoring);
        }

        let t = Instant::now();
        let dropped = tc.prune(|id| self.base.contains(id));
        self.deactivate(&dropped).instrument(debug_span!("pruning", token, dropped = dropped.len())).await?;
        if self.hint_margin > 0.0 {
            let hints = tc.near_misses(self.hint_margin, |c| self.active.contains(c));
            if !hints.is_empty() {
                self.hint(hints);
            }
        }
        stages.pruning += t.elapsed();

        let t = Instant::now();
        let shown = crate::policy::lens::reported(&pack, tc.scored());
        let mut top = report_entries(pack.hierarchy(), &tc.report(&shown));
        probe_scores(&pack, &mut top, &self.probe_logits);
        let alerts = alert_entries(pack.hierarchy(), &self.watch, &shown);
        stages.sorting += t.elapsed();
        let in_flight = self.pending.iter().map(|c| pack.hierarchy().label(c)).collect();
        let failed_loads = std::mem::take(&mut self.failed_late);
        let (scored_ids, scored_logits, scored_probs) = crate::policy::scored_by_id(&shown);
        let simplex = simplex_readings(&pack, &mut self.baselines, &pole_logits);
        Ok(TokenReport {
            simplex,
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
            active: self.active.len(),
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
        self.layers.iter().for_each(|l| l.lane.close());
        Ok(())
    }
}

/// Score one token: one hidden state per model layer of the pack. The token index is
/// assigned in arrival order.
pub struct Observe(pub Vec<Hidden>);

impl Message<Observe> for Coordinator {
    type Reply = Result<TokenReport, RuntimeError>;

    async fn handle(&mut self, Observe(hidden): Observe, ctx: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let token = self.next_token;
        self.next_token += 1;
        let me = ctx.actor_ref().clone();
        self.observe(token, hidden, &me).instrument(debug_span!("token", index = token)).await
    }
}

/// A child's probes' bytes, or why a pipelined load failed (reported in `failed_loads`).
type LateLoad = Result<Vec<(ProbeId, Arc<ProbeBytes>)>, LoadError>;

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
                Ok(b) if !self.active.contains(id) && self.active.len() + ids.len() < self.config.max_loaded => {
                    ids.push(id);
                    bytes.extend(b);
                }
                Ok(_) => {}
            }
        }
        if ids.is_empty() {
            return;
        }
        // Installed now, while the caller generates the next token; scored with it.
        if let Err(e) = self.activate_with(usize::MAX, &ids, bytes, None).await {
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
        // An empty round on every lane: each answers after everything sent before it.
        let mut lanes = Vec::with_capacity(self.layers.len());
        for (layer, none) in self.layers.iter().zip(self.no_states()) {
            lanes.push(layer.lane.apply_and_score(Vec::new(), HashMap::new(), 0, 0, none));
        }
        for answer in futures::future::join_all(lanes).await {
            answer
                .map_err(|_| steps_gone())?
                .map_err(|e| RuntimeError::token_error(usize::MAX, TokenErrorKind::Scoring(e)))?;
        }
        Ok(())
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
        self.active.iter().collect()
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
