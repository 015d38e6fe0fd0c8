//! The tch backend: one resident store on the device (an accelerator's memory, or the CPU with
//! `device.cpu_kernel = "torch"`) shared by every session. It owns every tensor (a `Tensor` is
//! `Send` but not `Sync`), so it lives on the step scheduler's thread.
//!
//! The store is allocated once: stacked weights `[R,128,D]`, `[R,64,128]`, `[R,1,64]` and
//! biases `[R,128,1]`, `[R,64,1]`, `[R,1,1]` in the compute dtype, `R` rows from
//! `device.store_bytes`. A probe is copied into a row once and stays there until its row is
//! needed for another; which row holds which probe, what is pinned and what is warm is the
//! [`Book`]'s (`store.rs`). A session's slot table holds [`Pin`]s: an install pins the probe's
//! row (copying the probe in only if it is not resident), and moves and swaps (pruning) move
//! pins, never weights. A request's slot operations are all or nothing (see
//! [`TorchBackend::apply`]). A step gathers the union's rows (`index_select`), or scores a
//! dense range in place, against all of the step's hidden states as one `[D, B]` matrix.
//!
//! How copies reach the store depends on the device ([`Uploads`]): on the CPU each tensor is
//! copied straight from the cache's bytes (`copy_` converts bf16 to the compute dtype); on an
//! accelerator a request's copies are packed into one pinned host buffer and sent in one
//! host-to-device transfer, then scattered on the device, because per-tensor transfers would
//! pay the launch and synchronization cost six times a probe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

use super::store::{Book, Pin, ResidentView};
use super::{check_faults, Holdings, Request, ScoringBackend, ScoringError, State, StepScores, Tables};
use crate::engine::tensors::{kind_of, to_host_f32};
use crate::kernel::MAX_BATCH;
use crate::pack::layout::{ProbeLayout, HIDDEN1, HIDDEN2};
use crate::pack::{Pack, ProbeId};
use crate::policy::ProbeSet;
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

/// What a session's coordinator reads of the resident store: which probes it holds (a probe
/// there needs no bytes fetched to be installed), and the device it scores on (a hidden state
/// handed over as a tensor there is checked and scored where it lies).
#[derive(Clone)]
pub struct Resident {
    pub view: Arc<ResidentView>,
    pub device: Device,
}

/// Raw probe bytes, one probe per row, in the pack's storage layout. The buffers are allocated
/// once; `rows` bounds how many installs share a transfer (more than that take several).
struct Staging {
    host: Tensor,
    /// The host buffer's twin on the device, for transfers that complete before `upload`
    /// returns; `None` for the prefetch's staging, whose transfers do not wait (each lands in
    /// a tensor of its own, on the side stream that queued it).
    device: Option<Tensor>,
    target: Device,
    rows: usize,
    probe_bytes: usize,
    /// Host-to-device transfers made so far.
    transfers: u64,
}

impl Staging {
    fn new(rows: usize, probe_bytes: usize, device: Device, waits: bool) -> Result<Self, tch::TchError> {
        let shape = [rows as i64, probe_bytes as i64];
        let mut host = Tensor::f_empty(shape, (Kind::Uint8, Device::Cpu))?;
        if device.is_cuda() {
            // Page-locked, so the transfer is one DMA rather than a copy through a bounce buffer.
            host = host.f_pin_memory(device)?;
        }
        let twin = if waits { Some(Tensor::f_empty(shape, (Kind::Uint8, device))?) } else { None };
        Ok(Self { host, device: twin, target: device, rows, probe_bytes, transfers: 0 })
    }

    /// Packs `probes` into the first rows of the host buffer and sends them in one transfer;
    /// returns where they are on the device, one probe per row. With a device twin the
    /// transfer has completed on return; without, it is queued on the current stream, and the
    /// host buffer must not be refilled until that stream has passed it.
    fn upload(&mut self, probes: &[&[u8]]) -> Result<Tensor, tch::TchError> {
        debug_assert!(probes.len() <= self.rows);
        let base = self.host.data_ptr() as *mut u8;
        for (row, bytes) in probes.iter().enumerate() {
            assert_eq!(bytes.len(), self.probe_bytes, "cache bytes are one probe long");
            // SAFETY: `host` is a contiguous [rows, probe_bytes] u8 tensor that this struct owns,
            // `row < rows`, and `bytes` (a cache entry) cannot overlap it. The previous transfer
            // has completed: `copy_` without `non_blocking` returns once the data is across, and
            // the prefetch refills its buffer only once its last copy is done (`Ahead`).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(row * self.probe_bytes), bytes.len()) };
        }
        let n = probes.len() as i64;
        let host = self.host.f_narrow(0, 0, n)?;
        self.transfers += 1;
        match &mut self.device {
            Some(twin) => {
                let mut dst = twin.f_narrow(0, 0, n)?;
                dst.f_copy_(&host)?;
                Ok(dst)
            }
            None => host.f_to_device_(self.target, Kind::Uint8, true, false),
        }
    }
}

