//! The tch arena backend: one arena on the device (an accelerator's memory, or the CPU with
//! `device.cpu_kernel = "torch"`) shared by every session. It owns every tensor (a `Tensor` is
//! `Send` but not `Sync`), so it lives on the step scheduler's thread.
//!
//! The arena is allocated once: stacked weights `[S,128,D]`, `[S,64,128]`, `[S,1,64]` and
//! biases `[S,128,1]`, `[S,64,1]`, `[S,1,1]` in the compute dtype. A probe used by several
//! sessions sits in one physical slot, reference-counted: a session's slot table holds `Arc`s
//! of physical slots; an install takes the probe's physical slot if any session has it
//! resident, else a free one into which the probe is copied; the slot goes back to the free
//! list when the last session lets go. Moves and swaps (pruning) move references, never
//! weights. A step gathers the union's physical slots (`index_select`) and scores them against
//! all of the step's hidden states as one `[D, B]` matrix.
//!
//! How installs reach the arena depends on the device ([`Uploads`]): on the CPU each tensor is
//! copied straight from the cache's bytes (`copy_` converts bf16 to the compute dtype); on an
//! accelerator a request's installs are packed into one pinned host buffer and sent in one
//! host-to-device transfer, then scattered on the device, because per-tensor transfers would
//! pay the launch and synchronization cost six times a probe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tch::{Device, Kind, Tensor};

use super::{check_faults, Holdings, Request, ScoringBackend, ScoringError, StepScores, Tables};
use crate::engine::tensors::{kind_of, to_host_f32};
use crate::pack::layout::{HIDDEN1, HIDDEN2};
use crate::pack::{ConceptId, Pack};
use crate::runtime::cache::ProbeBytes;
use crate::runtime::faults::Faults;
use crate::runtime::pool::SlotOp;
use crate::types::{SessionId, WeightTraffic};

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
            // `row < rows`, and `bytes` (a cache entry) cannot overlap it. The previous transfer
            // has completed: `copy_` without `non_blocking` returns once the data is across.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(row * self.probe_bytes), bytes.len()) };
        }
        let n = probes.len() as i64;
        self.device.f_narrow(0, 0, n)?.f_copy_(&self.host.f_narrow(0, 0, n)?)?;
        self.transfers += 1;
        Ok(())
    }
}

/// The arena's tensors and how installs reach them.
pub struct TorchArena {
    device: Device,
    compute: Kind,
    arena: Arena,
    uploads: Uploads,
}

impl TorchArena {
    /// `slots` slots on `device`; `staging_bytes: None` installs directly, `Some` stages
    /// uploads through a pinned buffer (tests use it to run the accelerator's path on the CPU).
    pub fn new(
        pack: &Pack,
        slots: usize,
        device: Device,
        compute: Kind,
        staging_bytes: Option<u64>,
    ) -> Result<Self, tch::TchError> {
        tch::no_grad(|| {
            let arena = Arena::new(slots as i64, pack.hidden_dim() as i64, device, compute)?;
            let uploads = match staging_bytes {
                None => Uploads::Direct,
                Some(budget) => {
                    let probe_bytes = pack.layout().byte_len();
                    let rows = (budget / probe_bytes as u64).clamp(1, slots.max(1) as u64) as usize;
                    Uploads::Staged(Staging::new(rows, probe_bytes, device)?)
                }
            };
            Ok(TorchArena { device, compute, arena, uploads })
        })
    }

