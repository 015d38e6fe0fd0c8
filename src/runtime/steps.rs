//! The step scheduler: one OS thread that scores the requests of every session of a
//! [`Runtime`](super::Runtime), batched in steps, through a [`ScoringBackend`].
//!
//! A step is whatever is waiting when the thread is free: it takes the first request, then
//! every other request already queued (after `runtime.batch_window_us`, if set), has the
//! backend apply each one's slot operations to its own session's slots, and scores the
//! *union* of the requested probes in one backend call, each weight read once per step, not
//! once per session; each session gets back only its own probes' logits, in its slot order.
//! This file keeps only batching, fairness and close ordering; what a slot holds and how a
//! step is scored is the backend's (`scoring/`).
//!
//! - **Fair by construction.** A session's coordinator waits for each scoring reply before it
//!   sends the next request, so a step holds at most one request per session: a deep queue in
//!   one session cannot crowd out another. A second request from a session already in the
//!   step (which the coordinators never send, but nothing here relies on it) closes the step
//!   and starts the next one, so a session's requests are applied in order.
//! - **Nothing waits on a session.** A request whose caller went away (its reply channel
//!   closed) still has its slot operations applied, but is not scored; it is counted in
//!   `skipped_closed`. A request that fails (an empty slot) fails alone, and a step that fails
//!   as a whole (the backend errs or panics) is scored again request by request, so only the
//!   requests that fail by themselves get the error.
//! - **Poisoned slots.** When a session's slot operations fail, its slots are no longer what
//!   its coordinator believes: the session is poisoned (one typed state per session, here),
//!   and every later request of it is answered with the cause. Other sessions go on.
//! - **No deadlock.** The thread never sends to anyone but the reply channels, which never
//!   block (oneshot), so no cycle can form through it.
//!
//! Why a plain thread and not a kameo actor: a step is *everything* queued when the thread is
//! free, so the scheduler must drain its queue at once (`try_recv` until empty), and a kameo
//! actor sees one message at a time with no look at what waits behind it. It also blocks for
//! the whole of a step (the kernel's rayon pool, or libtorch on the device), and it owns the
//! backend's tensors, which are `Send` but not `Sync`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::cache::ProbeBytes;
use super::faults::Faults;
use super::pool::SlotOp;
use super::scoring::{Request, ScoringBackend, ScoringError, State, StepScores};
use crate::kernel::MAX_BATCH;
use crate::pack::{Pack, ProbeId};
pub use crate::types::SessionId;
use crate::types::WeightTraffic;

/// Logits of the requested slots, and how long the scoring itself took (the rest of the round
/// trip is installs and moves), for the per-stage breakdown.
#[derive(Debug)]
pub struct Scores {
    pub logits: Vec<f32>,
    pub scoring: Duration,
}

/// Slot operations for one session, then (with a reply channel) the logits of its slots
/// `[start, start + len)` for `hidden`.
pub(super) struct Work {
    pub session: SessionId,
    pub ops: Vec<SlotOp>,
    pub bytes: HashMap<ProbeId, Arc<ProbeBytes>>,
    pub start: usize,
    pub len: usize,
    pub hidden: Arc<State>,
    /// None for pruning's rearrangements, which nobody waits on.
    pub reply: Option<oneshot::Sender<Result<Scores, ScoringError>>>,
    /// The caller's span, so the step's work shows under the token that asked for it.
    pub span: tracing::Span,
}