/// The store's tensors (the "arena": one allocation per tensor, rows of probes) and how
/// copies reach them.
pub struct TorchArena {
    device: Device,
    compute: Kind,
    arena: Arena,
    uploads: Uploads,
    /// Staged (an accelerator): where a round's inputs wait for their non-blocking copy.
    inputs: Option<Inputs>,
    /// Hidden states rounds read where they lay on the device, and sent from host memory.
    states_in_place: u64,
    states_sent: u64,
    /// CUDA graphs for sparse rounds (`device.cuda_graphs`, the `cuda-graphs` feature, a CUDA
    /// device); `None`: every round is eager.
    #[cfg(feature = "cuda-graphs")]
    graphs: Option<super::graphs::Graphs>,
    /// Prefetch copies on a side stream (the `cuda-graphs` feature's shim, a CUDA device):
    /// `None`, prefetches copy as installs do, on the current stream, and the host waits.
    #[cfg(feature = "cuda-graphs")]
    ahead: Option<Ahead>,
}

/// The store's prefetch on a side stream: its own pinned host buffer, and the copy in flight.
/// Work on the current stream that reads or writes the rows being written is ordered after
/// the copy on the device ([`TorchArena::after_prefetch`]); other work does not wait for it.
/// The buffer is refilled only once the copy is done: a prefetch that finds the last one
/// still running is skipped (prefetching is best effort), so the host never waits for one.
#[cfg(feature = "cuda-graphs")]
struct Ahead {
    staging: Staging,
    device: usize,
    pending: Option<Pending>,
}

#[cfg(feature = "cuda-graphs")]
struct Pending {
    copy: super::graphs::SideCopy,
    /// The store rows it writes, sorted.
    rows: Vec<usize>,
    /// The current stream already waits for it: later work there comes after it.
    ordered: bool,
}

#[cfg(feature = "cuda-graphs")]
impl Ahead {
    /// How many probes a prefetch may copy now: none while the last copy is still running.
    fn room(&mut self) -> usize {
        if let Some(p) = &self.pending {
            match p.copy.done() {
                Ok(true) => self.pending = None,
                Ok(false) => return 0,
                Err(error) => {
                    tracing::warn!(%error, "a prefetch copy cannot be queried: waiting for the device");
                    tch::Cuda::synchronize(self.device as i64);
                    self.pending = None;
                }
            }
        }
        self.staging.rows
    }
}

#[cfg(feature = "cuda-graphs")]
impl Drop for TorchArena {
    fn drop(&mut self) {
        // The store's memory goes back to the allocator for the current stream's use: a copy
        // still writing into it must come first there.
        self.after_prefetch(&[], Some(usize::MAX));
    }
}

/// Host buffers for a round's row indices and hidden states (page-locked on a GPU), sent with
/// non-blocking copies, so that a round synchronises with the device once: at the readback of
/// its logits. A buffer is refilled only in the next round, after that readback, by which
/// time its copy (earlier on the same stream) has completed. Hidden states that already lie on
/// the device (`State::Device`) skip the hidden buffer.
struct Inputs {
    rows: Tensor,
    hidden: Tensor,
}

impl Inputs {
    fn new(rows: usize, d: usize, device: Device) -> Result<Self, tch::TchError> {
        let pin = |t: Tensor| if device.is_cuda() { t.f_pin_memory(device) } else { Ok(t) };
        Ok(Self {
            rows: pin(Tensor::f_empty([rows as i64], (Kind::Int64, Device::Cpu))?)?,
            hidden: pin(Tensor::f_empty([(MAX_BATCH * d) as i64], (Kind::Float, Device::Cpu))?)?,
        })
    }

    /// Copies the round's rows and hidden states into the host buffers; false if they do not
    /// fit.
    fn fill(&mut self, rows: &[usize], hidden: &[&[f32]]) -> bool {
        let d = hidden.first().map_or(0, |h| h.len());
        if rows.len() > self.rows.size()[0] as usize || hidden.len() * d > self.hidden.size()[0] as usize {
            return false;
        }
        // SAFETY: both buffers are contiguous host tensors this struct owns, of the kinds
        // written (i64, f32), and long enough (checked above); no copy from them is in flight
        // (see the type's doc).
        unsafe {
            let idx = std::slice::from_raw_parts_mut(self.rows.data_ptr() as *mut i64, rows.len());
            idx.iter_mut().zip(rows).for_each(|(o, &r)| *o = r as i64);
            let x = std::slice::from_raw_parts_mut(self.hidden.data_ptr() as *mut f32, hidden.len() * d);
            x.chunks_exact_mut(d.max(1)).zip(hidden).for_each(|(o, h)| o.copy_from_slice(h));
        }
        true
    }

