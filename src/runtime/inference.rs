//! Inference: owns every tensor (a `Tensor` is `Send` but not `Sync`), on its own OS thread.
//!
//! The arena is allocated once: stacked weights `[S,128,D]`, `[S,64,128]`, `[S,1,64]` and
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
use super::pool::SlotOp;
use crate::engine::tensors::{batched_logits, hidden_column, kind_of, to_host_f32, RowSplit};
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
    /// Set when a `Rearrange` failed: the arena can no longer be trusted, and every later
    /// request is refused with this reason (nobody waited on the tell to hear it).
    failed: Option<String>,
    pack: Arc<Pack>,
    device: Device,
    compute: Kind,
    arena: Arena,
    scratch: usize,
    uploads: Uploads,
    split: RowSplit,
}

impl Inference {
    /// An arena of `slots` probes. `staging_bytes` bounds the upload buffers where the device is
    /// not the CPU (at least one probe's worth is needed). On the CPU scoring and slot copies
    /// run in `math_threads` row blocks (see [`RowSplit`]).
    pub fn new(
        pack: Arc<Pack>,
        slots: usize,
        device: Device,
        compute: Kind,
        staging_bytes: u64,
        math_threads: usize,
    ) -> Result<Self, tch::TchError> {
        let (staging, split) = match device {
            Device::Cpu => (None, RowSplit::new(math_threads)),
            _ => (Some(staging_bytes), RowSplit::none()),
        };
        Self::with_uploads(pack, slots, device, compute, staging, split)
    }

    /// `staging_bytes: None` installs directly; `Some` stages uploads on any device (tests use it
    /// to run the accelerator path on the CPU).
    fn with_uploads(
        pack: Arc<Pack>,
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
            Ok(Self { failed: None, pack, device, compute, arena, scratch: slots, uploads, split })
        })
    }

    /// Host-to-device transfers made by staged uploads (0 when installs are direct).
    pub fn transfers(&self) -> u64 {
        match &self.uploads {
            Uploads::Direct => 0,
            Uploads::Staged(s) => s.transfers,
        }
    }

    /// Copies a probe's bytes into a slot (converting to the compute dtype).
    pub fn install(&self, slot: usize, id: ConceptId, bytes: &[u8]) -> Result<(), tch::TchError> {
        let storage = kind_of(self.pack.layout().dtype);
        self.install_with(slot, id, |range, shape| {
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
    fn install_staged(&self, slot: usize, id: ConceptId, staged: &Tensor, row: usize) -> Result<(), tch::TchError> {
        let storage = kind_of(self.pack.layout().dtype);
        let row = staged.f_get(row as i64)?;
        self.install_with(slot, id, |range, shape| {
            // Reinterpreting bytes needs an element-aligned offset: probe rows are whole probes
            // and tensor offsets are multiples of the element size (checked at pack open).
            row.f_narrow(0, range.start as i64, range.len() as i64)?.f_view_dtype(storage)?.f_view(shape)
        })
    }

    /// Copies each of probe `id`'s six tensors into `slot`; `source(byte range, shape)` gives
    /// a view of one tensor's stored bytes.
    fn install_with(
        &self,
        slot: usize,
        id: ConceptId,
        source: impl Fn(std::ops::Range<usize>, &[i64]) -> Result<Tensor, tch::TchError>,
    ) -> Result<(), tch::TchError> {
        let ranges = self.pack.layout().ranges(&self.pack.tensor_offsets(id));
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

    fn apply(&mut self, ops: &[SlotOp], bytes: &HashMap<ConceptId, Arc<ProbeBytes>>) -> Result<(), InferenceError> {
        let bytes_of = |id| bytes.get(&id).map(|b| &b[..]).ok_or(InferenceError::MissingBytes(id));
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
                    SlotOp::Install { slot, id } => match &staged {
                        None => self.install(slot, id, bytes_of(id)?)?,
                        Some((rows, device_rows, installs)) => {
                            if !uploaded.contains(&next) {
                                // Rows are consumed in op order, so moves between installs keep
                                // their meaning; more installs than rows take another transfer.
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
                            self.install_staged(slot, id, device_rows, next - uploaded.start)?;
                            next += 1;
                        }
                    },
                    SlotOp::Move { from, to } => self.copy_slot(from, to)?,
                    SlotOp::Swap { a, b } => {
                        self.copy_slot(a, self.scratch)?;
                        self.copy_slot(b, a)?;
                        self.copy_slot(self.scratch, b)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Logits of slots `[start, start + len)`.
    pub fn score(&self, start: usize, len: usize, hidden: &[f32]) -> Result<Vec<f32>, tch::TchError> {
        if len == 0 {
            return Ok(Vec::new());
        }
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

#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    #[error("tensor math failed: {0}")]
    Tch(String),
    #[error("no bytes were sent for probe {0:?}")]
    MissingBytes(ConceptId),
    #[error("an earlier slot rearrangement (pruning) failed, so the arena cannot be trusted: {0}")]
    EarlierRearrange(String),
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
        // Runs on the inference thread: its parallelism comes from the row blocks, and
        // libtorch's own spinning workers would only compete with them for cores.
        if state.split.parts() > 1 {
            RowSplit::single_threaded_torch();
        }
        Ok(state)
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
        self.apply(&m.ops, &m.bytes)?;
        // Drop the byte references now: the cache may evict (and recycle) them from here on.
        drop(m.bytes);
        let t = std::time::Instant::now();
        let logits = self.score(m.start, m.len, &m.hidden)?;
        Ok(Scores { logits, scoring: t.elapsed() })
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

    #[test]
    fn staged_uploads_score_like_direct_installs_in_one_transfer_per_round() {
        for dtype in [DType::F32, DType::Bf16] {
            let dir = tempfile::tempdir().unwrap();
            write_synth_pack(dir.path(), &SynthParams { dtype, ..SynthParams::tiny() }, |_| {}).unwrap();
            let pack = Arc::new(Pack::open(dir.path()).unwrap());
            let install = |slot, id| SlotOp::Install { slot, id: ConceptId(id) };
            // Slot 0 is installed, moved away and reinstalled: rows must be used in op order.
            let ops = [
                install(0, 3),
                install(1, 7),
                SlotOp::Move { from: 0, to: 5 },
                install(0, 11),
                install(2, 19),
                SlotOp::Swap { a: 1, b: 2 },
                install(3, 23),
                install(4, 42),
            ];
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_rearrangement_fails_every_later_request() {
        use kameo::prelude::Spawn;
        let dir = tempfile::tempdir().unwrap();
        write_synth_pack(dir.path(), &SynthParams::tiny(), |_| {}).unwrap();
        let pack = Arc::new(Pack::open(dir.path()).unwrap());
        let inference = Inference::new(pack.clone(), 4, Device::Cpu, Kind::Float, 64 << 20, 1).unwrap();
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
