//! Inference: scores the active probes, on its own OS thread. It has two backends.
//!
//! **The CPU kernel** ([`crate::kernel`]): a slot holds a reference to the probe's bytes in the
//! weight cache, which keeps them (pinned) while the slot does. Scoring reads them where they
//! lie, in their stored dtype; installing a probe and every slot move or swap of pruning only
//! move references. No weight byte is copied.
//!
//! **The tch arena** (accelerators, or the CPU when `device.cpu_kernel = "torch"`); it owns
//! every tensor (a `Tensor` is `Send` but not `Sync`). The arena is allocated once: stacked weights `[S,128,D]`, `[S,64,128]`, `[S,1,64]` and
//! biases `[S,128,1]`, `[S,64,1]`, `[S,1,1]` in the compute dtype on the device, plus one
//! scratch slot for swaps. Scoring runs `batched_logits` on `narrow()` views of a contiguous slot
//! range: no copy, one call for every probe. Installing converts the probe's stored dtype
//! (bf16 or f32) to the compute dtype inside `copy_`.
//!
//! How installs reach the arena depends on the device ([`Uploads`]): on the CPU each tensor is
//! copied straight from the cache's bytes; on an accelerator the round's installs are packed into
//! one pinned host buffer and sent in one host-to-device transfer, then scattered on the device,
//! because per-tensor transfers would pay the launch and synchronization cost six times a probe.

use std::collections::HashMap;
use std::sync::Arc;

use kameo::error::Infallible;
use kameo::message::{Context, Message};
use kameo::Actor;
use tch::{Device, Kind, Tensor};

use super::cache::ProbeBytes;
use super::faults::{Faults, PanicSite};
use super::pool::SlotOp;
use crate::config::CpuKernel;
use crate::engine::tensors::{batched_logits, hidden_column, kind_of, to_host_f32, RowSplit};
use crate::kernel::{Isa, Kernel, KernelError, ProbeRef};
use crate::pack::layout::{HIDDEN1, HIDDEN2};
use crate::pack::{ConceptId, Pack};

struct Arena {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
}

impl Arena {
    fn new(slots: i64, d: i64, device: Device, kind: Kind) -> Result<Self, tch::TchError> {
        // Uninitialized: a slot is only read after something was installed or moved into it,
        // and untouched pages of a large arena then cost no memory.
        let z = |shape: &[i64]| Tensor::f_empty(shape, (kind, device));
        let (h1, h2) = (HIDDEN1 as i64, HIDDEN2 as i64);
        Ok(Self {
            w1: z(&[slots, h1, d])?,
            b1: z(&[slots, h1, 1])?,
            w2: z(&[slots, h2, h1])?,
            b2: z(&[slots, h2, 1])?,
            w3: z(&[slots, 1, h2])?,
            b3: z(&[slots, 1, 1])?,
        })
    }

    fn parts(&self) -> [&Tensor; 6] {
        // In pack layout order: b1, w1, b2, w2, b3, w3.
        [&self.b1, &self.w1, &self.b2, &self.w2, &self.b3, &self.w3]
    }
}

/// Where installs come from.
enum Uploads {
    /// Straight from the cache's bytes into the slot (the CPU: staging would only add a memcpy).
    Direct,
    /// Through a host buffer and its device twin, one transfer per round (an accelerator).
    Staged(Staging),
}

/// Raw probe bytes, one probe per row, in the pack's storage layout. Both buffers are allocated
/// once; `rows` bounds how many installs share a transfer (more than that take several).
struct Staging {
    host: Tensor,
    device: Tensor,
    rows: usize,
    probe_bytes: usize,
    /// Host-to-device transfers made so far.
    transfers: u64,
}

impl Staging {
    fn new(rows: usize, probe_bytes: usize, device: Device) -> Result<Self, tch::TchError> {
        let shape = [rows as i64, probe_bytes as i64];
        let mut host = Tensor::f_empty(shape, (Kind::Uint8, Device::Cpu))?;
        if device.is_cuda() {
            // Page-locked, so the transfer is one DMA rather than a copy through a bounce buffer.
            host = host.f_pin_memory(device)?;
        }
        let device = Tensor::f_empty(shape, (Kind::Uint8, device))?;
        Ok(Self { host, device, rows, probe_bytes, transfers: 0 })
    }

