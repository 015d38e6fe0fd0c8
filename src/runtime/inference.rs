//! Inference: owns every tensor (a `Tensor` is `Send` but not `Sync`), on its own OS thread.
//!
//! The arena is allocated once: stacked weights `[S,128,D]`, `[S,64,128]`, `[S,1,64]` and
//! biases `[S,128,1]`, `[S,64,1]`, `[S,1,1]` in the compute dtype on the device, plus one
//! scratch slot for swaps. Scoring runs `batched_logits` on `narrow()` views of a contiguous slot
//! range: no copy, one call for every probe. Installing converts the probe's stored dtype
//! (bf16 or f32) to the compute dtype inside `copy_`.

use std::collections::HashMap;
use std::sync::Arc;

use kameo::error::Infallible;
use kameo::message::{Context, Message};
use kameo::Actor;
use tch::{Device, Kind, Tensor};

use super::cache::ProbeBytes;
use super::pool::SlotOp;
use crate::engine::tensors::{batched_logits, hidden_column, kind_of, to_host_f32};
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

pub struct Inference {
    pack: Arc<Pack>,
    device: Device,
    compute: Kind,
    arena: Arena,
    scratch: usize,
}

impl Inference {
    pub fn new(pack: Arc<Pack>, slots: usize, device: Device, compute: Kind) -> Result<Self, tch::TchError> {
        let arena = tch::no_grad(|| Arena::new(slots as i64 + 1, pack.hidden_dim() as i64, device, compute))?;
        Ok(Self { pack, device, compute, arena, scratch: slots })
    }

    /// Copies a probe's bytes into a slot (converting to the compute dtype).
    pub fn install(&mut self, slot: usize, id: ConceptId, bytes: &[u8]) -> Result<(), tch::TchError> {
        let layout = self.pack.layout();
        let ranges = layout.ranges(&self.pack.tensor_offsets(id));
        let storage = kind_of(layout.dtype);
        for (part, range) in self.arena.parts().into_iter().zip(ranges) {
            let mut dst = part.f_get(slot as i64)?;
            let shape = dst.size();
            let src = &bytes[range];
            // A borrowed view of the cache's bytes: no allocation and no copy before `copy_`,
            // which converts the dtype and moves the data to the device in one pass.
            // SAFETY: `src` holds exactly numel(shape) elements of `storage` (the pack checked
            // lengths at open and the CRC at read), it outlives `view`, which is dropped at the
            // end of this iteration, and the probe's tensor offsets are multiples of the
            // element size within an allocation aligned for it.
            debug_assert_eq!(src.len() as i64, shape.iter().product::<i64>() * storage.elt_size_in_bytes() as i64);
            let view = unsafe { Tensor::f_from_blob(src.as_ptr(), &shape, &[], storage, Device::Cpu)? };
            dst.f_copy_(&view)?;
        }
        Ok(())
    }

    fn copy_slot(&self, from: usize, to: usize) -> Result<(), tch::TchError> {
        for part in self.arena.parts() {
            part.f_get(to as i64)?.f_copy_(&part.f_get(from as i64)?)?;
        }
        Ok(())
    }

    fn apply(&mut self, ops: &[SlotOp], bytes: &HashMap<ConceptId, Arc<ProbeBytes>>) -> Result<(), InferenceError> {
        tch::no_grad(|| {
            for op in ops {
                match *op {
                    SlotOp::Install { slot, id } => {
                        let b = bytes.get(&id).ok_or(InferenceError::MissingBytes(id))?;
                        self.install(slot, id, b)?;
                    }
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
        self.apply(&m.ops, &m.bytes)?;
        // Drop the byte references now: the cache may evict (and recycle) them from here on.
        drop(m.bytes);
        let t = std::time::Instant::now();
        let logits = self.score(m.start, m.len, &m.hidden)?;
        Ok(Scores { logits, scoring: t.elapsed() })
    }
}