pub(super) enum StepMsg {
    Open {
        session: SessionId,
        slots: usize,
    },
    Work(Work),
    /// Probes to copy into a resident store ahead of their activation (prefetch hints).
    Warm(HashMap<ProbeId, Arc<ProbeBytes>>),
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
    /// Slot tables the scheduler holds now: one per open session, or one per model layer for a
    /// pack whose probes read several (each session has a lane per layer).
    pub sessions: usize,
    /// Distinct probes held in any session's slots now (each resident once).
    pub held_probes: usize,
    /// References the sessions hold to them (a probe in k sessions counts k times).
    pub held_refs: usize,
    /// Installs and moves, and the weight bytes they copied (the kernel: none; the tch store:
    /// each probe once, as it becomes resident), with the resident store's figures.
    pub traffic: WeightTraffic,
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

pub(super) struct Steps {
    pack: Arc<Pack>,
    backend: Box<dyn ScoringBackend>,
    window: Duration,
    /// The sessions open at the scheduler, each with its poisoned-slots state: set when an
    /// operation on its slots failed, the cause every later request is answered with.
    sessions: HashMap<SessionId, Option<Arc<ScoringError>>>,
    stats: StepStats,
    faults: Faults,
}

impl Steps {
    pub(super) fn new(pack: Arc<Pack>, backend: Box<dyn ScoringBackend>, window: Duration, faults: Faults) -> Self {
        let stats = StepStats { traffic: WeightTraffic::new(backend.path()), ..Default::default() };
        Self { pack, backend, window, sessions: HashMap::new(), stats, faults }
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
                        self.backend.open(session, slots);
                        self.sessions.insert(session, None);
                    }
                    StepMsg::Close(session) if step.iter().any(|s| s.session == session) => {
                        // Its request in this step is scored first (its caller may be gone).
                        carried = Some(StepMsg::Close(session));
                        break;
                    }
                    StepMsg::Close(session) => {
                        self.sessions.remove(&session);
                        self.backend.close(session);
                    }
                    // Between steps, where the thread would otherwise wait (hints are sent
                    // after a token's report).
                    StepMsg::Warm(bytes) => self.backend.warm(&bytes),
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
        let Some(poisoned) = self.sessions.get_mut(&w.session) else {
            if let Some(reply) = w.reply {
                let _ = reply.send(Err(ScoringError::Closed(w.session)));
            }
            return None;
        };
        // Most requests (a token's first scoring) carry no slot operations: nothing to apply.
        if poisoned.is_none() && !w.ops.is_empty() {
            match self.backend.apply(w.session, &w.ops, &w.bytes) {
                Ok(()) => {}
                // Refused as a whole (a full store, a failed copy, an evicted probe): the slots
                // are as they were, so only this request fails, with the cause.
                Err(e) if e.refused_before_applying() => {
                    if let Some(reply) = w.reply.take() {
                        let _ = reply.send(Err(e));
                    }
                    return None;
                }
                Err(e) => *poisoned = Some(Arc::new(e)),
            }
        }
        // Installed: the request's own references go now, the slots keep theirs.
        drop(std::mem::take(&mut w.bytes));
        let reply = w.reply.as_ref()?;
        if reply.is_closed() {
            self.stats.skipped_closed += 1;
            return None;
        }
        if let Some(cause) = poisoned {
            let _ = w.reply.take().map(|r| r.send(Err(ScoringError::Poisoned(cause.clone()))));
            return None;
        }
        if w.len == 0 {
            let _ = w.reply.take().map(|r| r.send(Ok(Scores { logits: Vec::new(), scoring: Duration::ZERO })));
            return None;
        }
        Some(w)
    }

