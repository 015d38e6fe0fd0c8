//! The step scheduler: one OS thread that scores the requests of every session of a
//! [`Runtime`](super::Runtime), batched in steps.
//!
//! A step is whatever is waiting when the thread is free: it takes the first request, then
//! every other request already queued (after `runtime.batch_window_us`, if set), applies each
//! one's slot operations to its own session's slots, and scores the *union* of the requested
//! probes in one kernel call, each probe against the hidden states of the sessions that asked
//! for it ([`Kernel::score_sets`]). Each weight is read once per step, not once per session,
//! and each session gets back only its own probes' logits, in its slot order.
//!
//! - **Fair by construction.** A session's coordinator waits for each scoring reply before it
//!   sends the next request, so a step holds at most one request per session: a deep queue in
//!   one session cannot crowd out another. A second request from a session already in the
//!   step (which the coordinators never send, but nothing here relies on it) closes the step
//!   and starts the next one, so a session's requests are applied in order.
//! - **Nothing waits on a session.** A request whose caller went away (its reply channel
//!   closed) still has its slot operations applied, but is not scored; it is counted in
//!   `skipped_closed`. A request that fails (an empty slot) fails alone.
//! - **Residency.** Slots hold `Arc`s of the cache's entries, which keep them pinned: a probe
//!   active in several sessions is one entry, held several times, and a session's pruning only
//!   drops its own reference.
//! - **No deadlock.** The thread never sends to anyone but the reply channels, which never
//!   block (oneshot), so no cycle can form through it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::cache::ProbeBytes;
use super::faults::{Faults, PanicSite};
use super::inference::{Held, InferenceError, Scores, SlotRefs, TorchArena, WeightTraffic};
use super::pool::SlotOp;
use crate::kernel::{Kernel, ProbeRef, MAX_BATCH};
use crate::pack::{ConceptId, Pack};

/// A session's number on its runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "session {}", self.0)
    }
}

/// Slot operations for one session, then (with a reply channel) the logits of its slots
/// `[start, start + len)` for `hidden`.
pub(super) struct Work {
    pub session: SessionId,
    pub ops: Vec<SlotOp>,
    pub bytes: HashMap<ConceptId, Arc<ProbeBytes>>,
    pub start: usize,
    pub len: usize,
    pub hidden: Arc<Vec<f32>>,
    /// None for pruning's rearrangements, which nobody waits on.
    pub reply: Option<oneshot::Sender<Result<Scores, InferenceError>>>,
    /// The caller's span, so the step's work shows under the token that asked for it.
    pub span: tracing::Span,
}

pub(super) enum StepMsg {
    Open { session: SessionId, slots: usize },
    Work(Work),
    Close(SessionId),
    Stats(oneshot::Sender<StepStats>),
}

/// What the step scheduler has done, summed since the runtime started.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StepStats {
    /// Kernel calls (steps that scored something).
    pub steps: u64,
    /// Scoring requests served in those steps.
    pub requests: u64,
    /// Distinct probes scored, summed over steps (each read once per step).
    pub union_probes: u64,
    /// Probe × hidden-state logits computed.
    pub logits: u64,
    /// Time in the kernel, summed over steps (nanoseconds).
    pub kernel_ns: u64,
    /// Weight bytes the steps read (each union probe once per step).
    pub bytes_scored: u64,
    /// Requests whose caller had gone before their step (applied, not scored).
    pub skipped_closed: u64,
    /// Most requests in one step.
    pub max_step: usize,
    /// Steps by how many requests they served: bucket `i` counts steps of at most
    /// `STEP_SIZE_BOUNDS[i]` requests (and more than the bound before it); the last, the rest.
    pub step_sizes: [u64; STEP_SIZE_BUCKETS],
    /// Sessions whose slots the scheduler holds now.
    pub sessions: usize,
    /// Distinct probes held in any session's slots now (each resident once).
    pub held_probes: usize,
    /// References the sessions hold to them (a probe in k sessions counts k times).
    pub held_refs: usize,
    /// Installs and moves: references only, no weight bytes copied.
    pub traffic: WeightTraffic,
}

struct SessionSlots {
    slots: Slots,
    /// Set when a rearrangement failed: the session's slots can't be trusted any more.
    failed: Option<String>,
}

/// A session's slots.
enum Slots {
    /// The CPU kernel: references to the cache's entries.
    Kernel(SlotRefs),
    /// The shared tch arena: references to physical arena slots.
    Arena(Vec<Option<Arc<Physical>>>),
}