    /// Packs `probes` into the first rows of the host buffer and sends them in one transfer.
    fn upload(&mut self, probes: &[&[u8]]) -> Result<(), tch::TchError> {
        debug_assert!(probes.len() <= self.rows);
        let base = self.host.data_ptr() as *mut u8;
        for (row, bytes) in probes.iter().enumerate() {
            assert_eq!(bytes.len(), self.probe_bytes, "cache bytes are one probe long");
            // SAFETY: `host` is a contiguous [rows, probe_bytes] u8 tensor that this struct owns,
            // `row < rows`, and `bytes` (a cache entry) cannot overlap it. The previous round's
            // transfer has completed: it was followed by scoring, whose result was read back.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(row * self.probe_bytes), bytes.len()) };
        }
        let n = probes.len() as i64;
        self.device.f_narrow(0, 0, n)?.f_copy_(&self.host.f_narrow(0, 0, n)?)?;
        self.transfers += 1;
        Ok(())
    }
}

pub struct Inference {
    /// Set when a `Rearrange` failed: the slots can no longer be trusted, and every later
    /// request is refused with this reason (nobody waited on the tell to hear it).
    failed: Option<String>,
    pack: Arc<Pack>,
    backend: Backend,
    traffic: WeightTraffic,
    faults: Faults,
}

enum Backend {
    Kernel(KernelSlots),
    Torch(TorchArena),
}

/// The CPU kernel and one stream's slots.
struct KernelSlots {
    kernel: Kernel,
    slots: SlotRefs,
}

/// The CPU kernel's slots: references into the cache, and where each probe's tensors lie.
/// One per stream: the `Cascade`'s inference thread holds one, the sessions' step scheduler
/// one per session.
pub(super) struct SlotRefs {
    slots: Vec<Option<Held>>,
}

pub(super) struct Held {
    pub(super) bytes: Arc<ProbeBytes>,
    pub(super) ranges: [std::ops::Range<usize>; 6],
}

impl Held {
    pub(super) fn probe(&self) -> ProbeRef<'_> {
        ProbeRef { bytes: &self.bytes, ranges: &self.ranges }
    }
}

pub(super) struct TorchArena {
    device: Device,
    compute: Kind,
    arena: Arena,
    scratch: usize,
    uploads: Uploads,
    split: RowSplit,
}

/// How the inference thread is set up.
#[derive(Debug, Clone)]
pub struct InferenceSettings {
    pub slots: usize,
    pub device: Device,
    pub compute: Kind,
    /// Where the device is not the CPU: bounds the upload buffers (one probe at least).
    pub staging_bytes: u64,
    /// CPU threads for scoring (the kernel's pool, or the arena's row blocks).
    pub math_threads: usize,
    pub cpu_kernel: CpuKernel,
}

impl Inference {
    /// On the CPU the kernel (or, with `CpuKernel::Torch`, the tch arena with its copies in
    /// `math_threads` row blocks, see [`RowSplit`]); elsewhere the tch arena with staged uploads.
    pub fn new(pack: Arc<Pack>, settings: &InferenceSettings) -> Result<Self, InferenceError> {
        let s = settings;
        match (s.device, s.cpu_kernel) {
            (Device::Cpu, CpuKernel::Torch) => {
                Ok(Self::with_uploads(pack, s.slots, s.device, s.compute, None, RowSplit::new(s.math_threads))?)
            }
            (Device::Cpu, kernel) => {
                let isa = kernel.isa().unwrap_or_else(Isa::best);
                let kernel = Kernel::new(&pack.layout(), isa, s.math_threads)
                    .map_err(|e| InferenceError::Setup(format!("device.cpu_kernel = \"{kernel}\": {e}")))?;
                let backend = Backend::Kernel(KernelSlots { kernel, slots: SlotRefs::new(s.slots) });
                Ok(Self {
                    failed: None,
                    pack,
                    backend,
                    traffic: WeightTraffic::new(isa.name()),
                    faults: Faults::none(),
                })
            }
            _ => Ok(Self::with_uploads(pack, s.slots, s.device, s.compute, Some(s.staging_bytes), RowSplit::none())?),
        }
    }

