//! The CPU kernel backend ([`crate::kernel`]): a slot holds a reference to the probe's bytes in
//! the weight cache, which keeps them (pinned) while any slot does. Scoring reads them where
//! they lie, in their stored dtype; an install and every move or swap of pruning only move
//! references, so no weight byte is copied. A probe active in several sessions is one cache
//! entry held several times, and a step reads it once for all of them.

use std::collections::HashMap;
use std::sync::Arc;

use super::{check_faults, Holdings, Request, ScoringBackend, ScoringError, StepScores, Tables};
use crate::engine::tensors::device_name;
use crate::kernel::{Kernel, ProbeRef};
use crate::pack::{Pack, ProbeId};
use crate::runtime::cache::ProbeBytes;
use crate::runtime::faults::Faults;
use crate::runtime::pool::SlotOp;
use crate::types::{SessionId, WeightTraffic};

/// A slot's probe: the cache's entry and where its six tensors lie in it.
pub struct Held {
    bytes: Arc<ProbeBytes>,
    ranges: [std::ops::Range<usize>; 6],
}

impl Held {
    fn probe(&self) -> ProbeRef<'_> {
        ProbeRef { bytes: &self.bytes, ranges: &self.ranges }
    }
}

pub struct KernelBackend {
    pack: Arc<Pack>,
    kernel: Kernel,
    path: &'static str,
    sessions: Tables<Held>,
    traffic: WeightTraffic,
}

impl KernelBackend {
    pub fn new(pack: Arc<Pack>, kernel: Kernel, path: &'static str) -> Self {
        Self { pack, kernel, path, sessions: Tables::default(), traffic: WeightTraffic::new(path) }
    }
}