/// How steps are scored.
pub(super) enum Scoring {
    /// The CPU kernel, in place in the cache.
    Kernel(Kernel),
    /// One tch arena (an accelerator's memory, or the CPU with `device.cpu_kernel = "torch"`)
    /// shared by all sessions.
    Arena(SharedArena),
}

/// The tch arena shared by the sessions: a probe used by several sessions sits in one
/// physical slot, reference-counted; the slot is freed when the last session lets go. So a
/// session's installs copy a probe only when no session has it resident, and its slot moves
/// and swaps (pruning) move references, never weights.
pub(super) struct SharedArena {
    torch: TorchArena,
    slots: usize,
    resident: HashMap<ConceptId, std::sync::Weak<Physical>>,
    free: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl SharedArena {
    pub(super) fn new(torch: TorchArena, slots: usize) -> Self {
        let free = Arc::new(std::sync::Mutex::new((0..slots).rev().collect()));
        Self { torch, slots, resident: HashMap::new(), free }
    }
}

/// A physical arena slot holding a probe; back on the free list when dropped.
pub(super) struct Physical {
    slot: usize,
    free: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl Drop for Physical {
    fn drop(&mut self) {
        self.free.lock().expect("free list").push(self.slot);
    }
}

pub(super) struct Steps {
    pack: Arc<Pack>,
    scoring: Scoring,
    window: Duration,
    sessions: HashMap<SessionId, SessionSlots>,
    stats: StepStats,
    faults: Faults,
}

/// Upper bounds of the step-size buckets (a Prometheus histogram's `le`), and one more
/// bucket for larger steps.
pub const STEP_SIZE_BOUNDS: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 128];
pub const STEP_SIZE_BUCKETS: usize = STEP_SIZE_BOUNDS.len() + 1;

impl StepStats {
    fn count_step(&mut self, requests: usize, union: usize, logits: usize, kernel: Duration, bytes: u64) {
        let bucket = STEP_SIZE_BOUNDS.iter().position(|&b| requests <= b).unwrap_or(STEP_SIZE_BOUNDS.len());
        self.step_sizes[bucket] += 1;
        self.steps += 1;
        self.requests += requests as u64;
        self.union_probes += union as u64;
        self.logits += logits as u64;
        self.max_step = self.max_step.max(requests);
        self.kernel_ns += kernel.as_nanos() as u64;
        self.bytes_scored += bytes;
    }
}

/// A session's slot operations on the shared arena: an install takes the probe's physical
/// slot if a session has it resident, else a free one and copies the probe in (all of a
/// request's copies in one upload round); moves and swaps move references.
fn apply_arena(
    arena: &mut SharedArena,
    slots: &mut [Option<Arc<Physical>>],
    pack: &Pack,
    ops: &[SlotOp],
    bytes: &HashMap<ConceptId, Arc<ProbeBytes>>,
    traffic: &mut WeightTraffic,
) -> Result<(), InferenceError> {
    let n = slots.len();
    let check = |slot: usize| if slot < n { Ok(slot) } else { Err(InferenceError::NoSlot { slot, slots: n }) };
    let mut uploads = Vec::new();
    let mut walk = || -> Result<(), InferenceError> {
        for op in ops {
            match *op {
                SlotOp::Install { slot, id } => {
                    let slot = check(slot)?;
                    let physical = match arena.resident.get(&id).and_then(std::sync::Weak::upgrade) {
                        Some(p) => {
                            traffic.installs += 1; // shared: a reference, no copy
                            p
                        }
                        None => {
                            let free = arena.free.lock().expect("free list").pop();
                            let Some(free) = free else {
                                return Err(InferenceError::ArenaFull { slots: arena.slots });
                            };
                            let p = Arc::new(Physical { slot: free, free: arena.free.clone() });
                            arena.resident.insert(id, Arc::downgrade(&p));
                            uploads.push(SlotOp::Install { slot: free, id });
                            p
                        }
                    };
                    slots[slot] = Some(physical);
                }
                SlotOp::Move { from, to } => {
                    let held = slots[check(from)?].take();
                    slots[check(to)?] = held;
                    traffic.moves += 1;
                }
                SlotOp::Swap { a, b } => {
                    slots.swap(check(a)?, check(b)?);
                    traffic.moves += 1;
                }
            }
        }
        Ok(())
    };
    let walked = walk();
    // Every slot taken is filled, even when a later op failed: a resident slot must hold
    // its probe for whichever session takes it next. A physical slot freed and taken again
    // in this request holds its last install.
    let uploaded = arena.torch.apply(pack, &uploads, bytes, traffic);
    arena.resident.retain(|_, p| p.strong_count() > 0);
    walked.and(uploaded)
}

/// A scoring request admitted to the step, with what its slots hold (cache entries on the
/// kernel, physical slots on the arena).
struct Admitted<H> {
    reply: oneshot::Sender<Result<Scores, InferenceError>>,
    hidden: Arc<Vec<f32>>,
    held: Vec<H>,
    span: tracing::Span,
}

/// The step's requests whose slots resolve, by `held`; the others are answered with their
/// error (a closed session, an empty slot) and left out.
fn admit<H>(step: Vec<Work>, held: impl Fn(&Work) -> Result<Vec<H>, InferenceError>) -> Vec<Admitted<H>> {
    let mut admitted = Vec::with_capacity(step.len());
    for w in step {
        match held(&w) {
            Ok(held) => admitted.push(Admitted {
                reply: w.reply.expect("scoring requests have a reply"),
                hidden: w.hidden,
                held,
                span: w.span,
            }),
            Err(e) => {
                let _ = w.reply.map(|r| r.send(Err(e)));
            }
        }
    }
    admitted
}

fn closed(session: SessionId) -> InferenceError {
    InferenceError::Setup(format!("{session} is closed"))
}

impl Steps {
    pub(super) fn new(pack: Arc<Pack>, scoring: Scoring, window: Duration, path: &str, faults: Faults) -> Self {
        let stats = StepStats { traffic: WeightTraffic::new(path), ..Default::default() };
        Self { pack, scoring, window, sessions: HashMap::new(), stats, faults }
    }