    /// The tch arena. `staging_bytes: None` installs directly; `Some` stages uploads on any
    /// device (tests use it to run the accelerator path on the CPU).
    pub fn with_uploads(
        pack: Arc<Pack>,
        slots: usize,
        device: Device,
        compute: Kind,
        staging_bytes: Option<u64>,
        split: RowSplit,
    ) -> Result<Self, tch::TchError> {
        let torch = TorchArena::new(&pack, slots, device, compute, staging_bytes, split)?;
        let path = torch.path();
        Ok(Self {
            failed: None,
            pack,
            backend: Backend::Torch(torch),
            traffic: WeightTraffic::new(path),
            faults: Faults::none(),
        })
    }

    /// Injects `faults` (tests only).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Weight bytes copied so far, and the scoring path.
    pub fn traffic(&self) -> &WeightTraffic {
        &self.traffic
    }

    /// Host-to-device transfers made by staged uploads (0 when installs are direct).
    pub fn transfers(&self) -> u64 {
        match &self.backend {
            Backend::Torch(TorchArena { uploads: Uploads::Staged(s), .. }) => s.transfers,
            _ => 0,
        }
    }

    /// The tch arena: copies a probe's bytes into a slot (converting to the compute dtype).
    /// An error on the kernel backend, which copies nothing.
    pub fn install(&mut self, slot: usize, id: ConceptId, bytes: &[u8]) -> Result<(), InferenceError> {
        let Backend::Torch(torch) = &self.backend else {
            return Err(InferenceError::Setup("the CPU kernel installs references, not bytes".into()));
        };
        torch.install(&self.pack, slot, id, bytes)?;
        self.traffic.copied(bytes.len());
        Ok(())
    }

    fn apply(&mut self, ops: &[SlotOp], bytes: &HashMap<ConceptId, Arc<ProbeBytes>>) -> Result<(), InferenceError> {
        match &mut self.backend {
            Backend::Kernel(k) => k.slots.apply(&self.pack, ops, bytes, &mut self.traffic),
            Backend::Torch(t) => t.apply(&self.pack, ops, bytes, &mut self.traffic),
        }
    }

    /// Logits of slots `[start, start + len)`.
    pub fn score(&self, start: usize, len: usize, hidden: &[f32]) -> Result<Vec<f32>, InferenceError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        match &self.backend {
            Backend::Kernel(k) => k.score(start, len, hidden),
            Backend::Torch(t) => Ok(t.score(start, len, hidden)?),
        }
    }
}

impl SlotRefs {
    pub(super) fn new(slots: usize) -> Self {
        Self { slots: (0..slots).map(|_| None).collect() }
    }