    /// Scores the step's requests in one backend call. If the call fails (or panics) and the
    /// step served several requests, each is scored again alone, so that only the ones that
    /// fail by themselves get the error: one session's bad probe does not fail the others.
    fn score(&mut self, step: Vec<Work>) {
        let t = Instant::now();
        let requests: Vec<Request> = step
            .iter()
            .map(|w| Request { session: w.session, start: w.start, len: w.len, hidden: &w.hidden })
            .collect();
        let (answers, union, logits) = match self.score_caught(&requests) {
            Ok(s) => (s.answers, s.union, s.logits),
            Err(e) if requests.len() == 1 => (vec![Err(e)], 0, 0),
            Err(e) => {
                tracing::warn!("a step of {} requests failed ({e}); scoring each alone", requests.len());
                let (mut union, mut logits) = (0, 0);
                let answers = requests
                    .iter()
                    .map(|r| {
                        let mut one = self.score_caught(std::slice::from_ref(r))?;
                        (union, logits) = (union + one.union, logits + one.logits);
                        one.answers.pop().expect("one request, one answer")
                    })
                    .collect();
                (answers, union, logits)
            }
        };
        let scoring = t.elapsed();
        if union > 0 {
            let bytes = (union * self.pack.layout().byte_len()) as u64;
            self.stats.count_step(requests.len(), union, logits, scoring, bytes);
        }
        drop(requests);
        for (w, answer) in step.into_iter().zip(answers) {
            let _e = w.span.enter();
            if let Some(reply) = w.reply {
                let _ = reply.send(answer.map(|logits| Scores { logits, scoring }));
            }
        }
    }

    /// One backend call, its panic caught and returned as the step's error: scoring only
    /// reads the slots, so nothing is left half done.
    fn score_caught(&mut self, requests: &[Request]) -> Result<StepScores, ScoringError> {
        let span = tracing::debug_span!("step", requests = requests.len());
        let (backend, faults) = (&mut self.backend, &self.faults);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            span.in_scope(|| backend.score(requests, faults))
        })) {
            Ok(scored) => scored,
            Err(panic) => Err(ScoringError::Panicked(panic_text(&panic))),
        }
    }

    fn stats(&self) -> StepStats {
        let held = self.backend.holdings();
        StepStats {
            sessions: self.sessions.len(),
            held_probes: held.probes,
            held_refs: held.refs,
            traffic: self.backend.traffic(),
            ..self.stats.clone()
        }
    }
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

    fn work(&self, ops: Vec<SlotOp>, bytes: HashMap<ProbeId, Arc<ProbeBytes>>) -> Work {
        Work {
            session: self.session,
            ops,
            bytes,
            start: 0,
            len: 0,
            hidden: Arc::new(State::Host(Vec::new())),
            reply: None,
            span: tracing::Span::current(),
        }
    }

    /// Applies `ops` (installing from `bytes`), then scores slots `[start, start + len)`.
    pub(super) async fn apply_and_score(
        &self,
        ops: Vec<SlotOp>,
        bytes: HashMap<ProbeId, Arc<ProbeBytes>>,
        start: usize,
        len: usize,
        hidden: Arc<State>,
    ) -> Result<Result<Scores, ScoringError>, StepsGone> {
        let (reply, answer) = oneshot::channel();
        let work = Work { start, len, hidden, reply: Some(reply), ..self.work(ops, bytes) };
        self.tx.send_async(StepMsg::Work(work)).await.map_err(|_| StepsGone)?;
        answer.await.map_err(|_| StepsGone)
    }

    /// Pruning's slot operations, which nobody waits on: the next request sees them done.
    pub(super) fn rearrange(&self, ops: Vec<SlotOp>) -> Result<(), StepsGone> {
        self.tx.send(StepMsg::Work(self.work(ops, HashMap::new()))).map_err(|_| StepsGone)
    }

    /// A handle that sends prefetched probes to the resident store, for a task of its own.
    pub(super) fn warmer(&self) -> Warmer {
        Warmer(self.tx.clone())
    }

    /// Frees the session's slots, after everything it sent. Closing twice is harmless.
    pub(super) fn close(&self) {
        let _ = self.tx.send(StepMsg::Close(self.session));
    }
}

/// Sends prefetched probes to the scheduler ([`Lane::warmer`]).
pub(super) struct Warmer(flume::Sender<StepMsg>);