impl ScoringBackend for KernelBackend {
    fn path(&self) -> &'static str {
        self.path
    }

    fn open(&mut self, session: SessionId, slots: usize) {
        self.sessions.open(session, slots);
    }

    fn close(&mut self, session: SessionId) {
        self.sessions.close(session);
    }

    fn apply(
        &mut self,
        session: SessionId,
        ops: &[SlotOp],
        bytes: &HashMap<ProbeId, Arc<ProbeBytes>>,
    ) -> Result<(), ScoringError> {
        let table = self.sessions.get_mut(session)?;
        let pack = &self.pack;
        let mut installs = 0;
        let applied = table.apply(ops, &mut self.traffic, |id| {
            let b = bytes.get(&id).ok_or(ScoringError::MissingBytes(id))?;
            installs += 1; // a reference: no bytes copied
            Ok(Held { bytes: b.clone(), ranges: pack.layout().ranges(&pack.tensor_offsets(id)) })
        });
        self.traffic.installs += installs;
        applied
    }

    /// One `score_sets` call: the union of the step's probes, keyed by probe (any session's
    /// reference: the same entry, or the same file bytes), each scored against the hidden
    /// states of the requests that hold it, not all of them. A panic in the kernel is caught
    /// by the scheduler: the kernel only reads its inputs and writes `out`, which is dropped.
    fn score(&mut self, step: &[Request], faults: &Faults) -> Result<StepScores, ScoringError> {
        let mut answers: Vec<Result<Vec<f32>, ScoringError>> = Vec::with_capacity(step.len());
        let mut index: HashMap<ProbeId, usize> = HashMap::new();
        let mut probes: Vec<ProbeRef> = Vec::new();
        let mut sets: Vec<Vec<usize>> = Vec::new();
        let mut hidden: Vec<&[f32]> = Vec::new();
        // Per request: (union index, position in that probe's set) for each of its slots.
        let mut wants: Vec<Option<Vec<(usize, usize)>>> = Vec::with_capacity(step.len());
        for r in step {
            let held = match self.sessions.held(r) {
                Ok(h) => h,
                Err(e) => {
                    answers.push(Err(e));
                    wants.push(None);
                    continue;
                }
            };
            let Some(h) = r.hidden.host() else {
                let device = r.hidden.device().map(|t| device_name(t.device())).unwrap_or_default();
                answers.push(Err(ScoringError::NotOnHost { device, path: self.path() }));
                wants.push(None);
                continue;
            };
            let b = hidden.len();
            hidden.push(h);
            let mine = held
                .into_iter()
                .map(|h| {
                    let u = *index.entry(h.bytes.id).or_insert_with(|| {
                        probes.push(h.probe());
                        sets.push(Vec::new());
                        probes.len() - 1
                    });
                    sets[u].push(b);
                    (u, sets[u].len() - 1)
                })
                .collect();
            answers.push(Ok(Vec::new()));
            wants.push(Some(mine));
        }
        check_faults(faults, index.keys().copied())?;
        let mut offsets = Vec::with_capacity(sets.len());
        let mut total = 0;
        for s in &sets {
            offsets.push(total);
            total += s.len();
        }
        let set_refs: Vec<&[usize]> = sets.iter().map(|s| &s[..]).collect();
        let mut out = vec![0f32; total];
        if !probes.is_empty() {
            self.kernel.score_sets(&probes, &set_refs, &hidden, &mut out)?;
        }
        for (answer, mine) in answers.iter_mut().zip(wants) {
            if let Some(mine) = mine {
                *answer = Ok(mine.iter().map(|&(u, pos)| out[offsets[u] + pos]).collect());
            }
        }
        Ok(StepScores { answers, union: probes.len(), logits: total })
    }

    fn holdings(&self) -> Holdings {
        self.sessions.holdings(|h| h.bytes.id)
    }

    fn traffic(&self) -> WeightTraffic {
        self.traffic.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::Isa;
    use crate::pack::DType;
    use crate::runtime::scoring::tests::{bytes_for, ops, synth_pack};
    use crate::runtime::scoring::State;

    #[test]
    fn the_cpu_kernel_moves_references_and_scores_them_in_place() {
        for dtype in [DType::F32, DType::Bf16] {
            let (_dir, pack) = synth_pack(dtype);
            let kernel = Kernel::new(&pack.layout(), Isa::best(), 2).unwrap();
            let mut backend = KernelBackend::new(pack.clone(), kernel, Isa::best().name());
            let s = SessionId(1);
            backend.open(s, 8);
            let ops = ops();
            let bytes = bytes_for(&pack, &ops);
            backend.apply(s, &ops, &bytes).unwrap();
            let hidden: Vec<f32> = (0..pack.hidden_dim()).map(|i| (i as f32 * 0.37).sin()).collect();
            let state = State::Host(hidden.clone());
            let request = |len| [Request { session: s, start: 0, len, hidden: &state }];
            let got = backend.score(&request(6), &Faults::none()).unwrap().answers.pop().unwrap().unwrap();
            // Bit for bit what the kernel gives those probes scored directly, in that order.
            let order = [11, 19, 7, 23, 42, 3].map(ProbeId);
            let ranges: Vec<_> = order.iter().map(|&id| pack.layout().ranges(&pack.tensor_offsets(id))).collect();
            let refs: Vec<ProbeRef> =
                order.iter().zip(&ranges).map(|(id, r)| ProbeRef { bytes: &bytes[id], ranges: r }).collect();
            let mut want = vec![0.0; 6];
            Kernel::new(&pack.layout(), Isa::Scalar, 1).unwrap().score(&refs, &[&hidden], &mut want).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{dtype:?}");
            // The slots hold the cache's own buffers: nothing was copied, by installs or moves.
            let t = backend.traffic();
            assert_eq!((t.installs, t.moves, t.install_bytes_copied, t.move_bytes_copied), (6, 2, 0, 0));
            assert_eq!(Arc::strong_count(&bytes[&ProbeId(3)]), 2, "slot 5 pins probe 3's bytes");
            // A slot left empty by a move is an error to score, not stale data.
            let mut empty = backend.score(&request(8), &Faults::none()).unwrap().answers;
            assert!(matches!(empty.pop().unwrap(), Err(ScoringError::EmptySlot(6))));
            backend.close(s);
            assert_eq!(Arc::strong_count(&bytes[&ProbeId(3)]), 1, "closing lets go of the bytes");
        }
    }
}