    pub fn path(&self) -> &'static str {
        if self.device == Device::Cpu {
            "torch arena (cpu)"
        } else {
            "torch arena (device)"
        }
    }

    /// Host-to-device transfers made by staged uploads (0 when installs are direct).
    pub fn transfers(&self) -> u64 {
        match &self.uploads {
            Uploads::Staged(s) => s.transfers,
            Uploads::Direct => 0,
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

    /// Copies each `(physical slot, probe)` of `installs` into the arena, in order. Staged,
    /// they travel in as few transfers as the staging rows allow (one, up to `rows` probes).
    fn upload(
        &mut self,
        pack: &Pack,
        installs: &[(usize, ConceptId)],
        bytes: &HashMap<ConceptId, Arc<ProbeBytes>>,
        traffic: &mut WeightTraffic,
    ) -> Result<(), ScoringError> {
        let bytes_of = |id| bytes.get(&id).map(|b| &b[..]).ok_or(ScoringError::MissingBytes(id));
        tch::no_grad(|| {
            let staging = match &mut self.uploads {
                Uploads::Direct => {
                    for &(slot, id) in installs {
                        let b = bytes_of(id)?;
                        install(&self.arena, pack, slot, id, b)?;
                        traffic.copied(b.len());
                    }
                    return Ok(());
                }
                Uploads::Staged(staging) => staging,
            };
            for chunk in installs.chunks(staging.rows) {
                let probes = chunk.iter().map(|&(_, id)| bytes_of(id)).collect::<Result<Vec<_>, _>>()?;
                staging.upload(&probes)?;
                for (row, &(slot, id)) in chunk.iter().enumerate() {
                    install_staged(&self.arena, pack, slot, id, &staging.device, row)?;
                    traffic.copied(probes[row].len());
                }
            }
            Ok(())
        })
    }
}

/// Copies a probe's bytes into a slot of `arena` (converting to the compute dtype).
fn install(arena: &Arena, pack: &Pack, slot: usize, id: ConceptId, bytes: &[u8]) -> Result<(), tch::TchError> {
    let storage = kind_of(pack.layout().dtype);
    install_with(arena, pack, slot, id, |range, shape| {
        let src = &bytes[range];
        // A borrowed view of the cache's bytes: no allocation and no copy before `copy_`,
        // which converts the dtype and moves the data to the device in one pass.
        // SAFETY: `src` holds exactly numel(shape) elements of `storage` (the pack checked
        // lengths at open and the CRC at read), it outlives the view, which `install_with`
        // only reads until its copy returns, and the probe's tensor offsets are multiples of
        // the element size within an allocation aligned for it.
        debug_assert_eq!(src.len() as i64, shape.iter().product::<i64>() * storage.elt_size_in_bytes() as i64);
        unsafe { Tensor::f_from_blob(src.as_ptr(), shape, &[], storage, Device::Cpu) }
    })
}

/// Copies row `row` of the device staging buffer into a slot of `arena` (converting to the
/// compute dtype).
fn install_staged(
    arena: &Arena,
    pack: &Pack,
    slot: usize,
    id: ConceptId,
    staged: &Tensor,
    row: usize,
) -> Result<(), tch::TchError> {
    let storage = kind_of(pack.layout().dtype);
    let row = staged.f_get(row as i64)?;
    install_with(arena, pack, slot, id, |range, shape| {
        // Reinterpreting bytes needs an element-aligned offset: probe rows are whole probes
        // and tensor offsets are multiples of the element size (checked at pack open).
        row.f_narrow(0, range.start as i64, range.len() as i64)?.f_view_dtype(storage)?.f_view(shape)
    })
}

/// Copies each of probe `id`'s six tensors into `slot` of `arena`; `source(byte range, shape)`
/// gives a view of one tensor's stored bytes.
fn install_with(
    arena: &Arena,
    pack: &Pack,
    slot: usize,
    id: ConceptId,
    source: impl Fn(std::ops::Range<usize>, &[i64]) -> Result<Tensor, tch::TchError>,
) -> Result<(), tch::TchError> {
    let ranges = pack.layout().ranges(&pack.tensor_offsets(id));
    for (part, range) in arena.parts().into_iter().zip(ranges) {
        let mut dst = part.f_get(slot as i64)?;
        let src = source(range, &dst.size())?;
        dst.f_copy_(&src)?;
    }
    Ok(())
}

/// A physical arena slot holding a probe; back on the free list when the last session lets go.
pub struct Physical {
    slot: usize,
    id: ConceptId,
    free: Arc<Mutex<Vec<usize>>>,
}

impl Drop for Physical {
    fn drop(&mut self) {
        self.free.lock().expect("free list").push(self.slot);
    }
}

pub struct TorchBackend {
    pack: Arc<Pack>,
    torch: TorchArena,
    slots: usize,
    /// Which physical slot holds a probe, while any session holds it.
    resident: HashMap<ConceptId, Weak<Physical>>,
    free: Arc<Mutex<Vec<usize>>>,
    sessions: Tables<Arc<Physical>>,
    traffic: WeightTraffic,
}

impl TorchBackend {
    /// `slots` physical slots (`runtime.pool_slots`) on `device`; see [`TorchArena::new`].
    pub fn new(
        pack: Arc<Pack>,
        slots: usize,
        device: Device,
        compute: Kind,
        staging_bytes: Option<u64>,
    ) -> Result<Self, tch::TchError> {
        let torch = TorchArena::new(&pack, slots, device, compute, staging_bytes)?;
        let traffic = WeightTraffic::new(torch.path());
        let free = Arc::new(Mutex::new((0..slots).rev().collect()));
        Ok(Self { pack, torch, slots, resident: HashMap::new(), free, sessions: Tables::default(), traffic })
    }
}

impl ScoringBackend for TorchBackend {
    fn path(&self) -> &'static str {
        self.torch.path()
    }

    fn open(&mut self, session: SessionId, slots: usize) {
        self.sessions.open(session, slots);
    }

    fn close(&mut self, session: SessionId) {
        self.sessions.close(session);
        self.resident.retain(|_, p| p.strong_count() > 0);
    }

    /// An install takes the probe's physical slot if a session has it resident, else a free
    /// one, and copies the probe in (all of a request's copies in one upload round).
    fn apply(
        &mut self,
        session: SessionId,
        ops: &[SlotOp],
        bytes: &HashMap<ConceptId, Arc<ProbeBytes>>,
    ) -> Result<(), ScoringError> {
        let table = self.sessions.get_mut(session)?;
        let mut uploads = Vec::new();
        let (resident, free, slots) = (&mut self.resident, &self.free, self.slots);
        let mut shared = 0;
        let walked = table.apply(ops, &mut self.traffic, |id| {
            if let Some(p) = resident.get(&id).and_then(Weak::upgrade) {
                shared += 1; // a reference, no copy
                return Ok(p);
            }
            let slot = free.lock().expect("free list").pop().ok_or(ScoringError::ArenaFull { slots })?;
            let p = Arc::new(Physical { slot, id, free: free.clone() });
            resident.insert(id, Arc::downgrade(&p));
            uploads.push((slot, id));
            Ok(p)
        });
        self.traffic.installs += shared;
        // Every slot taken is filled, even when a later op failed: a resident slot must hold
        // its probe for whichever session takes it next. A physical slot freed and taken again
        // in this request holds its last install.
        let uploaded = self.torch.upload(&self.pack, &uploads, bytes, &mut self.traffic);
        self.resident.retain(|_, p| p.strong_count() > 0);
        walked.and(uploaded)
    }

    /// The union of physical slots, scored against every hidden state of the step in one pass
    /// (on an accelerator the extra probe × state pairs cost less than a launch per subset).
    fn score(&mut self, step: &[Request], faults: &Faults) -> Result<StepScores, ScoringError> {
        let mut answers: Vec<Result<Vec<f32>, ScoringError>> = Vec::with_capacity(step.len());
        let mut index: HashMap<usize, usize> = HashMap::new();
        let mut physical: Vec<usize> = Vec::new();
        let mut ids: Vec<ConceptId> = Vec::new();
        let mut hidden: Vec<&[f32]> = Vec::new();
        let mut wants: Vec<Option<(usize, Vec<usize>)>> = Vec::with_capacity(step.len());
        for r in step {
            match self.sessions.held(r) {
                Err(e) => {
                    answers.push(Err(e));
                    wants.push(None);
                }
                Ok(held) => {
                    let mine = held
                        .iter()
                        .map(|p| {
                            *index.entry(p.slot).or_insert_with(|| {
                                physical.push(p.slot);
                                ids.push(p.id);
                                physical.len() - 1
                            })
                        })
                        .collect();
                    answers.push(Ok(Vec::new()));
                    wants.push(Some((hidden.len(), mine)));
                    hidden.push(r.hidden);
                }
            }
        }
        check_faults(faults, ids.iter().copied())?;
        let batch = hidden.len();
        let out = if physical.is_empty() { Vec::new() } else { self.torch.score_slots(&physical, &hidden)? };
        for (answer, want) in answers.iter_mut().zip(wants) {
            if let Some((b, mine)) = want {
                *answer = Ok(mine.iter().map(|&u| out[u * batch + b]).collect());
            }
        }
        Ok(StepScores { answers, union: physical.len(), logits: physical.len() * batch })
    }

    fn holdings(&self) -> Holdings {
        self.sessions.holdings(|p| p.slot)
    }

    fn traffic(&self) -> &WeightTraffic {
        &self.traffic
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{reference_logit, ProbeRef};
    use crate::pack::DType;
    use crate::runtime::scoring::tests::{bytes_for, ops, synth_pack};

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-4 * (1.0 + b.abs())
    }

    fn want(pack: &Pack, id: u32, h: &[f32]) -> f32 {
        let b = pack.read_probe(ConceptId(id)).unwrap();
        let ranges = pack.layout().ranges(&pack.tensor_offsets(ConceptId(id)));
        reference_logit(&ProbeRef { bytes: &b, ranges: &ranges }, pack.layout().dtype, h)
    }

    /// Installs, moves and swaps in one round, through both upload paths; returns the logits
    /// of slots 0..6 and the transfers made.
    fn replay(pack: &Arc<Pack>, staging_bytes: Option<u64>, hidden: &[f32]) -> (Vec<f32>, u64) {
        let mut backend = TorchBackend::new(pack.clone(), 8, Device::Cpu, Kind::Float, staging_bytes).unwrap();
        let s = SessionId(1);
        backend.open(s, 8);
        let ops = ops();
        backend.apply(s, &ops, &bytes_for(pack, &ops)).unwrap();
        let step = [Request { session: s, start: 0, len: 6, hidden }];
        let logits = backend.score(&step, &Faults::none()).unwrap().answers.pop().unwrap().unwrap();
        (logits, backend.torch.transfers())
    }

    #[test]
    fn staged_uploads_score_like_direct_installs_in_one_transfer_per_round() {
        for dtype in [DType::F32, DType::Bf16] {
            let (_dir, pack) = synth_pack(dtype);
            let hidden: Vec<f32> = (0..pack.hidden_dim()).map(|i| (i as f32 * 0.37).sin()).collect();
            let (direct, none) = replay(&pack, None, &hidden);
            assert_eq!(none, 0);
            for (got, id) in direct.iter().zip([11, 19, 7, 23, 42, 3]) {
                assert!(close(*got, want(&pack, id, &hidden)), "{dtype:?}: probe {id}");
            }
            let probe = pack.layout().byte_len() as u64;
            let (staged, transfers) = replay(&pack, Some(64 * probe), &hidden);
            assert_eq!(staged, direct, "{dtype:?}");
            assert_eq!(transfers, 1, "six installs fit one transfer");
            // Room for two probes: six installs take three transfers and still agree.
            let (chunked, transfers) = replay(&pack, Some(2 * probe), &hidden);
            assert_eq!(chunked, direct, "{dtype:?}");
            assert_eq!(transfers, 3);
        }
    }

    #[test]
    fn sessions_share_physical_slots_and_get_their_own_logits() {
        let (_dir, pack) = synth_pack(DType::F32);
        let mut backend = TorchBackend::new(pack.clone(), 4, Device::Cpu, Kind::Float, None).unwrap();
        let h = |seed: f32| -> Vec<f32> { (0..pack.hidden_dim()).map(|i| (i as f32 * seed).sin()).collect() };
        let install = |ids: &[u32]| -> Vec<SlotOp> {
            ids.iter().enumerate().map(|(slot, &id)| SlotOp::Install { slot, id: ConceptId(id) }).collect()
        };
        for s in [1, 2, 3] {
            backend.open(SessionId(s), 4);
        }
        let (h1, h2) = (h(0.3), h(0.7));
        for (s, ids) in [(1, vec![3, 7]), (2, vec![7, 9, 3])] {
            let ops = install(&ids);
            backend.apply(SessionId(s), &ops, &bytes_for(&pack, &ops)).unwrap();
        }
        let step = [
            Request { session: SessionId(1), start: 0, len: 2, hidden: &h1 },
            Request { session: SessionId(2), start: 0, len: 3, hidden: &h2 },
        ];
        let got: Vec<Vec<f32>> =
            backend.score(&step, &Faults::none()).unwrap().answers.into_iter().map(Result::unwrap).collect();
        for (g, id) in got[0].iter().zip([3, 7]) {
            assert!(close(*g, want(&pack, id, &h1)), "session 1: probe {id}");
        }
        for (g, id) in got[1].iter().zip([7, 9, 3]) {
            assert!(close(*g, want(&pack, id, &h2)), "session 2: probe {id}");
        }
        // Probes 3 and 7 are resident once: 3 physical slots for 5 references, 3 copies.
        let held = backend.holdings();
        assert_eq!((held.probes, held.refs), (3, 5));
        assert_eq!(backend.traffic().installs, 5);
        assert_eq!(backend.traffic().install_bytes_copied, 3 * pack.layout().byte_len() as u64);
        // Session 1 lets go of probe 3 (moved over), session 2 still holds it.
        backend.apply(SessionId(1), &[SlotOp::Move { from: 1, to: 0 }], &HashMap::new()).unwrap();
        let step = [Request { session: SessionId(1), start: 0, len: 1, hidden: &h1 }];
        let got = backend.score(&step, &Faults::none()).unwrap().answers.pop().unwrap().unwrap();
        assert!(close(got[0], want(&pack, 7, &h1)));
        assert_eq!(backend.holdings().probes, 3, "probe 3 stays: session 2 holds it");
        // A session asking for more probes than there are free slots fails, naming the key.
        let ops = install(&[11, 13]);
        let e = backend.apply(SessionId(3), &ops, &bytes_for(&pack, &ops)).unwrap_err();
        assert!(e.to_string().contains("runtime.pool_slots"), "{e}");
        // Closing session 2 frees probes 9 and 3; 7 stays with session 1.
        backend.close(SessionId(2));
        backend.close(SessionId(3));
        assert_eq!(backend.holdings(), Holdings { sessions: 1, probes: 1, refs: 1 });
    }
}
