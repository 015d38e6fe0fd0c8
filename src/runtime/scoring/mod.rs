//! Scoring backends: what the step scheduler ([`super::steps`]) calls to move a session's
//! probes into its slots and to score a step. One file per backend:
//!
//! - [`kernel`]: the CPU kernel, scoring probes where they lie in the weight cache (a slot is
//!   a reference to a cache entry; nothing is copied);
//! - [`torch`]: one tch resident store shared by every session (an accelerator's memory, or
//!   the CPU with `device.cpu_kernel = "torch"`): a probe is copied into a row once and a slot
//!   pins its row; [`store`] keeps the rows' books (pins, warm LRU, the budget), and
//!   [`graphs`] replays its sparse rounds as CUDA graphs (the `cuda-graphs` feature).
//!
//! Why a trait: the scheduler's batching, fairness and close ordering are the same whatever
//! scores, and before this trait they were interleaved with five two-variant enums that could
//! disagree. Each backend owns its sessions' slot tables, so a slot operation can only meet the
//! slots of its own backend. The trait is small on purpose: open and close a session's slots,
//! apply its slot operations, score a step, and say what it holds.

pub mod graphs;
pub mod kernel;
pub mod store;
pub mod torch;

use std::collections::HashMap;
use std::sync::Arc;

use super::cache::ProbeBytes;
use super::faults::{Faults, PanicSite};
use super::pool::SlotOp;
use crate::kernel::KernelError;
use crate::pack::ProbeId;
use crate::types::{Hidden, SessionId, WeightTraffic};

/// One session's request in a step: the logits of its slots `[start, start + len)` for `hidden`.
pub struct Request<'a> {
    pub session: SessionId,
    pub start: usize,
    pub len: usize,
    pub hidden: &'a State,
}

/// One hidden state as a step scores it: checked and normalized, float32, in host memory or,
/// when the caller handed a tensor over on the resident store's device, there (see
/// `engine::check_tensor`): the store then reads it where it lies.
pub enum State {
    Host(Vec<f32>),
    Device(DeviceState),
}

/// A checked, normalized `[D]` float32 tensor on the store's device, and the caller's tensor it
/// came from, kept until the token is answered: by then every round that read either has been
/// read back, so the caller's allocator cannot reuse the memory under a running kernel.
pub struct DeviceState {
    pub x: tch::Tensor,
    _source: Hidden,
}

impl DeviceState {
    pub fn new(x: tch::Tensor, source: Hidden) -> Self {
        Self { x, _source: source }
    }
}

// SAFETY: the tensor is only read (libtorch's const operations, as every backend reads a
// state) from the threads that share it, and the source is never touched until it is dropped.
unsafe impl Sync for DeviceState {}

impl State {
    /// The values in host memory; `None` for a state on a device.
    pub fn host(&self) -> Option<&[f32]> {
        match self {
            State::Host(v) => Some(v),
            State::Device(_) => None,
        }
    }

    /// The tensor of a state on a device.
    pub fn device(&self) -> Option<&tch::Tensor> {
        match self {
            State::Host(_) => None,
            State::Device(d) => Some(&d.x),
        }
    }
}

impl From<Vec<f32>> for State {
    fn from(v: Vec<f32>) -> Self {
        State::Host(v)
    }
}

/// What a step's scoring gave: each request's logits in its slot order (or that request's own
/// error: an empty slot, a closed session), and the step's figures.
pub struct StepScores {
    pub answers: Vec<Result<Vec<f32>, ScoringError>>,
    /// Distinct probes scored (each read once).
    pub union: usize,
    /// Probe × hidden-state logits computed.
    pub logits: usize,
}

/// What a backend's slot tables hold now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Sessions with a slot table.
    pub sessions: usize,
    /// Distinct probes in any session's slots (each resident once).
    pub probes: usize,
    /// References the sessions hold to them (a probe in k sessions counts k times).
    pub refs: usize,
}

/// A scoring backend. It runs on the step scheduler's thread, which owns it.
pub trait ScoringBackend: Send {
    /// The scoring path, for stats and `run`'s summary (`avx512f`, `torch store (device)`).
    fn path(&self) -> &'static str;
    /// Gives a session an empty table of `slots` slots.
    fn open(&mut self, session: SessionId, slots: usize);
    /// Frees a session's slots (what only it held is released).
    fn close(&mut self, session: SessionId);
    /// Applies a session's slot operations in order, taking installed probes from `bytes`. On
    /// an error the session's slots are no longer what its coordinator believes.
    fn apply(
        &mut self,
        session: SessionId,
        ops: &[SlotOp],
        bytes: &HashMap<ProbeId, Arc<ProbeBytes>>,
    ) -> Result<(), ScoringError>;
    /// Scores a step: the union of the requests' probes, each once. A request whose slots do
    /// not resolve gets its own error in `answers`; an `Err` means the step's scoring failed as
    /// a whole (the slots are untouched by scoring, so the requests may be tried again alone).
    fn score(&mut self, step: &[Request], faults: &Faults) -> Result<StepScores, ScoringError>;
    fn holdings(&self) -> Holdings;
    /// Copies probes that may be activated soon into a resident store, where it has one and
    /// there is room that no pinned probe holds (free rows, or warm ones evicted). Best effort:
    /// a failure only leaves them out.
    fn warm(&mut self, _bytes: &HashMap<ProbeId, Arc<ProbeBytes>>) {}
    /// Installs and moves so far, the weight bytes they copied, and the resident store's
    /// figures where the backend keeps one.
    fn traffic(&self) -> WeightTraffic;
}