impl Warmer {
    /// Fire and forget: a scheduler that has stopped has no store to warm.
    pub(super) fn send(&self, bytes: HashMap<ProbeId, Arc<ProbeBytes>>) {
        if !bytes.is_empty() {
            let _ = self.0.send(StepMsg::Warm(bytes));
        }
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
    use crate::kernel::{reference_logit, Isa, Kernel, ProbeRef};
    use crate::pack::ProbeId;
    use crate::runtime::scoring::kernel::KernelBackend;
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

    fn bytes(pack: &Pack, ids: &[u32]) -> HashMap<ProbeId, Arc<ProbeBytes>> {
        ids.iter()
            .map(|&i| (ProbeId(i), Arc::new(ProbeBytes::detached(ProbeId(i), pack.read_probe(ProbeId(i)).unwrap()))))
            .collect()
    }

    fn hidden(pack: &Pack, seed: f32) -> Arc<State> {
        Arc::new(State::Host((0..pack.hidden_dim()).map(|i| (i as f32 * seed).sin()).collect()))
    }

    type Reply = oneshot::Receiver<Result<Scores, ScoringError>>;

    /// A scoring request: installs `ids` into slots `0..`, then scores slots `0..len`.
    fn work(s: u64, pack: &Pack, install: &[u32], len: usize, h: Arc<State>) -> (StepMsg, Reply) {
        let ops = install.iter().enumerate().map(|(slot, &id)| SlotOp::Install { slot, id: ProbeId(id) }).collect();
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

    fn want(pack: &Pack, id: u32, h: &State) -> u32 {
        let h = h.host().unwrap();
        let b = pack.read_probe(ProbeId(id)).unwrap();
        let ranges = pack.layout().ranges(&pack.tensor_offsets(ProbeId(id)));
        reference_logit(&ProbeRef { bytes: &b, ranges: &ranges }, pack.layout().dtype, h).to_bits()
    }

    fn logits(rx: Reply) -> Result<Vec<u32>, ScoringError> {
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
        let backend = Box::new(KernelBackend::new(pack.clone(), kernel, "test"));
        Steps::new(pack.clone(), backend, Duration::ZERO, Faults::none()).run(rx);
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
        assert!(matches!(err, ScoringError::EmptySlot(1)), "{err}");
        assert_eq!(stats.sessions, 1);
    }

    #[test]
    fn a_failed_rearrangement_poisons_its_session_and_no_other() {
        let setup = setup();
        let pack = setup.pack.clone();
        let h = hidden(&pack, 0.5);
        let rearrange = |s, ops| {
            StepMsg::Work(Work {
                session: SessionId(s),
                ops,
                bytes: HashMap::new(),
                start: 0,
                len: 0,
                hidden: Arc::new(State::Host(Vec::new())),
                reply: None,
                span: tracing::Span::none(),
            })
        };
        let (w1, r1) = work(1, &pack, &[3], 1, h.clone());
        let (w2, r2) = work(2, &pack, &[3], 1, h.clone());
        // Slot 99 does not exist: session 1's pruning fails on the scheduler, after the tell.
        let (w1b, r1b) = work(1, &pack, &[], 1, h.clone());
        let (w1c, r1c) = work(1, &pack, &[], 1, h.clone());
        let (w2b, r2b) = work(2, &pack, &[], 1, h.clone());
        let msgs = vec![
            StepMsg::Open { session: SessionId(1), slots: 2 },
            StepMsg::Open { session: SessionId(2), slots: 2 },
            w1,
            w2,
            rearrange(1, vec![SlotOp::Move { from: 99, to: 0 }]),
            w1b,
            w1c,
            w2b,
        ];
        serve(&pack, msgs);
        assert_eq!(logits(r1).unwrap(), [want(&pack, 3, &h)]);
        assert_eq!(logits(r2).unwrap(), [want(&pack, 3, &h)]);
        for r in [r1b, r1c] {
            match logits(r) {
                Err(ScoringError::Poisoned(cause)) => {
                    assert!(matches!(*cause, ScoringError::NoSlot { slot: 99, slots: 2 }), "{cause}")
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(logits(r2b).unwrap(), [want(&pack, 3, &h)], "session 2 is untouched");
    }
}