    /// Serves until every sender is gone.
    pub(super) fn run(mut self, rx: flume::Receiver<StepMsg>) {
        let mut carried: Option<StepMsg> = None;
        loop {
            let first = match carried.take() {
                Some(m) => m,
                None => match rx.recv() {
                    Ok(m) => m,
                    Err(_) => return,
                },
            };
            if !self.window.is_zero() && matches!(&first, StepMsg::Work(w) if w.reply.is_some()) {
                std::thread::sleep(self.window);
            }
            let mut step: Vec<Work> = Vec::new();
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    StepMsg::Open { session, slots } => {
                        let slots = match self.scoring {
                            Scoring::Kernel(_) => Slots::Kernel(SlotRefs::new(slots)),
                            Scoring::Arena(_) => Slots::Arena((0..slots).map(|_| None).collect()),
                        };
                        self.sessions.insert(session, SessionSlots { slots, failed: None });
                    }
                    StepMsg::Close(session) if step.iter().any(|s| s.session == session) => {
                        // Its request in this step is scored first (its caller may be gone).
                        carried = Some(StepMsg::Close(session));
                        break;
                    }
                    StepMsg::Close(session) => {
                        self.sessions.remove(&session);
                    }
                    StepMsg::Stats(reply) if !step.is_empty() => {
                        // Answered after this step, so the stats count everything sent before.
                        carried = Some(StepMsg::Stats(reply));
                        break;
                    }
                    StepMsg::Stats(reply) => {
                        let _ = reply.send(self.stats());
                    }
                    StepMsg::Work(w) => {
                        let full = step.len() == MAX_BATCH && w.reply.is_some();
                        if full || step.iter().any(|s| s.session == w.session) {
                            carried = Some(StepMsg::Work(w));
                            break;
                        }
                        if let Some(w) = self.apply(w) {
                            step.push(w);
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
            if !step.is_empty() {
                self.score(step);
            }
        }
    }

    /// Applies a request's slot operations; returns it if it still needs scoring.
    fn apply(&mut self, mut w: Work) -> Option<Work> {
        let Some(s) = self.sessions.get_mut(&w.session) else {
            if let Some(reply) = w.reply {
                let _ = reply.send(Err(closed(w.session)));
            }
            return None;
        };
        if s.failed.is_none() {
            let applied = match (&mut s.slots, &mut self.scoring) {
                (Slots::Kernel(slots), _) => slots.apply(&self.pack, &w.ops, &w.bytes, &mut self.stats.traffic),
                (Slots::Arena(slots), Scoring::Arena(arena)) => {
                    apply_arena(arena, slots, &self.pack, &w.ops, &w.bytes, &mut self.stats.traffic)
                }
                (Slots::Arena(_), Scoring::Kernel(_)) => unreachable!("slots match the scoring"),
            };
            if let Err(e) = applied {
                s.failed = Some(e.to_string());
            }
        }
        // Installed: the request's own references go now, the slots keep theirs.
        drop(std::mem::take(&mut w.bytes));
        let reply = w.reply.as_ref()?;
        if reply.is_closed() {
            self.stats.skipped_closed += 1;
            return None;
        }
        if let Some(why) = &s.failed {
            let _ = w.reply.take().map(|r| r.send(Err(InferenceError::EarlierRearrange(why.clone()))));
            return None;
        }
        if w.len == 0 {
            let _ = w.reply.take().map(|r| r.send(Ok(Scores { logits: Vec::new(), scoring: Duration::ZERO })));
            return None;
        }
        Some(w)
    }

    /// Scores the union of the step's probes, each against the hidden states that need it.
    fn score(&mut self, step: Vec<Work>) {
        match self.scoring {
            Scoring::Kernel(_) => self.score_in_place(step),
            Scoring::Arena(_) => self.score_on_arena(step),
        }
    }

    /// The CPU kernel: one `score_sets` call over the cache's bytes. If it fails (or panics),
    /// each request is scored again alone, so that only the ones that fail by themselves get
    /// the error: one session's bad probe does not fail the other sessions of its step.
    fn score_in_place(&mut self, step: Vec<Work>) {
        let Scoring::Kernel(kernel) = &self.scoring else { unreachable!("kernel scoring") };
        let t = Instant::now();
        let admitted = admit(step, |w| match self.sessions.get(&w.session).map(|s| &s.slots) {
            Some(Slots::Kernel(slots)) => slots.held(w.start, w.len),
            _ => Err(closed(w.session)),
        });
        if admitted.is_empty() {
            return;
        }
        let (answers, union, logits) = match kernel_step(kernel, &self.faults, &admitted) {
            Ok((answers, union, logits)) => (answers.into_iter().map(Ok).collect(), union, logits),
            Err(e) if admitted.len() == 1 => (vec![Err(e)], 0, 0),
            Err(e) => {
                tracing::warn!("a step of {} requests failed ({e}); scoring each alone", admitted.len());
                let (mut union, mut logits) = (0, 0);
                let answers: Vec<_> = admitted
                    .iter()
                    .map(|a| {
                        let (mut one, u, l) = kernel_step(kernel, &self.faults, std::slice::from_ref(a))?;
                        (union, logits) = (union + u, logits + l);
                        Ok(one.pop().expect("one request, one answer"))
                    })
                    .collect();
                (answers, union, logits)
            }
        };
        let scoring = t.elapsed();
        if union > 0 {
            let bytes = (union * self.pack.layout().byte_len()) as u64;
            self.stats.count_step(admitted.len(), union, logits, scoring, bytes);
        }
        for (a, answer) in admitted.into_iter().zip(answers) {
            let _e = a.span.enter();
            let _ = a.reply.send(answer.map(|logits| Scores { logits, scoring }));
        }
    }

    /// The shared tch arena: the union's physical slots gathered and scored against every
    /// hidden state of the step in one pass (on an accelerator the extra probe × state pairs
    /// cost less than a launch per subset).
    fn score_on_arena(&mut self, step: Vec<Work>) {
        let Scoring::Arena(arena) = &self.scoring else { unreachable!("arena scoring") };
        let t = Instant::now();
        let admitted = admit(step, |w| match self.sessions.get(&w.session).map(|s| &s.slots) {
            Some(Slots::Arena(slots)) => match slots.get(w.start..w.start + w.len) {
                None => Err(InferenceError::NoSlot { slot: w.start + w.len - 1, slots: slots.len() }),
                Some(held) => held
                    .iter()
                    .enumerate()
                    .map(|(i, p)| p.as_ref().map(|p| p.slot).ok_or(InferenceError::EmptySlot(w.start + i)))
                    .collect(),
            },
            _ => Err(closed(w.session)),
        });
        if admitted.is_empty() {
            return;
        }
        // The union of physical slots, and each request's positions in it.
        let mut index: HashMap<usize, usize> = HashMap::new();
        let mut physical: Vec<usize> = Vec::new();
        let wants: Vec<Vec<usize>> = admitted
            .iter()
            .map(|a| {
                a.held
                    .iter()
                    .map(|&p| {
                        *index.entry(p).or_insert_with(|| {
                            physical.push(p);
                            physical.len() - 1
                        })
                    })
                    .collect()
            })
            .collect();
        let batch = admitted.len();
        let hidden: Vec<&[f32]> = admitted.iter().map(|a| &a.hidden[..]).collect();
        let result = arena.torch.score_slots(&physical, &hidden);
        let scoring = t.elapsed();
        let bytes = (physical.len() * self.pack.layout().byte_len()) as u64;
        self.stats.count_step(batch, physical.len(), physical.len() * batch, scoring, bytes);
        for (b, (a, mine)) in admitted.into_iter().zip(wants).enumerate() {
            let _e = a.span.enter();
            let answer = match &result {
                Ok(out) => Ok(Scores { logits: mine.iter().map(|&u| out[u * batch + b]).collect(), scoring }),
                Err(e) => Err(InferenceError::Tch(e.to_string())),
            };
            let _ = a.reply.send(answer);
        }
    }

    fn stats(&self) -> StepStats {
        // Distinct probes held (the cache's entries, or physical arena slots), and references.
        let mut held: HashMap<usize, usize> = HashMap::new();
        for s in self.sessions.values() {
            match &s.slots {
                Slots::Kernel(slots) => slots.ids().for_each(|id| *held.entry(id.0 as usize).or_default() += 1),
                Slots::Arena(slots) => slots.iter().flatten().for_each(|p| *held.entry(p.slot).or_default() += 1),
            }
        }
        StepStats {
            sessions: self.sessions.len(),
            held_probes: held.len(),
            held_refs: held.values().sum(),
            ..self.stats.clone()
        }
    }
}

/// Scores the union of `admitted`'s probes in one kernel call, each against the hidden states
/// that need it. Returns each request's logits in its slot order, the union's size and the
/// logits computed. A panic in the kernel is caught and returned as the step's error: the
/// kernel only reads its inputs and writes `out`, which is dropped, so nothing is left half
/// done.
fn kernel_step(
    kernel: &Kernel,
    faults: &Faults,
    admitted: &[Admitted<&Held>],
) -> Result<(Vec<Vec<f32>>, usize, usize), InferenceError> {
    // The union, keyed by probe: its bytes (any session's reference: the same entry, or the
    // same file bytes), the hidden states that need it, and where each request's logits will
    // be.
    let mut index: HashMap<ConceptId, usize> = HashMap::new();
    let mut probes: Vec<ProbeRef> = Vec::new();
    let mut sets: Vec<Vec<usize>> = Vec::new();
    let mut wants: Vec<Vec<(usize, usize)>> = Vec::with_capacity(admitted.len());
    for (b, a) in admitted.iter().enumerate() {
        let mut mine = Vec::with_capacity(a.held.len());
        for h in &a.held {
            let u = *index.entry(h.bytes.id).or_insert_with(|| {
                probes.push(h.probe());
                sets.push(Vec::new());
                probes.len() - 1
            });
            sets[u].push(b);
            mine.push((u, sets[u].len() - 1));
        }
        wants.push(mine);
    }
    // The union's ids are `index`'s keys (read only when a fault plan is set).
    if let Some(p) = faults.step_fails(index.keys().copied()) {
        return Err(InferenceError::StepFailed(format!("injected fault at probe {}", p.0)));
    }
    let mut offsets = Vec::with_capacity(sets.len());
    let mut total = 0;
    for s in &sets {
        offsets.push(total);
        total += s.len();
    }
    let hidden: Vec<&[f32]> = admitted.iter().map(|a| &a.hidden[..]).collect();
    let set_refs: Vec<&[usize]> = sets.iter().map(|s| &s[..]).collect();
    let mut out = vec![0f32; total];
    let span = tracing::debug_span!("step", requests = admitted.len(), union = probes.len());
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        span.in_scope(|| {
            faults.maybe_panic(PanicSite::Scoring, index.keys().copied());
            kernel.score_sets(&probes, &set_refs, &hidden, &mut out)
        })
    }));
    match ran {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(InferenceError::Kernel(e)),
        Err(panic) => return Err(InferenceError::StepFailed(format!("the kernel panicked: {}", panic_text(&panic)))),
    }
    let answers = wants.iter().map(|mine| mine.iter().map(|&(u, pos)| out[offsets[u] + pos]).collect()).collect();
    Ok((answers, probes.len(), total))
}