    /// The first `n` values of a filled buffer on `device`, sent without waiting.
    fn send(buffer: &Tensor, n: usize, device: Device) -> Result<Tensor, tch::TchError> {
        buffer.f_narrow(0, 0, n as i64)?.f_to_device_(device, buffer.kind(), true, false)
    }
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
                    Uploads::Staged(Staging::new(rows, probe_bytes, device, true)?)
                }
            };
            let inputs = match &uploads {
                Uploads::Staged(_) => Some(Inputs::new(slots, pack.hidden_dim(), device)?),
                Uploads::Direct => None,
            };
            // Prefetches on a side stream where the shim is built in and uploads are staged (a
            // CUDA device), through a pinned buffer of their own (MAX_WARM probes at most).
            #[cfg(feature = "cuda-graphs")]
            let ahead = match (device, &uploads) {
                (Device::Cuda(index), Uploads::Staged(main)) => Some(Ahead {
                    staging: Staging::new(main.rows.min(MAX_WARM), main.probe_bytes, device, false)?,
                    device: index,
                    pending: None,
                }),
                _ => None,
            };
            Ok(TorchArena {
                device,
                compute,
                arena,
                uploads,
                inputs,
                states_in_place: 0,
                states_sent: 0,
                #[cfg(feature = "cuda-graphs")]
                graphs: None,
                #[cfg(feature = "cuda-graphs")]
                ahead,
            })
        })
    }

    /// Replays sparse rounds as CUDA graphs where this build and device can (the
    /// `cuda-graphs` feature, a CUDA device with staged inputs); `false`, or elsewhere, every
    /// round is eager.
    pub fn use_cuda_graphs(&mut self, on: bool) {
        #[cfg(feature = "cuda-graphs")]
        {
            self.graphs = (on && self.device.is_cuda() && self.inputs.is_some()).then(Default::default);
        }
        let _ = on;
    }

    /// How many probes a prefetch may copy now (`limit` at most): on a side stream, none while
    /// the last prefetch is still being copied.
    pub fn prefetch_room(&mut self, limit: usize) -> usize {
        #[cfg(feature = "cuda-graphs")]
        if let Some(ahead) = &mut self.ahead {
            return ahead.room().min(limit);
        }
        limit
    }

    /// Orders the current stream after a prefetch copy still in flight, on the device, if the
    /// work about to be queued meets its rows ([`super::graphs::touches`]).
    #[cfg(feature = "cuda-graphs")]
    fn after_prefetch(&mut self, rows: &[usize], dense_hi: Option<usize>) {
        let Some(p) = self.ahead.as_mut().and_then(|a| a.pending.as_mut()) else { return };
        if p.ordered || !super::graphs::touches(&p.rows, rows, dense_hi) {
            return;
        }
        if let Err(error) = p.copy.order_current() {
            tracing::warn!(%error, "ordering after a prefetch copy failed: waiting for the device");
            if let Device::Cuda(index) = self.device {
                tch::Cuda::synchronize(index as i64);
            }
        }
        p.ordered = true;
    }

    /// Is a CUDA graph replaying this store's sparse rounds?
    pub fn cuda_graphs(&self) -> bool {
        #[cfg(feature = "cuda-graphs")]
        return self.graphs.is_some();
        #[cfg(not(feature = "cuda-graphs"))]
        false
    }

    pub fn path(&self) -> &'static str {
        match (self.device == Device::Cpu, self.cuda_graphs()) {
            (true, _) => "torch store (cpu)",
            (false, false) => "torch store (device)",
            (false, true) => "torch store (device, CUDA graphs)",
        }
    }

    /// `stats` with the hidden states' figures, which are this arena's.
    fn with_states(&self, stats: crate::types::StoreStats) -> crate::types::StoreStats {
        crate::types::StoreStats { states_in_place: self.states_in_place, states_sent: self.states_sent, ..stats }
    }

    /// Host-to-device transfers made by staged uploads (0 when installs are direct).
    pub fn transfers(&self) -> u64 {
        match &self.uploads {
            Uploads::Staged(s) => s.transfers,
            Uploads::Direct => 0,
        }
    }

    /// Logits of the probes in `rows` (any rows, in any order) for each of `hidden`:
    /// `out[i * B + b]`, scored against all B hidden states as one `[D, B]` matrix. A sparse
    /// set of rows is gathered first (one `index_select` per tensor, which copies them); a
    /// dense one (at least half of the rows below its highest, as in the exhaustive mode,
    /// since rows are handed out from the lowest) is scored in place over that whole range,
    /// with no copy: the extra rows cost less compute than the gather costs memory traffic.
    pub(super) fn score_slots(&mut self, rows: &[usize], hidden: &[&State]) -> Result<Vec<f32>, tch::TchError> {
        tch::no_grad(|| {
            let hi = rows.iter().max().map_or(0, |&r| r + 1);
            let dense = rows.len() * 2 >= hi;
            #[cfg(feature = "cuda-graphs")]
            self.after_prefetch(rows, dense.then_some(hi));
            // The states in host memory, or (any of them on the device) all of them there.
            let hosts: Option<Vec<&[f32]>> = hidden.iter().map(|h| h.host()).collect();
            let in_place = hidden.iter().filter(|h| h.device().is_some()).count() as u64;
            self.states_in_place += in_place;
            self.states_sent += hidden.len() as u64 - in_place;
            let stacked = match &hosts {
                Some(_) => None,
                None => Some(self.stack(hidden)?),
            };
            #[cfg(feature = "cuda-graphs")]
            if let Some(logits) = self.replay(dense, rows, hosts.as_deref(), stacked.as_ref()) {
                return Ok(logits);
            }
            // A dense range needs no indices on the device.
            let wanted: &[usize] = if dense { &[] } else { rows };
            let (idx, x) = self.send(wanted, hosts.as_deref(), stacked)?;
            let a = &self.arena;
            let b = hidden.len() as i64;
            let d = a.w1.size()[2];
            let idx = (!dense).then_some(idx);
            let g = |t: &Tensor| match &idx {
                Some(idx) => t.f_index_select(0, idx),
                None => t.f_narrow(0, 0, hi as i64),
            };
            let n = if dense { hi as i64 } else { rows.len() as i64 };
            let x = x.f_to_kind(self.compute)?.f_transpose(0, 1)?;
            let a1 = g(&a.w1)?.f_view([n * HIDDEN1 as i64, d])?.f_matmul(&x)?;
            let a1 = (a1 + g(&a.b1)?.f_view([n * HIDDEN1 as i64, 1])?).f_relu()?.f_view([n, HIDDEN1 as i64, b])?;
            let a2 = g(&a.b2)?.f_baddbmm(&g(&a.w2)?, &a1, 1, 1)?.f_relu()?;
            let logits = g(&a.b3)?.f_baddbmm(&g(&a.w3)?, &a2, 1, 1)?.f_view([-1])?;
            let all = to_host_f32(&logits)?;
            if !dense {
                return Ok(all);
            }
            let batch = hidden.len();
            Ok(rows.iter().flat_map(|&r| all[r * batch..(r + 1) * batch].iter().copied()).collect())
        })
    }

    /// The states of a round as one `[B, D]` float32 tensor on the store's device: those that
    /// lie there as they are, any host one copied over.
    fn stack(&self, hidden: &[&State]) -> Result<Tensor, tch::TchError> {
        let parts = hidden
            .iter()
            .map(|h| match h {
                State::Device(s) => s.x.f_to_device(self.device),
                State::Host(v) => Tensor::f_from_slice(v)?.f_to_device(self.device),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Tensor::f_stack(&parts, 0)
    }

    /// The round's row indices `[n]` and hidden states `[B, D]` (f32) on the device. Staged
    /// (an accelerator), host values go through the pinned buffers, without waiting; states
    /// already on the device (`stacked`) are used where they lie.
    fn send(
        &mut self,
        rows: &[usize],
        hosts: Option<&[&[f32]]>,
        stacked: Option<Tensor>,
    ) -> Result<(Tensor, Tensor), tch::TchError> {
        let d = self.arena.w1.size()[2];
        let device = self.device;
        if let Some(inputs) = self.inputs.as_mut() {
            if inputs.fill(rows, hosts.unwrap_or(&[])) {
                let idx = Inputs::send(&inputs.rows, rows.len(), device)?;
                let x = match (stacked, hosts) {
                    (Some(x), _) => x,
                    (None, hosts) => {
                        let b = hosts.map_or(0, <[_]>::len);
                        Inputs::send(&inputs.hidden, b * d as usize, device)?.f_view([b as i64, d])?
                    }
                };
                return Ok((idx, x));
            }
        }
        let idx: Vec<i64> = rows.iter().map(|&s| s as i64).collect();
        let idx = Tensor::f_from_slice(&idx)?.f_to_device(device)?;
        let x = match (stacked, hosts) {
            (Some(x), _) => x,
            (None, hosts) => {
                let hosts = hosts.unwrap_or(&[]);
                let flat: Vec<f32> = hosts.iter().flat_map(|h| h.iter().copied()).collect();
                Tensor::f_from_slice(&flat)?.f_view([hosts.len() as i64, d])?.f_to_device(device)?
            }
        };
        Ok((idx, x))
    }

    /// A sparse round of a graph's size, replayed by its graph: `None` for a round the graphs
    /// do not take (dense, too big, or graphs off), which is then scored eagerly. A graph that
    /// fails to capture or replay turns the graphs off for this store, with a warning, and
    /// its round is scored eagerly: the two agree (tests/runtime.rs). Its hidden states come
    /// from the pinned buffer (`hosts`) or from where they lie on the device (`stacked`).
    #[cfg(feature = "cuda-graphs")]
    fn replay(
        &mut self,
        dense: bool,
        rows: &[usize],
        hosts: Option<&[&[f32]]>,
        stacked: Option<&Tensor>,
    ) -> Option<Vec<f32>> {
        let (graphs, inputs) = (self.graphs.as_mut()?, self.inputs.as_mut()?);
        let b = hosts.map_or_else(|| stacked.map_or(0, |x| x.size()[0] as usize), <[_]>::len);
        let bucket = super::graphs::bucket(rows.len(), b).filter(|_| !dense)?;
        if !inputs.fill(rows, hosts.unwrap_or(&[])) {
            return None;
        }
        let flat;
        let x = match stacked {
            Some(x) => {
                flat = x.f_view([-1]).ok()?;
                &flat
            }
            None => &inputs.hidden,
        };
        match graphs.score(bucket, self.arena.parts(), &inputs.rows, x, rows.len(), b) {
            Ok(logits) => Some(logits),
            Err(error) => {
                tracing::warn!(%error, "CUDA graphs are off for this store: scoring eagerly");
                self.graphs = None;
                None
            }
        }
    }

    /// Copies each `(physical slot, probe)` of `installs` into the arena, in order. Staged,
    /// they travel in as few transfers as the staging rows allow (one, up to `rows` probes).
    /// `ahead` (a prefetch): on the side stream where the store has one, without waiting; at
    /// most [`TorchArena::prefetch_room`] probes.
    fn upload(
        &mut self,
        pack: &Pack,
        installs: &[(usize, ProbeId)],
        bytes: &HashMap<ProbeId, Arc<ProbeBytes>>,
        traffic: &mut WeightTraffic,
        ahead: bool,
    ) -> Result<(), ScoringError> {
        let bytes_of = |id| bytes.get(&id).map(|b| &b[..]).ok_or(ScoringError::MissingBytes(id));
        #[cfg(feature = "cuda-graphs")]
        {
            if let Some(side) = self.ahead.as_mut().filter(|_| ahead) {
                let probes = installs.iter().map(|&(_, id)| bytes_of(id)).collect::<Result<Vec<_>, _>>()?;
                let arena = &self.arena;
                let staging = &mut side.staging;
                let (copy, queued) = super::graphs::SideCopy::run(side.device, || {
                    tch::no_grad(|| -> Result<(), tch::TchError> {
                        let staged = staging.upload(&probes)?;
                        for (row, &(slot, id)) in installs.iter().enumerate() {
                            install_staged(arena, pack, slot, id, &staged, row)?;
                        }
                        Ok(())
                    })
                })
                .map_err(ScoringError::Shim)?;
                let mut rows: Vec<usize> = installs.iter().map(|&(slot, _)| slot).collect();
                rows.sort_unstable();
                side.pending = Some(Pending { copy, rows, ordered: false });
                queued?;
                probes.iter().for_each(|p| traffic.copied(p.len()));
                return Ok(());
            }
            let slots: Vec<usize> = installs.iter().map(|&(slot, _)| slot).collect();
            self.after_prefetch(&slots, None);
        }
        let _ = ahead;
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
                let staged = staging.upload(&probes)?;
                for (row, &(slot, id)) in chunk.iter().enumerate() {
                    install_staged(&self.arena, pack, slot, id, &staged, row)?;
                    traffic.copied(probes[row].len());
                }
            }
            Ok(())
        })
    }
}