/// Why a step or a session's slots could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum ScoringError {
    #[error("tensor math failed: {0}")]
    Tch(#[source] Arc<tch::TchError>),
    #[error("no bytes were sent for probe {0:?}")]
    MissingBytes(ProbeId),
    /// An earlier operation on the session's slots failed (pruning's rearrangement, which
    /// nobody waited on): its slots can't be trusted, and every later request says why.
    #[error("an earlier slot rearrangement (pruning) failed, so the slots cannot be trusted: {0}")]
    Poisoned(#[source] Arc<ScoringError>),
    #[error("slot {slot} does not exist (the pool has {slots})")]
    NoSlot { slot: usize, slots: usize },
    /// Probes the coordinator saw resident (and sent no bytes for) were evicted before its
    /// request arrived; nothing was applied, and it asks again with their bytes.
    #[error("probes {0:?} were evicted from the resident store before their install")]
    Evicted(Vec<ProbeId>),
    #[error(transparent)]
    StoreFull(#[from] store::StoreFull),
    /// Copying probes into the resident store failed; none of them became resident.
    #[error("copying {} into the resident store failed", .concepts.join(", "))]
    Upload {
        /// The probes' concepts (`name@layer`).
        concepts: Vec<String>,
        #[source]
        source: Box<ScoringError>,
    },
    #[error("slot {0} holds no probe but was asked to score")]
    EmptySlot(usize),
    #[error("the CPU kernel: {0}")]
    Kernel(#[source] KernelError),
    /// The step's scoring panicked; the slots were applied before it and are intact.
    #[error("the scoring step failed: the kernel panicked: {0}")]
    Panicked(String),
    /// A failure injected by a fault plan (tests only).
    #[error("the scoring step failed: injected fault at probe {}", .0 .0)]
    Injected(ProbeId),
    /// A failed copy into the resident store, injected by a fault plan (tests only).
    #[error("injected fault: the copy of probe {} to the device failed", .0 .0)]
    InjectedUpload(ProbeId),
    #[error("{0} is closed")]
    Closed(SessionId),
    /// The C++ shim over ATen/cuda (the `cuda-graphs` feature) failed.
    #[cfg(feature = "cuda-graphs")]
    #[error(transparent)]
    Shim(graphs::GraphError),
    /// A hidden state that lies on a device reached a backend that reads host memory (the
    /// coordinator keeps states on a device only for the resident store of that device).
    #[error("the hidden state lies on {device}, but {path} reads host memory")]
    NotOnHost { device: String, path: &'static str },
}

impl ScoringError {
    /// Whether a request's slot operations were refused as a whole, before the session's slots
    /// changed: they are still what its coordinator had before the request.
    pub fn refused_before_applying(&self) -> bool {
        matches!(self, ScoringError::Evicted(_) | ScoringError::StoreFull(_) | ScoringError::Upload { .. })
    }
}

impl From<tch::TchError> for ScoringError {
    fn from(e: tch::TchError) -> Self {
        ScoringError::Tch(Arc::new(e))
    }
}

impl From<KernelError> for ScoringError {
    fn from(e: KernelError) -> Self {
        ScoringError::Kernel(e)
    }
}

/// The fault plan's say on a step scoring `probes`: an injected panic, or an injected failure.
fn check_faults(faults: &Faults, probes: impl Iterator<Item = ProbeId> + Clone) -> Result<(), ScoringError> {
    faults.maybe_panic(PanicSite::Scoring, probes.clone());
    match faults.step_fails(probes) {
        Some(p) => Err(ScoringError::Injected(p)),
        None => Ok(()),
    }
}

/// The slot range `[start, start + len)` of a table of `slots`, or the error naming the slot.
fn range(start: usize, len: usize, slots: usize) -> Result<std::ops::Range<usize>, ScoringError> {
    if start + len > slots {
        return Err(ScoringError::NoSlot { slot: (start + len).saturating_sub(1), slots });
    }
    Ok(start..start + len)
}

/// A session's slot table: what each slot holds (`H`: a cache entry, a pin of a store row).
/// Installs are the backend's own; moves and swaps only move references, here, for both.
pub struct SlotTable<H> {
    slots: Vec<Option<H>>,
}

impl<H> SlotTable<H> {
    pub fn new(slots: usize) -> Self {
        Self { slots: (0..slots).map(|_| None).collect() }
    }

    /// Applies `ops` in order: `install(id)` gives what an install puts in its slot; a move
    /// hands its reference on (the source becomes empty), a swap exchanges two. Counts the
    /// moves and swaps in `traffic` (installs are the backend's to count).
    pub fn apply(
        &mut self,
        ops: &[SlotOp],
        traffic: &mut WeightTraffic,
        mut install: impl FnMut(ProbeId) -> Result<H, ScoringError>,
    ) -> Result<(), ScoringError> {
        let n = self.slots.len();
        let check = |slot: usize| if slot < n { Ok(slot) } else { Err(ScoringError::NoSlot { slot, slots: n }) };
        for op in ops {
            match *op {
                SlotOp::Install { slot, id } => {
                    let slot = check(slot)?;
                    self.slots[slot] = Some(install(id)?);
                }
                SlotOp::Move { from, to } => {
                    let held = self.slots[check(from)?].take();
                    self.slots[check(to)?] = held;
                    traffic.moves += 1;
                }
                SlotOp::Swap { a, b } => {
                    self.slots.swap(check(a)?, check(b)?);
                    traffic.moves += 1;
                }
            }
        }
        Ok(())
    }

    /// What slots `[start, start + len)` hold; an empty one is an error, never stale data.
    pub fn held(&self, start: usize, len: usize) -> Result<Vec<&H>, ScoringError> {
        let range = range(start, len, self.slots.len())?;
        self.slots[range]
            .iter()
            .enumerate()
            .map(|(i, h)| h.as_ref().ok_or(ScoringError::EmptySlot(start + i)))
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &H> {
        self.slots.iter().flatten()
    }
}

/// A backend's open sessions and their slot tables: what both backends keep per session, and
/// the look-ups a step makes in them.
pub struct Tables<H> {
    sessions: HashMap<SessionId, SlotTable<H>>,
}

impl<H> Default for Tables<H> {
    fn default() -> Self {
        Self { sessions: HashMap::new() }
    }
}

impl<H> Tables<H> {
    pub fn open(&mut self, session: SessionId, slots: usize) {
        self.sessions.insert(session, SlotTable::new(slots));
    }

    pub fn close(&mut self, session: SessionId) {
        self.sessions.remove(&session);
    }

    /// The session's table, to apply its slot operations to.
    pub fn get_mut(&mut self, session: SessionId) -> Result<&mut SlotTable<H>, ScoringError> {
        self.sessions.get_mut(&session).ok_or(ScoringError::Closed(session))
    }

    /// What the request's slots hold: its own error if the session is closed or a slot empty.
    pub fn held(&self, r: &Request) -> Result<Vec<&H>, ScoringError> {
        self.sessions.get(&r.session).ok_or(ScoringError::Closed(r.session))?.held(r.start, r.len)
    }

    /// Distinct probes held (keyed by `key`: a cache entry's id, a physical slot) and references.
    pub fn holdings<K: std::hash::Hash + Eq>(&self, key: impl Fn(&H) -> K) -> Holdings {
        let mut held: HashMap<K, usize> = HashMap::new();
        for k in self.sessions.values().flat_map(|t| t.iter().map(&key)) {
            *held.entry(k).or_default() += 1;
        }
        Holdings { sessions: self.sessions.len(), probes: held.len(), refs: held.values().sum() }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pack::{DType, Pack, ProbeId};
    use crate::synth::{write_synth_pack, SynthParams};

    pub fn synth_pack(dtype: DType) -> (tempfile::TempDir, Arc<Pack>) {
        let dir = tempfile::tempdir().unwrap();
        write_synth_pack(dir.path(), &SynthParams { dtype, ..SynthParams::tiny() }, |_| {}).unwrap();
        let pack = Arc::new(Pack::open(dir.path()).unwrap());
        (dir, pack)
    }

    /// Slot 0 is installed, moved away and reinstalled, two slots swapped. Scoring slots 0..6
    /// then reads probes 11, 19, 7, 23, 42, 3.
    pub fn ops() -> Vec<SlotOp> {
        let install = |slot, id| SlotOp::Install { slot, id: ProbeId(id) };
        vec![
            install(0, 3),
            install(1, 7),
            SlotOp::Move { from: 0, to: 5 },
            install(0, 11),
            install(2, 19),
            SlotOp::Swap { a: 1, b: 2 },
            install(3, 23),
            install(4, 42),
        ]
    }

    /// The bytes of every probe `ops` installs, as the cache would hand them over.
    pub fn bytes_for(pack: &Pack, ops: &[SlotOp]) -> HashMap<ProbeId, Arc<ProbeBytes>> {
        ops.iter()
            .filter_map(SlotOp::installed)
            .map(|id| (id, Arc::new(ProbeBytes::detached(id, pack.read_probe(id).unwrap()))))
            .collect()
    }
}