/// A caught panic's message, where it has one.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// A session's way into the step scheduler. The channel is unbounded, but what is in it is
/// bounded by construction: a session has at most one scoring request and one rearrangement
/// outstanding (its coordinator waits for each score), and `runtime.max_sessions` bounds the
/// sessions. Dropping the lane closes the session's slots, after everything it sent.
pub(super) struct Lane {
    session: SessionId,
    tx: flume::Sender<StepMsg>,
}

/// The step scheduler has stopped.
#[derive(Debug)]
pub(super) struct StepsGone;

impl Lane {
    pub(super) fn open(session: SessionId, slots: usize, tx: flume::Sender<StepMsg>) -> Result<Self, StepsGone> {
        tx.send(StepMsg::Open { session, slots }).map_err(|_| StepsGone)?;
        Ok(Self { session, tx })
    }

    fn work(&self, ops: Vec<SlotOp>, bytes: HashMap<ConceptId, Arc<ProbeBytes>>) -> Work {
        Work {
            session: self.session,
            ops,
            bytes,
            start: 0,
            len: 0,
            hidden: Arc::new(Vec::new()),
            reply: None,
            span: tracing::Span::current(),
        }
    }

    pub(super) async fn apply_and_score(
        &self,
        m: super::inference::ApplyAndScore,
    ) -> Result<Result<Scores, InferenceError>, StepsGone> {
        let (reply, answer) = oneshot::channel();
        let work =
            Work { start: m.start, len: m.len, hidden: m.hidden, reply: Some(reply), ..self.work(m.ops, m.bytes) };
        self.tx.send_async(StepMsg::Work(work)).await.map_err(|_| StepsGone)?;
        answer.await.map_err(|_| StepsGone)
    }