/// Copies a probe's bytes into a slot of `arena` (converting to the compute dtype).
fn install(arena: &Arena, pack: &Pack, slot: usize, id: ProbeId, bytes: &[u8]) -> Result<(), tch::TchError> {
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
    id: ProbeId,
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
    id: ProbeId,
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

pub struct TorchBackend {
    pack: Arc<Pack>,
    torch: TorchArena,
    book: Arc<Mutex<Book>>,
    sessions: Tables<Pin>,
    traffic: WeightTraffic,
    faults: Faults,
}

impl TorchBackend {
    /// A store of `rows` rows on `device` (see [`TorchArena::new`]); `forever` are the base
    /// probes, never evicted once resident.
    pub fn new(
        pack: Arc<Pack>,
        rows: usize,
        device: Device,
        compute: Kind,
        staging_bytes: Option<u64>,
        forever: ProbeSet,
        faults: Faults,
    ) -> Result<Self, tch::TchError> {
        let torch = TorchArena::new(&pack, rows, device, compute, staging_bytes)?;
        let traffic = WeightTraffic::new(torch.path());
        let row_bytes = row_bytes(pack.hidden_dim(), compute);
        let book = Arc::new(Mutex::new(Book::new(rows, row_bytes, pack.len(), forever)));
        Ok(Self { pack, torch, book, sessions: Tables::default(), traffic, faults })
    }

    /// See [`TorchArena::use_cuda_graphs`] (`device.cuda_graphs`).
    pub fn use_cuda_graphs(mut self, on: bool) -> Self {
        self.torch.use_cuda_graphs(on);
        self
    }

    /// Which probes the store holds, for the coordinators to skip fetching their bytes.
    pub fn view(&self) -> Arc<ResidentView> {
        self.book.lock().expect("store book").view()
    }

    /// What sessions read of the store: [`TorchBackend::view`] and its device.
    pub fn resident(&self) -> Resident {
        Resident { view: self.view(), device: self.torch.device }
    }

    /// Copies the probes of `new` that are not resident into rows of their own, each once.
    /// All or nothing: if the store has no room, or a copy fails, no row changes hands and no
    /// probe becomes resident.
    fn copy_in(
        &mut self,
        new: &[ProbeId],
        bytes: &HashMap<ProbeId, Arc<ProbeBytes>>,
        ahead: bool,
    ) -> Result<(), ScoringError> {
        let rows = {
            let mut book = self.book.lock().expect("store book");
            book.check_room(new.len())?;
            new.iter().map(|&id| book.take_row(id).map(|row| (row, id))).collect::<Result<Vec<_>, _>>()?
        };
        let copied = match self.faults.upload_fails(new.iter().copied()) {
            Some(id) => Err(ScoringError::InjectedUpload(id)),
            None => self.torch.upload(&self.pack, &rows, bytes, &mut self.traffic, ahead),
        };
        let mut book = self.book.lock().expect("store book");
        for &(row, _) in &rows {
            match copied {
                Ok(()) => book.filled(row),
                Err(_) => book.unfilled(row),
            }
        }
        copied.map_err(|e| {
            let concepts = new.iter().map(|&id| self.pack.probe_label(id)).collect();
            ScoringError::Upload { concepts, source: Box::new(e) }
        })
    }
}

/// Free memory where the store would live: RAM that Linux can hand out (`MemAvailable`) for
/// the CPU, the device's free memory (`cudaMemGetInfo`) for CUDA. `None` where it cannot be
/// read.
pub fn free_memory(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        }
        Device::Cuda(index) => crate::types::cuda::free_memory(index).ok(),
        _ => None,
    }
}