    /// Moves references: an install takes the cache's `Arc` (pinning the bytes there), a move
    /// hands the reference on (on the CPU nothing is kept warm, so a move's source is freed),
    /// a swap exchanges two.
    pub(super) fn apply(
        &mut self,
        pack: &Pack,
        ops: &[SlotOp],
        bytes: &HashMap<ConceptId, Arc<ProbeBytes>>,
        traffic: &mut WeightTraffic,
    ) -> Result<(), InferenceError> {
        let n = self.slots.len();
        let check = |slot: usize| if slot < n { Ok(slot) } else { Err(InferenceError::NoSlot { slot, slots: n }) };
        for op in ops {
            match *op {
                SlotOp::Install { slot, id } => {
                    let b = bytes.get(&id).ok_or(InferenceError::MissingBytes(id))?;
                    let ranges = pack.layout().ranges(&pack.tensor_offsets(id));
                    self.slots[check(slot)?] = Some(Held { bytes: b.clone(), ranges });
                    traffic.installs += 1;
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

    /// The probes in slots `[start, start + len)`.
    pub(super) fn held(&self, start: usize, len: usize) -> Result<Vec<&Held>, InferenceError> {
        let n = self.slots.len();
        let held = self
            .slots
            .get(start..start + len)
            .ok_or(InferenceError::NoSlot { slot: (start + len).saturating_sub(1), slots: n })?;
        held.iter().enumerate().map(|(i, h)| h.as_ref().ok_or(InferenceError::EmptySlot(start + i))).collect()
    }

    /// Distinct probes held.
    pub(super) fn ids(&self) -> impl Iterator<Item = ConceptId> + '_ {
        self.slots.iter().flatten().map(|h| h.bytes.id)
    }
}

impl KernelSlots {
    fn score(&self, start: usize, len: usize, hidden: &[f32]) -> Result<Vec<f32>, InferenceError> {
        let probes: Vec<ProbeRef> = self.slots.held(start, len)?.into_iter().map(Held::probe).collect();
        let mut logits = vec![0.0; len];
        self.kernel.score(&probes, &[hidden], &mut logits)?;
        Ok(logits)
    }
}

impl TorchArena {
    /// `slots` slots (plus one scratch slot for swaps) on `device`; `staging_bytes: None`
    /// installs directly, `Some` stages uploads through a pinned buffer.
    pub(super) fn new(
        pack: &Pack,
        slots: usize,
        device: Device,
        compute: Kind,
        staging_bytes: Option<u64>,
        split: RowSplit,
    ) -> Result<Self, tch::TchError> {
        tch::no_grad(|| {
            let arena = Arena::new(slots as i64 + 1, pack.hidden_dim() as i64, device, compute)?;
            let uploads = match staging_bytes {
                None => Uploads::Direct,
                Some(budget) => {
                    let probe_bytes = pack.layout().byte_len();
                    let rows = (budget / probe_bytes as u64).clamp(1, slots as u64) as usize;
                    Uploads::Staged(Staging::new(rows, probe_bytes, device)?)
                }
            };
            Ok(TorchArena { device, compute, arena, scratch: slots, uploads, split })
        })
    }

    pub(super) fn path(&self) -> &'static str {
        if self.device == Device::Cpu {
            "torch arena (cpu)"
        } else {
            "torch arena (device)"
        }
    }

    /// Logits of the probes in `slots` (any slots, in any order) for each of `hidden`:
    /// `out[i * B + b]`. The slots' weights are gathered on the device (one `index_select`
    /// per tensor) and scored against all B hidden states as one `[D, B]` matrix.
    pub(super) fn score_slots(&self, slots: &[usize], hidden: &[&[f32]]) -> Result<Vec<f32>, tch::TchError> {
        tch::no_grad(|| {
            let a = &self.arena;
            let (n, b) = (slots.len() as i64, hidden.len() as i64);
            let d = a.w1.size()[2];
            let idx: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
            let idx = Tensor::f_from_slice(&idx)?.f_to_device(self.device)?;
            let g = |t: &Tensor| t.f_index_select(0, &idx);
            let flat: Vec<f32> = hidden.iter().flat_map(|h| h.iter().copied()).collect();
            let x = Tensor::f_from_slice(&flat)?
                .f_view([b, d])?
                .f_to_kind(self.compute)?
                .f_to_device(self.device)?
                .f_transpose(0, 1)?;
            let a1 = g(&a.w1)?.f_view([n * HIDDEN1 as i64, d])?.f_matmul(&x)?;
            let a1 = (a1 + g(&a.b1)?.f_view([n * HIDDEN1 as i64, 1])?).f_relu()?.f_view([n, HIDDEN1 as i64, b])?;
            let a2 = g(&a.b2)?.f_baddbmm(&g(&a.w2)?, &a1, 1, 1)?.f_relu()?;
            let logits = g(&a.b3)?.f_baddbmm(&g(&a.w3)?, &a2, 1, 1)?.f_view([-1])?;
            to_host_f32(&logits)
        })
    }

    /// Copies a probe's bytes into a slot (converting to the compute dtype).
    fn install(&self, pack: &Pack, slot: usize, id: ConceptId, bytes: &[u8]) -> Result<(), tch::TchError> {
        let storage = kind_of(pack.layout().dtype);
        self.install_with(pack, slot, id, |range, shape| {
            let src = &bytes[range];
            // A borrowed view of the cache's bytes: no allocation and no copy before `copy_`,
            // which converts the dtype and moves the data to the device in one pass.
            // SAFETY: `src` holds exactly numel(shape) elements of `storage` (the pack checked
            // lengths at open and the CRC at read), it outlives the view, which `install_with`
            // only reads until its copy returns (helpers included), and the probe's tensor
            // offsets are multiples of the element size within an allocation aligned for it.
            debug_assert_eq!(src.len() as i64, shape.iter().product::<i64>() * storage.elt_size_in_bytes() as i64);
            unsafe { Tensor::f_from_blob(src.as_ptr(), shape, &[], storage, Device::Cpu) }
        })
    }

    /// Copies row `row` of the device staging buffer into a slot (converting to the compute dtype).
    fn install_staged(
        &self,
        pack: &Pack,
        slot: usize,
        id: ConceptId,
        staged: &Tensor,
        row: usize,
    ) -> Result<(), tch::TchError> {
        let storage = kind_of(pack.layout().dtype);
        let row = staged.f_get(row as i64)?;
        self.install_with(pack, slot, id, |range, shape| {
            // Reinterpreting bytes needs an element-aligned offset: probe rows are whole probes
            // and tensor offsets are multiples of the element size (checked at pack open).
            row.f_narrow(0, range.start as i64, range.len() as i64)?.f_view_dtype(storage)?.f_view(shape)
        })
    }

    /// Copies each of probe `id`'s six tensors into `slot`; `source(byte range, shape)` gives
    /// a view of one tensor's stored bytes.
    fn install_with(
        &self,
        pack: &Pack,
        slot: usize,
        id: ConceptId,
        source: impl Fn(std::ops::Range<usize>, &[i64]) -> Result<Tensor, tch::TchError>,
    ) -> Result<(), tch::TchError> {
        let ranges = pack.layout().ranges(&pack.tensor_offsets(id));
        for (part, range) in self.arena.parts().into_iter().zip(ranges) {
            let dst = part.f_get(slot as i64)?;
            self.split.copy(&dst, &source(range, &dst.size())?)?;
        }
        Ok(())
    }

    fn copy_slot(&self, from: usize, to: usize) -> Result<(), tch::TchError> {
        for part in self.arena.parts() {
            self.split.copy(&part.f_get(to as i64)?, &part.f_get(from as i64)?)?;
        }
        Ok(())
    }

    pub(super) fn apply(
        &mut self,
        pack: &Pack,
        ops: &[SlotOp],
        bytes: &HashMap<ConceptId, Arc<ProbeBytes>>,
        traffic: &mut WeightTraffic,
    ) -> Result<(), InferenceError> {
        let bytes_of = |id| bytes.get(&id).map(|b| &b[..]).ok_or(InferenceError::MissingBytes(id));
        let probe_bytes = pack.layout().byte_len();
        // Staged: the rows the buffers hold, the device buffer, and the installs in op order.
        let staged: Option<(usize, Tensor, Vec<ConceptId>)> = match &self.uploads {
            Uploads::Direct => None,
            Uploads::Staged(s) => {
                Some((s.rows, s.device.shallow_clone(), ops.iter().filter_map(SlotOp::installed).collect()))
            }
        };
        // Which of the installs the device buffer holds now, and the next one to do.
        let (mut next, mut uploaded) = (0, 0..0);
        tch::no_grad(|| {
            for op in ops {
                match *op {
                    SlotOp::Install { slot, id } => {
                        match &staged {
                            None => self.install(pack, slot, id, bytes_of(id)?)?,
                            Some((rows, device_rows, installs)) => {
                                if !uploaded.contains(&next) {
                                    // Rows are consumed in op order, so moves between installs
                                    // keep their meaning; more installs than rows take another
                                    // transfer.
                                    let end = installs.len().min(next + rows);
                                    let probes = installs[next..end]
                                        .iter()
                                        .map(|&id| bytes_of(id))
                                        .collect::<Result<Vec<_>, _>>()?;
                                    if let Uploads::Staged(staging) = &mut self.uploads {
                                        staging.upload(&probes)?;
                                    }
                                    uploaded = next..end;
                                }
                                self.install_staged(pack, slot, id, device_rows, next - uploaded.start)?;
                                next += 1;
                            }
                        }
                        traffic.copied(probe_bytes);
                    }
                    SlotOp::Move { from, to } => {
                        self.copy_slot(from, to)?;
                        traffic.moved(probe_bytes);
                    }
                    SlotOp::Swap { a, b } => {
                        self.copy_slot(a, self.scratch)?;
                        self.copy_slot(b, a)?;
                        self.copy_slot(self.scratch, b)?;
                        traffic.moved(3 * probe_bytes);
                    }
                }
            }
            Ok(())
        })
    }

    /// Logits of slots `[start, start + len)`.
    fn score(&self, start: usize, len: usize, hidden: &[f32]) -> Result<Vec<f32>, tch::TchError> {
        tch::no_grad(|| {
            let (s, n) = (start as i64, len as i64);
            let a = &self.arena;
            let x = hidden_column(hidden, self.device, self.compute)?;
            let logits = batched_logits(
                &a.w1.f_narrow(0, s, n)?,
                &a.b1.f_narrow(0, s, n)?,
                &a.w2.f_narrow(0, s, n)?,
                &a.b2.f_narrow(0, s, n)?,
                &a.w3.f_narrow(0, s, n)?,
                &a.b3.f_narrow(0, s, n)?,
                &x,
                &self.split,
            )?;
            to_host_f32(&logits)
        })
    }
}

/// Weight bytes copied by installs and slot moves, and how many of each: the CPU kernel's
/// stay at zero bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, kameo::Reply)]
pub struct WeightTraffic {
    /// Which backend scores: the kernel's instruction-set path, or the tch arena.
    pub path: String,
    pub installs: u64,
    pub install_bytes_copied: u64,
    pub moves: u64,
    pub move_bytes_copied: u64,
}

impl WeightTraffic {
    pub(super) fn new(path: &str) -> Self {
        Self { path: path.into(), ..Default::default() }
    }

    fn copied(&mut self, bytes: usize) {
        self.installs += 1;
        self.install_bytes_copied += bytes as u64;
    }

    fn moved(&mut self, bytes: usize) {
        self.moves += 1;
        self.move_bytes_copied += bytes as u64;
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    #[error("tensor math failed: {0}")]
    Tch(String),
    #[error("no bytes were sent for probe {0:?}")]
    MissingBytes(ConceptId),
    #[error("an earlier slot rearrangement (pruning) failed, so the slots cannot be trusted: {0}")]
    EarlierRearrange(String),
    #[error("slot {slot} does not exist (the pool has {slots})")]
    NoSlot { slot: usize, slots: usize },
    #[error("the shared arena's {slots} slots (runtime.pool_slots) are all in use by open sessions")]
    ArenaFull { slots: usize },
    #[error("slot {0} holds no probe but was asked to score")]
    EmptySlot(usize),
    #[error("the CPU kernel: {0}")]
    Kernel(#[from] KernelError),
    /// The step's scoring failed (or panicked); the slots were applied before it and are
    /// intact, so the next token may go on.
    #[error("the scoring step failed: {0}")]
    StepFailed(String),
    #[error("{0}")]
    Setup(String),
}

impl InferenceError {
    /// Whether the slots are as the coordinator believes after this error: the scoring failed,
    /// not a rearrangement. Otherwise the stream's slots can't be trusted any more.
    pub fn leaves_slots_intact(&self) -> bool {
        matches!(self, InferenceError::Kernel(_) | InferenceError::StepFailed(_))
    }
}

impl From<tch::TchError> for InferenceError {
    fn from(e: tch::TchError) -> Self {
        InferenceError::Tch(e.to_string())
    }
}

impl Actor for Inference {
    type Args = Self;
    type Error = Infallible;

    async fn on_start(state: Self, _: kameo::actor::ActorRef<Self>) -> Result<Self, Self::Error> {
        // Runs on the inference thread: the tch arena's parallelism comes from the row blocks,
        // and libtorch's own spinning workers would only compete with them for cores.
        if matches!(&state.backend, Backend::Torch(t) if t.split.parts() > 1) {
            RowSplit::single_threaded_torch();
        }
        Ok(state)
    }

    /// A panic may have left the slots half rearranged: the actor goes on, but refuses every
    /// later request with the reason, as after a failed rearrangement (the coordinator then
    /// reports its stream broken, by name, instead of scoring against slots it can't trust).
    async fn on_panic(
        &mut self,
        _: kameo::prelude::WeakActorRef<Self>,
        err: kameo::error::PanicError,
    ) -> Result<std::ops::ControlFlow<kameo::error::ActorStopReason>, Self::Error> {
        tracing::error!("the inference actor panicked: {err}");
        self.failed.get_or_insert_with(|| format!("the inference actor panicked ({err})"));
        Ok(std::ops::ControlFlow::Continue(()))
    }
}

/// Rearrange slots (installing bytes where asked), then score `[start, start + len)`.
pub struct ApplyAndScore {
    pub ops: Vec<SlotOp>,
    pub bytes: HashMap<ConceptId, Arc<ProbeBytes>>,
    pub start: usize,
    pub len: usize,
    pub hidden: Arc<Vec<f32>>,
}

/// Logits of the requested slots, and how long the scoring itself took (the rest of the round
/// trip is installs and moves), for the per-stage breakdown.
#[derive(Debug, kameo::Reply)]
pub struct Scores {
    pub logits: Vec<f32>,
    pub scoring: std::time::Duration,
}

impl Message<ApplyAndScore> for Inference {
    type Reply = Result<Scores, InferenceError>;

    async fn handle(&mut self, m: ApplyAndScore, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        if let Some(why) = &self.failed {
            return Err(InferenceError::EarlierRearrange(why.clone()));
        }
        self.faults.maybe_panic(PanicSite::Scoring, m.ops.iter().filter_map(SlotOp::installed));
        self.apply(&m.ops, &m.bytes)?;
        if let Some(p) = self.faults.step_fails(m.ops.iter().filter_map(SlotOp::installed)) {
            return Err(InferenceError::StepFailed(format!("injected fault at probe {}", p.0)));
        }
        // Drop the byte references now: the cache may evict (and recycle) them from here on.
        drop(m.bytes);
        let t = std::time::Instant::now();
        let logits = self.score(m.start, m.len, &m.hidden)?;
        Ok(Scores { logits, scoring: t.elapsed() })
    }
}

/// Weight bytes copied so far (see [`WeightTraffic`]).
pub struct Traffic;

impl Message<Traffic> for Inference {
    type Reply = WeightTraffic;

    async fn handle(&mut self, _: Traffic, _: &mut Context<Self, Self::Reply>) -> WeightTraffic {
        self.traffic.clone()
    }
}

/// Rearrange slots without installing or scoring: pruning's slot copies, told (not asked)
/// after the token's report is ready, so that they run while the caller computes the next
/// token. Messages are handled in order, so the next request sees them done.
pub struct Rearrange(pub Vec<SlotOp>);

impl Message<Rearrange> for Inference {
    type Reply = ();

    async fn handle(&mut self, Rearrange(ops): Rearrange, _: &mut Context<Self, Self::Reply>) {
        if self.failed.is_none() {
            if let Err(e) = self.apply(&ops, &HashMap::new()) {
                self.failed = Some(e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::DType;
    use crate::synth::{write_synth_pack, SynthParams};

    /// Installs, moves and swaps in one round, through both upload paths.
    fn replay(pack: &Arc<Pack>, staging_bytes: Option<u64>, ops: &[SlotOp], hidden: &[f32]) -> (Vec<f32>, u64) {
        let mut inference =
            Inference::with_uploads(pack.clone(), 8, Device::Cpu, Kind::Float, staging_bytes, RowSplit::none())
                .unwrap();
        let bytes = ops
            .iter()
            .filter_map(SlotOp::installed)
            .map(|id| (id, Arc::new(ProbeBytes::detached(id, pack.read_probe(id).unwrap()))))
            .collect();
        inference.apply(ops, &bytes).unwrap();
        (inference.score(0, 6, hidden).unwrap(), inference.transfers())
    }

    /// Slot 0 is installed, moved away and reinstalled (rows must be used in op order), two
    /// slots swapped. Scoring slots 0..6 then reads probes 11, 19, 7, 23, 42, 3.
    fn ops() -> Vec<SlotOp> {
        let install = |slot, id| SlotOp::Install { slot, id: ConceptId(id) };
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

    fn synth_pack(dtype: DType) -> (tempfile::TempDir, Arc<Pack>) {
        let dir = tempfile::tempdir().unwrap();
        write_synth_pack(dir.path(), &SynthParams { dtype, ..SynthParams::tiny() }, |_| {}).unwrap();
        let pack = Arc::new(Pack::open(dir.path()).unwrap());
        (dir, pack)
    }

    #[test]
    fn staged_uploads_score_like_direct_installs_in_one_transfer_per_round() {
        for dtype in [DType::F32, DType::Bf16] {
            let (_dir, pack) = synth_pack(dtype);
            let ops = ops();
            let hidden: Vec<f32> = (0..pack.hidden_dim()).map(|i| (i as f32 * 0.37).sin()).collect();
            let (direct, none) = replay(&pack, None, &ops, &hidden);
            assert_eq!(none, 0);
            let probe = pack.layout().byte_len() as u64;
            let (staged, transfers) = replay(&pack, Some(64 * probe), &ops, &hidden);
            assert_eq!(staged, direct, "{dtype:?}");
            assert_eq!(transfers, 1, "six installs fit one transfer");
            // Room for two probes: six installs take three transfers and still agree.
            let (chunked, transfers) = replay(&pack, Some(2 * probe), &ops, &hidden);
            assert_eq!(chunked, direct, "{dtype:?}");
            assert_eq!(transfers, 3);
        }
    }

    #[test]
    fn the_cpu_kernel_moves_references_and_scores_them_in_place() {
        for dtype in [DType::F32, DType::Bf16] {
            let (_dir, pack) = synth_pack(dtype);
            let settings = InferenceSettings {
                slots: 8,
                device: Device::Cpu,
                compute: Kind::Float,
                staging_bytes: 0,
                math_threads: 2,
                cpu_kernel: CpuKernel::Auto,
            };
            let mut inference = Inference::new(pack.clone(), &settings).unwrap();
            let ops = ops();
            let bytes: HashMap<ConceptId, Arc<ProbeBytes>> = ops
                .iter()
                .filter_map(SlotOp::installed)
                .map(|id| (id, Arc::new(ProbeBytes::detached(id, pack.read_probe(id).unwrap()))))
                .collect();
            inference.apply(&ops, &bytes).unwrap();
            let hidden: Vec<f32> = (0..pack.hidden_dim()).map(|i| (i as f32 * 0.37).sin()).collect();
            let got = inference.score(0, 6, &hidden).unwrap();
            // Bit for bit what the kernel gives those probes scored directly, in that order.
            let order = [11, 19, 7, 23, 42, 3].map(ConceptId);
            let ranges: Vec<_> = order.iter().map(|&id| pack.layout().ranges(&pack.tensor_offsets(id))).collect();
            let refs: Vec<ProbeRef> =
                order.iter().zip(&ranges).map(|(id, r)| ProbeRef { bytes: &bytes[id], ranges: r }).collect();
            let mut want = vec![0.0; 6];
            Kernel::new(&pack.layout(), Isa::Scalar, 1).unwrap().score(&refs, &[&hidden], &mut want).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{dtype:?}");
            // And within rounding of libtorch's arena on the same ops.
            let (torch, _) = replay(&pack, None, &ops, &hidden);
            for (k, t) in got.iter().zip(&torch) {
                assert!((k - t).abs() <= 1e-4 * (1.0 + t.abs()), "{dtype:?}: kernel {k} vs torch {t}");
            }
            // The slots hold the cache's own buffers: nothing was copied, by installs or moves.
            let t = inference.traffic();
            assert_eq!((t.installs, t.moves, t.install_bytes_copied, t.move_bytes_copied), (6, 2, 0, 0));
            assert_eq!(Arc::strong_count(&bytes[&ConceptId(3)]), 2, "slot 5 pins probe 3's bytes");
            // A slot left empty by a move is an error to score, not stale data.
            assert!(matches!(inference.score(0, 8, &hidden), Err(InferenceError::EmptySlot(6))));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_rearrangement_fails_every_later_request() {
        use kameo::prelude::Spawn;
        let dir = tempfile::tempdir().unwrap();
        write_synth_pack(dir.path(), &SynthParams::tiny(), |_| {}).unwrap();
        let pack = Arc::new(Pack::open(dir.path()).unwrap());
        let settings = InferenceSettings {
            slots: 4,
            device: Device::Cpu,
            compute: Kind::Float,
            staging_bytes: 64 << 20,
            math_threads: 1,
            cpu_kernel: CpuKernel::Auto,
        };
        let inference = Inference::new(pack.clone(), &settings).unwrap();
        let actor = Inference::spawn(inference);
        let score = || ApplyAndScore {
            ops: Vec::new(),
            bytes: HashMap::new(),
            start: 0,
            len: 0,
            hidden: Arc::new(vec![0.0; pack.hidden_dim()]),
        };
        assert!(actor.ask(score()).await.is_ok());
        // Slot 99 does not exist: the copy fails on the inference thread, after the tell.
        actor.tell(Rearrange(vec![SlotOp::Move { from: 99, to: 0 }])).await.unwrap();
        for _ in 0..2 {
            match actor.ask(score()).await {
                Err(kameo::error::SendError::HandlerError(InferenceError::EarlierRearrange(why))) => {
                    assert!(!why.is_empty())
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