    pub(super) fn rearrange(&self, ops: Vec<SlotOp>) -> Result<(), StepsGone> {
        self.tx.send(StepMsg::Work(self.work(ops, HashMap::new()))).map_err(|_| StepsGone)
    }
}

impl Lane {
    /// Frees the session's slots, after everything it sent. Closing twice is harmless.
    pub(super) fn close(&self) {
        let _ = self.tx.send(StepMsg::Close(self.session));
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.close();
    }
}

/// Starts the scheduler on its own thread, which ends when the last sender is gone.
pub(super) fn spawn(steps: Steps) -> std::io::Result<flume::Sender<StepMsg>> {
    let (tx, rx) = flume::unbounded();
    std::thread::Builder::new().name("steps".into()).spawn(move || steps.run(rx))?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tensors::RowSplit;
    use crate::kernel::{reference_logit, Isa};
    use crate::synth::{write_synth_pack, SynthParams};

    struct Setup {
        _dir: tempfile::TempDir,
        pack: Arc<Pack>,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        write_synth_pack(dir.path(), &SynthParams::tiny(), |_| {}).unwrap();
        let pack = Arc::new(Pack::open(dir.path()).unwrap());
        Setup { _dir: dir, pack }
    }

    fn bytes(pack: &Pack, ids: &[u32]) -> HashMap<ConceptId, Arc<ProbeBytes>> {
        ids.iter()
            .map(|&i| {
                (ConceptId(i), Arc::new(ProbeBytes::detached(ConceptId(i), pack.read_probe(ConceptId(i)).unwrap())))
            })
            .collect()
    }

    fn hidden(pack: &Pack, seed: f32) -> Arc<Vec<f32>> {
        Arc::new((0..pack.hidden_dim()).map(|i| (i as f32 * seed).sin()).collect())
    }

    type Reply = oneshot::Receiver<Result<Scores, InferenceError>>;

    /// A scoring request: installs `ids` into slots `0..`, then scores slots `0..len`.
    fn work(s: u64, pack: &Pack, install: &[u32], len: usize, h: Arc<Vec<f32>>) -> (StepMsg, Reply) {
        let ops = install.iter().enumerate().map(|(slot, &id)| SlotOp::Install { slot, id: ConceptId(id) }).collect();
        let (reply, rx) = oneshot::channel();
        let w = Work {
            session: SessionId(s),
            ops,
            bytes: bytes(pack, install),
            start: 0,
            len,
            hidden: h,
            reply: Some(reply),
            span: tracing::Span::none(),
        };
        (StepMsg::Work(w), rx)
    }

    fn want(pack: &Pack, id: u32, h: &[f32]) -> u32 {
        let b = pack.read_probe(ConceptId(id)).unwrap();
        let ranges = pack.layout().ranges(&pack.tensor_offsets(ConceptId(id)));
        reference_logit(&ProbeRef { bytes: &b, ranges: &ranges }, pack.layout().dtype, h).to_bits()
    }

    fn logits(rx: Reply) -> Result<Vec<u32>, InferenceError> {
        rx.blocking_recv().unwrap().map(|s| s.logits.iter().map(|l| l.to_bits()).collect())
    }

    /// Runs the scheduler over `msgs` (queued before it starts, so they arrive together) and
    /// returns its stats.
    fn serve(pack: &Arc<Pack>, msgs: Vec<StepMsg>) -> StepStats {
        let kernel = Kernel::new(&pack.layout(), Isa::best(), 2).unwrap();
        let (tx, rx) = flume::unbounded();
        for m in msgs {
            tx.send(m).unwrap();
        }
        let (stats_tx, stats) = oneshot::channel();
        tx.send(StepMsg::Stats(stats_tx)).unwrap();
        drop(tx);
        Steps::new(pack.clone(), Scoring::Kernel(kernel), Duration::ZERO, "test", Faults::none()).run(rx);
        stats.blocking_recv().unwrap()
    }

    #[test]
    fn a_step_scores_the_union_once_and_gives_each_session_its_own_logits() {
        let setup = setup();
        let pack = setup.pack.clone();
        let (h1, h2) = (hidden(&pack, 0.3), hidden(&pack, 0.7));
        let open = |s, slots| StepMsg::Open { session: SessionId(s), slots };
        let (w1, r1) = work(1, &pack, &[3, 7], 2, h1.clone());
        let (w2, r2) = work(2, &pack, &[7, 9, 3], 3, h2.clone());
        // Session 1's second request must wait for the next step (its slots change first).
        let (w1b, r1b) = work(1, &pack, &[11], 2, h2.clone());
        let (unknown, r_unknown) = work(5, &pack, &[3], 1, h1.clone());
        let (gone, r_gone) = work(2, &pack, &[], 3, h1.clone());
        drop(r_gone);
        let stats = serve(
            &pack,
            vec![
                open(1, 4),
                open(2, 4),
                w1,
                w2,
                w1b,
                unknown,
                gone,
                StepMsg::Close(SessionId(2)),
                StepMsg::Close(SessionId(2)),
            ],
        );
        assert_eq!(logits(r1).unwrap(), [want(&pack, 3, &h1), want(&pack, 7, &h1)]);
        assert_eq!(logits(r2).unwrap(), [want(&pack, 7, &h2), want(&pack, 9, &h2), want(&pack, 3, &h2)]);
        // Slot 0 now holds probe 11, slot 1 still probe 7.
        assert_eq!(logits(r1b).unwrap(), [want(&pack, 11, &h2), want(&pack, 7, &h2)]);
        assert!(logits(r_unknown).unwrap_err().to_string().contains("session 5 is closed"));
        // First step: both sessions, union {3, 7, 9} read once, 5 logits.
        assert_eq!(stats.skipped_closed, 1);
        assert_eq!((stats.steps, stats.requests, stats.max_step), (2, 3, 2));
        assert_eq!(stats.step_sizes[..3], [1, 1, 0], "one step of 1 request, one of 2");
        assert_eq!((stats.union_probes, stats.logits), (3 + 2, 5 + 2));
        // Session 2 closed; session 1 holds probes 11 and 7.
        assert_eq!((stats.sessions, stats.held_probes, stats.held_refs), (1, 2, 2));
        assert_eq!((stats.traffic.installs, stats.traffic.install_bytes_copied), (6, 0));
    }

    #[test]
    fn a_close_behind_a_request_in_the_step_waits_for_it_and_bad_slots_fail_alone() {
        let setup = setup();
        let pack = setup.pack.clone();
        let h = hidden(&pack, 0.5);
        let (w1, r1) = work(1, &pack, &[3], 1, h.clone());
        // Asks for two slots but only one holds a probe: an error for this request only.
        let (w2, r2) = work(2, &pack, &[4], 2, h.clone());
        let msgs = vec![
            StepMsg::Open { session: SessionId(1), slots: 2 },
            StepMsg::Open { session: SessionId(2), slots: 2 },
            w1,
            StepMsg::Close(SessionId(1)),
            w2,
        ];
        let stats = serve(&pack, msgs);
        assert_eq!(logits(r1).unwrap(), [want(&pack, 3, &h)]);
        let err = logits(r2).unwrap_err();
        assert!(matches!(err, InferenceError::EmptySlot(1)), "{err}");
        assert_eq!(stats.sessions, 1);
    }

    // The shared tch arena, run on the CPU (`device.cpu_kernel = "torch"` takes the same
    // path as an accelerator, without staging).
    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-4 * (1.0 + b.abs())
    }

    #[test]
    fn on_the_shared_arena_sessions_share_physical_slots_and_get_their_own_logits() {
        let setup = setup();
        let pack = setup.pack.clone();
        let torch = TorchArena::new(&pack, 4, tch::Device::Cpu, tch::Kind::Float, None, RowSplit::none()).unwrap();
        let mut steps =
            Steps::new(pack.clone(), Scoring::Arena(SharedArena::new(torch, 4)), Duration::ZERO, "t", Faults::none());
        let h = |seed: f32| hidden(&pack, seed);
        let bytes = |ids: &[u32]| bytes(&pack, ids);
        let want = |id: u32, x: &[f32]| f32::from_bits(want(&pack, id, x));
        let install = |ids: &[u32]| -> Vec<SlotOp> {
            ids.iter().enumerate().map(|(slot, &id)| SlotOp::Install { slot, id: ConceptId(id) }).collect()
        };
        for s in [1, 2, 3] {
            steps.sessions.insert(
                SessionId(s),
                SessionSlots { slots: Slots::Arena((0..4).map(|_| None).collect()), failed: None },
            );
        }
        let (h1, h2) = (h(0.3), h(0.7));
        let mut replies = Vec::new();
        let mut step = Vec::new();
        for (s, ids, x) in [(1, vec![3, 7], h1.clone()), (2, vec![7, 9, 3], h2.clone())] {
            let (reply, rx) = oneshot::channel();
            let w = Work {
                session: SessionId(s),
                ops: install(&ids),
                bytes: bytes(&ids),
                start: 0,
                len: ids.len(),
                hidden: x,
                reply: Some(reply),
                span: tracing::Span::none(),
            };
            step.push(steps.apply(w).unwrap());
            replies.push(rx);
        }
        steps.score(step);
        let got: Vec<Vec<f32>> = replies.into_iter().map(|r| r.blocking_recv().unwrap().unwrap().logits).collect();
        for (g, w) in got[0].iter().zip([want(3, &h1), want(7, &h1)]) {
            assert!(close(*g, w), "session 1: {g} vs {w}");
        }
        for (g, w) in got[1].iter().zip([want(7, &h2), want(9, &h2), want(3, &h2)]) {
            assert!(close(*g, w), "session 2: {g} vs {w}");
        }
        // Probes 3 and 7 are resident once: 3 physical slots for 5 references, 3 copies.
        let stats = steps.stats();
        assert_eq!((stats.held_probes, stats.held_refs), (3, 5));
        assert_eq!(stats.traffic.installs, 5);
        assert_eq!(stats.traffic.install_bytes_copied, 3 * pack.layout().byte_len() as u64);
        // Session 1 lets go of probe 3 (moved over), session 2 still holds it; then two new
        // probes need the one free slot plus the one probe 7 frees when session 2 closes.
        let (reply, rx) = oneshot::channel();
        let w = Work {
            session: SessionId(1),
            ops: vec![SlotOp::Move { from: 1, to: 0 }],
            bytes: HashMap::new(),
            start: 0,
            len: 1,
            hidden: h1.clone(),
            reply: Some(reply),
            span: tracing::Span::none(),
        };
        let w = steps.apply(w).unwrap();
        steps.score(vec![w]);
        assert!(close(rx.blocking_recv().unwrap().unwrap().logits[0], want(7, &h1)));
        assert_eq!(steps.stats().held_probes, 3, "probe 3 stays: session 2 holds it");
        // A session asking for more probes than there are free slots fails alone, naming the key.
        let ops = install(&[11, 13]);
        let w = Work {
            session: SessionId(3),
            ops,
            bytes: bytes(&[11, 13]),
            start: 0,
            len: 0,
            hidden: Arc::new(Vec::new()),
            reply: None,
            span: tracing::Span::none(),
        };
        assert!(steps.apply(w).is_none());
        let failed = steps.sessions[&SessionId(3)].failed.clone().unwrap();
        assert!(failed.contains("runtime.pool_slots"), "{failed}");
        // Closing session 2 frees probes 9 and 3; 7 stays with session 1.
        steps.sessions.remove(&SessionId(2));
        let stats = steps.stats();
        assert!(stats.held_probes <= 2, "{stats:?}");
        assert_eq!(steps.sessions[&SessionId(1)].failed, None);
    }
}