/// Most probes one prefetch copies into the store: it runs between steps, and a token's next
/// request waits behind it.
const MAX_WARM: usize = 64;

/// Bytes of one probe in the compute dtype: what a row of the store costs.
pub fn row_bytes(hidden_dim: usize, compute: Kind) -> usize {
    // The element count does not depend on the stored dtype.
    ProbeLayout::new(hidden_dim, crate::pack::DType::F32).numel() * compute.elt_size_in_bytes()
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
    }

    /// All or nothing, before the session's slots change: every probe installed is resident,
    /// or has its bytes here ([`ScoringError::Evicted`] names those that have neither), and
    /// the ones to copy fit. Then they are copied in (all of a request's copies in one upload
    /// round), and the slot operations only take and move pins.
    fn apply(
        &mut self,
        session: SessionId,
        ops: &[SlotOp],
        bytes: &HashMap<ProbeId, Arc<ProbeBytes>>,
    ) -> Result<(), ScoringError> {
        self.sessions.get_mut(session)?;
        let mut installed: Vec<ProbeId> = ops.iter().filter_map(SlotOp::installed).collect();
        installed.sort_unstable();
        installed.dedup();
        // Resident probes are pinned first, so that copying the others in cannot evict them.
        let mut held = Vec::new();
        let (mut new, mut missing) = (Vec::new(), Vec::new());
        for &id in &installed {
            match Book::pin(&self.book, id) {
                Some(pin) => held.push(pin),
                None if bytes.contains_key(&id) => new.push(id),
                None => missing.push(id),
            }
        }
        if !missing.is_empty() {
            return Err(ScoringError::Evicted(missing));
        }
        self.copy_in(&new, bytes, false)?;
        let (book, traffic) = (&self.book, &mut self.traffic);
        let table = self.sessions.get_mut(session)?;
        let mut pins: u64 = 0;
        let applied = table.apply(ops, traffic, |id| {
            pins += 1;
            Book::pin(book, id).ok_or(ScoringError::Evicted(vec![id]))
        });
        // Copies count in the traffic as they happen; every other install is a reference.
        self.traffic.installs += pins.saturating_sub(new.len() as u64);
        let mut b = self.book.lock().expect("store book");
        held.iter().for_each(|p| b.count_hit(p.id()));
        drop(b);
        drop(held);
        applied
    }

    /// The union of store rows, scored against every hidden state of the step in one pass
    /// (on an accelerator the extra probe × state pairs cost less than a launch per subset).
    fn score(&mut self, step: &[Request], faults: &Faults) -> Result<StepScores, ScoringError> {
        let mut answers: Vec<Result<Vec<f32>, ScoringError>> = Vec::with_capacity(step.len());
        let mut index: HashMap<usize, usize> = HashMap::new();
        let mut rows: Vec<usize> = Vec::new();
        let mut ids: Vec<ProbeId> = Vec::new();
        let mut hidden: Vec<&State> = Vec::new();
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
                            *index.entry(p.row()).or_insert_with(|| {
                                rows.push(p.row());
                                ids.push(p.id());
                                rows.len() - 1
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
        let out = if rows.is_empty() { Vec::new() } else { self.torch.score_slots(&rows, &hidden)? };
        for (answer, want) in answers.iter_mut().zip(wants) {
            if let Some((b, mine)) = want {
                *answer = Ok(mine.iter().map(|&u| out[u * batch + b]).collect());
            }
        }
        Ok(StepScores { answers, union: rows.len(), logits: rows.len() * batch })
    }

    fn holdings(&self) -> Holdings {
        self.sessions.holdings(|p| p.row())
    }

    fn warm(&mut self, bytes: &HashMap<ProbeId, Arc<ProbeBytes>>) {
        // On a side stream, while the last prefetch is still being copied there is no room.
        let limit = self.torch.prefetch_room(MAX_WARM);
        let new: Vec<ProbeId> = {
            let book = self.book.lock().expect("store book");
            let mut new: Vec<ProbeId> = bytes.keys().copied().filter(|&id| !book.is_resident(id)).collect();
            new.sort_unstable();
            new.truncate(book.room().min(limit));
            new
        };
        if new.is_empty() {
            return;
        }
        let n = new.len() as u64;
        if self.copy_in(&new, bytes, true).is_ok() {
            self.book.lock().expect("store book").count_prefetched(&new);
        } else {
            tracing::debug!("prefetching {n} probes into the store failed; they are left out");
        }
    }

    fn traffic(&self) -> WeightTraffic {
        // The path as it is now: graphs that failed are off.
        WeightTraffic {
            path: self.torch.path().into(),
            store: Some(self.torch.with_states(self.book.lock().expect("store book").stats())),
            ..self.traffic.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{reference_logit, ProbeRef};
    use crate::pack::{DType, ProbeId};
    use crate::runtime::faults::FaultPlan;
    use crate::runtime::scoring::tests::{bytes_for, ops, synth_pack};

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-4 * (1.0 + b.abs())
    }

    fn want(pack: &Pack, id: u32, h: &[f32]) -> f32 {
        let b = pack.read_probe(ProbeId(id)).unwrap();
        let ranges = pack.layout().ranges(&pack.tensor_offsets(ProbeId(id)));
        reference_logit(&ProbeRef { bytes: &b, ranges: &ranges }, pack.layout().dtype, h)
    }

    fn store(pack: &Arc<Pack>, rows: usize, staging_bytes: Option<u64>, faults: Faults) -> TorchBackend {
        TorchBackend::new(pack.clone(), rows, Device::Cpu, Kind::Float, staging_bytes, ProbeSet::default(), faults)
            .unwrap()
    }

    /// A four-row store with one session (4 slots) that has installed `ids`, in order, from slot 0.
    fn four_rows_holding(pack: &Arc<Pack>, ids: &[u32]) -> (TorchBackend, SessionId) {
        let mut backend = store(pack, 4, None, Faults::none());
        let s = SessionId(1);
        backend.open(s, 4);
        let ops = install(ids);
        backend.apply(s, &ops, &bytes_for(pack, &ops)).unwrap();
        (backend, s)
    }

    fn install(ids: &[u32]) -> Vec<SlotOp> {
        ids.iter().enumerate().map(|(slot, &id)| SlotOp::Install { slot, id: ProbeId(id) }).collect()
    }

    fn hidden(pack: &Pack, seed: f32) -> Vec<f32> {
        (0..pack.hidden_dim()).map(|i| (i as f32 * seed).sin()).collect()
    }

    /// Scores slots `0..len` of session `s` and checks them against the reference.
    fn check_scores(backend: &mut TorchBackend, pack: &Pack, s: u64, ids: &[u32], h: &[f32]) {
        let step = [Request { session: SessionId(s), start: 0, len: ids.len(), hidden: &State::Host(h.to_vec()) }];
        let got = backend.score(&step, &Faults::none()).unwrap().answers.pop().unwrap().unwrap();
        for (g, &id) in got.iter().zip(ids) {
            assert!(close(*g, want(pack, id, h)), "session {s}: probe {id}");
        }
    }

    /// Installs, moves and swaps in one round, through both upload paths; returns the logits
    /// of slots 0..6 and the transfers made.
    fn replay(pack: &Arc<Pack>, staging_bytes: Option<u64>, hidden: &[f32]) -> (Vec<f32>, u64) {
        let mut backend = store(pack, 8, staging_bytes, Faults::none());
        let s = SessionId(1);
        backend.open(s, 8);
        let ops = ops();
        backend.apply(s, &ops, &bytes_for(pack, &ops)).unwrap();
        let step = [Request { session: s, start: 0, len: 6, hidden: &State::Host(hidden.to_vec()) }];
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
    fn sessions_share_resident_rows_and_get_their_own_logits() {
        let (_dir, pack) = synth_pack(DType::F32);
        let mut backend = store(&pack, 4, None, Faults::none());
        for s in [1, 2] {
            backend.open(SessionId(s), 4);
        }
        let (h1, h2) = (hidden(&pack, 0.3), hidden(&pack, 0.7));
        for (s, ids) in [(1, vec![3, 7]), (2, vec![7, 9, 3])] {
            let ops = install(&ids);
            backend.apply(SessionId(s), &ops, &bytes_for(&pack, &ops)).unwrap();
        }
        let step = [
            Request { session: SessionId(1), start: 0, len: 2, hidden: &State::Host(h1.clone()) },
            Request { session: SessionId(2), start: 0, len: 3, hidden: &State::Host(h2.clone()) },
        ];
        let got: Vec<Vec<f32>> =
            backend.score(&step, &Faults::none()).unwrap().answers.into_iter().map(Result::unwrap).collect();
        for (g, id) in got[0].iter().zip([3, 7]) {
            assert!(close(*g, want(&pack, id, &h1)), "session 1: probe {id}");
        }
        for (g, id) in got[1].iter().zip([7, 9, 3]) {
            assert!(close(*g, want(&pack, id, &h2)), "session 2: probe {id}");
        }
        // Probes 3 and 7 are resident once: 3 rows for 5 references, 3 copies.
        let held = backend.holdings();
        assert_eq!((held.probes, held.refs), (3, 5));
        assert_eq!(backend.traffic().installs, 5);
        assert_eq!(backend.traffic().install_bytes_copied, 3 * pack.layout().byte_len() as u64);
        let st = backend.traffic().store.unwrap();
        assert_eq!((st.uploads, st.hits, st.resident, st.pinned), (3, 2, 3, 3));
    }

    #[test]
    fn a_probe_released_and_activated_again_is_not_copied_again_and_keeps_its_row() {
        let (_dir, pack) = synth_pack(DType::F32);
        let (mut backend, s) = four_rows_holding(&pack, &[3, 7]);
        let h = hidden(&pack, 0.3);
        let row_of_7 =
            backend.sessions.held(&Request { session: s, start: 1, len: 1, hidden: &State::Host(h.clone()) }).unwrap()
                [0]
            .row();
        // Pruning drops 7 (slot 1 is the last: no move), then 3 (its slot is overwritten).
        backend.apply(s, &[SlotOp::Move { from: 1, to: 0 }], &HashMap::new()).unwrap();
        assert_eq!(backend.holdings().probes, 1);
        let st = backend.traffic().store.unwrap();
        assert_eq!((st.resident, st.pinned), (2, 1), "3 is warm, still resident");
        // Both come back with no bytes at all: they are resident.
        let copied = backend.traffic().install_bytes_copied;
        backend.apply(s, &[SlotOp::Install { slot: 1, id: ProbeId(3) }], &HashMap::new()).unwrap();
        check_scores(&mut backend, &pack, 1, &[7, 3], &h);
        assert_eq!(backend.traffic().install_bytes_copied, copied, "no bytes copied");
        assert_eq!(
            backend.sessions.held(&Request { session: s, start: 0, len: 1, hidden: &State::Host(h.clone()) }).unwrap()
                [0]
            .row(),
            row_of_7,
            "moves move pins, never rows"
        );
        assert_eq!(backend.traffic().move_bytes_copied, 0);
        assert!(backend.view().contains(ProbeId(3)) && !backend.view().contains(ProbeId(9)));
    }

    #[test]
    fn a_request_the_store_cannot_take_is_refused_whole_and_the_slots_stay_as_they_were() {
        let (_dir, pack) = synth_pack(DType::F32);
        let mut backend =
            store(&pack, 3, None, Faults::plan(Arc::new(FaultPlan::new().fail_upload(ProbeId(13), Some(1)))));
        let (a, b) = (SessionId(1), SessionId(2));
        backend.open(a, 4);
        backend.open(b, 4);
        let h = hidden(&pack, 0.5);
        let ops = install(&[3, 7]);
        backend.apply(a, &ops, &bytes_for(&pack, &ops)).unwrap();
        // Three new probes for one free row: refused, naming the budget; a's slots intact.
        let ops = install(&[9, 11, 13]);
        let e = backend.apply(b, &ops, &bytes_for(&pack, &ops)).unwrap_err();
        assert!(e.refused_before_applying(), "{e}");
        assert!(e.to_string().contains("device.store_bytes"), "{e}");
        assert_eq!(backend.holdings().refs, 2);
        check_scores(&mut backend, &pack, 1, &[3, 7], &h);
        // A probe seen resident but evicted since, sent without bytes: refused, naming it.
        let e = backend.apply(b, &install(&[42]), &HashMap::new()).unwrap_err();
        assert!(matches!(&e, ScoringError::Evicted(ids) if ids == &[ProbeId(42)]), "{e}");
        // A failed copy: nothing becomes resident, the row is free again, and the next try works.
        let ops = install(&[13]);
        let e = backend.apply(b, &ops, &bytes_for(&pack, &ops)).unwrap_err();
        assert!(e.refused_before_applying());
        assert!(format!("{:?}", e).contains("InjectedUpload"), "{e:?}");
        assert!(!backend.view().contains(ProbeId(13)));
        assert_eq!(backend.traffic().store.unwrap().resident, 2);
        backend.apply(b, &ops, &bytes_for(&pack, &ops)).unwrap();
        check_scores(&mut backend, &pack, 2, &[13], &h);
        // Session a closes: its probes go warm, and b's new probes evict them, oldest first.
        backend.close(a);
        let ops: Vec<SlotOp> =
            [(1, 9), (2, 11)].iter().map(|&(slot, id)| SlotOp::Install { slot, id: ProbeId(id) }).collect();
        backend.apply(b, &ops, &bytes_for(&pack, &ops)).unwrap();
        check_scores(&mut backend, &pack, 2, &[13, 9, 11], &h);
        let st = backend.traffic().store.unwrap();
        assert_eq!((st.rows, st.resident, st.pinned, st.evictions), (3, 3, 3, 2));
    }

    #[test]
    fn a_dense_union_is_scored_in_place_and_a_sparse_one_gathered_and_both_agree_with_the_reference() {
        let (_dir, pack) = synth_pack(DType::Bf16);
        let mut backend = store(&pack, 16, None, Faults::none());
        let s = SessionId(1);
        backend.open(s, 8);
        let ids = [5, 17, 2, 40, 33, 9, 21, 12];
        let ops = install(&ids);
        backend.apply(s, &ops, &bytes_for(&pack, &ops)).unwrap();
        let h = hidden(&pack, 0.21);
        // All 8 (rows 0..8: dense, no gather), then the last two alone (rows 6 and 7 of 8:
        // gathered), then one in the middle.
        check_scores(&mut backend, &pack, 1, &ids, &h);
        for (start, len) in [(6, 2), (3, 1)] {
            let step = [Request { session: s, start, len, hidden: &State::Host(h.clone()) }];
            let got = backend.score(&step, &Faults::none()).unwrap().answers.pop().unwrap().unwrap();
            for (g, &id) in got.iter().zip(&ids[start..start + len]) {
                assert!(close(*g, want(&pack, id, &h)), "probe {id}");
            }
        }
    }

    #[test]
    fn prefetched_probes_are_copied_between_steps_and_their_activation_copies_nothing() {
        let (_dir, pack) = synth_pack(DType::F32);
        let (mut backend, s) = four_rows_holding(&pack, &[3, 7]);
        // Hints for three probes, one already resident; two rows are free.
        let hinted = install(&[7, 9, 11, 13]);
        backend.warm(&bytes_for(&pack, &hinted));
        let st = backend.traffic().store.unwrap();
        assert_eq!((st.prefetched, st.resident, st.pinned), (2, 4, 2), "two copied, into the free rows");
        assert!(backend.view().contains(ProbeId(9)) && backend.view().contains(ProbeId(11)));
        assert!(!backend.view().contains(ProbeId(13)), "no room left for the third: pinned rows stay");
        // The activation of a prefetched probe needs no bytes and copies nothing.
        let copied = backend.traffic().install_bytes_copied;
        let ops = [SlotOp::Install { slot: 2, id: ProbeId(9) }];
        backend.apply(s, &ops, &HashMap::new()).unwrap();
        check_scores(&mut backend, &pack, 1, &[3, 7, 9], &hidden(&pack, 0.4));
        let st = backend.traffic().store.unwrap();
        assert_eq!(backend.traffic().install_bytes_copied, copied);
        assert_eq!(st.prefetch_used, 1);
    }
}
