//! ModelPool: a stream's active probes of one model layer (its lane), and which of the lane's
//! slots holds which.
//!
//! Slots `[0, active_len)` hold the active probes, contiguously, so scoring them is one slot
//! range. Activating puts a probe at the end of the block; deactivating moves the last active
//! probe into its hole. It is the one owner of the active set: the coordinator asks it, and the
//! plan of each change comes back as [`SlotOp`]s that the scoring backend carries out in
//! order, on the session's slot table. Pure bookkeeping, unit-tested without a runtime.

use std::collections::HashMap;

use crate::pack::ProbeId;
use crate::policy::ProbeSet;

/// One step of rearranging a session's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotOp {
    /// Put the probe (whose bytes travel with the op) into the slot.
    Install { slot: usize, id: ProbeId },
    /// Move slot `from` into slot `to` (the old content of `to` is gone, `from` is empty).
    Move { from: usize, to: usize },
    /// Exchange two slots.
    Swap { a: usize, b: usize },
}

impl SlotOp {
    /// The probe this op installs, if it is an install.
    pub fn installed(&self) -> Option<ProbeId> {
        match *self {
            SlotOp::Install { id, .. } => Some(id),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("all {0} slots of the model pool are active (raise runtime.pool_slots)")]
pub struct PoolFull(pub usize);

pub struct ModelPool {
    occupant: Vec<Option<ProbeId>>,
    slot_of: HashMap<ProbeId, usize>,
    active: ProbeSet,
}

impl ModelPool {
    /// `slots` slots, for a pack of `concepts` concepts.
    pub fn new(slots: usize, concepts: usize) -> Self {
        Self { occupant: vec![None; slots], slot_of: HashMap::new(), active: ProbeSet::with_capacity(concepts) }
    }

    pub fn slots(&self) -> usize {
        self.occupant.len()
    }

    pub fn active_len(&self) -> usize {
        self.slot_of.len()
    }

    /// Active probes in slot order.
    pub fn active(&self) -> Vec<ProbeId> {
        self.occupant[..self.active_len()].iter().map(|o| o.expect("active slots are occupied")).collect()
    }

    /// The active set.
    pub fn active_set(&self) -> &ProbeSet {
        &self.active
    }

    /// The slot of an active probe.
    pub fn slot(&self, id: ProbeId) -> Option<usize> {
        self.slot_of.get(&id).copied()
    }

    pub fn is_active(&self, id: ProbeId) -> bool {
        self.active.contains(id)
    }

    /// Makes `id` active at slot `active_len` with an `Install` (the caller supplies its bytes).
    pub fn activate(&mut self, id: ProbeId, ops: &mut Vec<SlotOp>) -> Result<(), PoolFull> {
        if self.is_active(id) {
            return Ok(());
        }
        let a = self.active_len();
        if a == self.slots() {
            return Err(PoolFull(self.slots()));
        }
        self.occupant[a] = Some(id);
        self.slot_of.insert(id, a);
        self.active.insert(id);
        ops.push(SlotOp::Install { slot: a, id });
        Ok(())
    }

    /// Deactivates an active probe: the last active probe moves into its hole (one `Move`;
    /// none when it was the last one), and the last slot becomes free.
    pub fn deactivate(&mut self, id: ProbeId, ops: &mut Vec<SlotOp>) {
        let Some(s) = self.slot_of.remove(&id) else { return };
        self.active.remove(id);
        let last = self.active_len();
        if s != last {
            let tail = self.occupant[last].expect("the last active slot is occupied");
            ops.push(SlotOp::Move { from: last, to: s });
            self.occupant[s] = Some(tail);
            self.slot_of.insert(tail, s);
        }
        self.occupant[last] = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(i: u32) -> ProbeId {
        ProbeId(i)
    }

    /// Replays ops on a model of the slots and checks it matches the pool's bookkeeping.
    fn replay(slots: &mut [Option<ProbeId>], ops: &[SlotOp]) {
        for op in ops {
            match *op {
                SlotOp::Install { slot, id } => slots[slot] = Some(id),
                SlotOp::Move { from, to } => slots[to] = slots[from].take(),
                SlotOp::Swap { a, b } => slots.swap(a, b),
            }
        }
    }

    fn check(pool: &ModelPool, slots: &[Option<ProbeId>]) {
        let active = pool.active();
        assert_eq!(&slots[..active.len()], &active.iter().map(|&c| Some(c)).collect::<Vec<_>>()[..]);
        let mut sorted = active.clone();
        sorted.sort();
        assert_eq!(pool.active_set().iter().collect::<Vec<_>>(), sorted, "the set and the slots agree");
        for (i, id) in active.iter().enumerate() {
            assert_eq!(pool.slot(*id), Some(i));
        }
    }

    #[test]
    fn activation_is_contiguous_and_deactivation_fills_the_hole_with_the_last() {
        let mut pool = ModelPool::new(4, 10);
        let mut slots = vec![None; 4];
        let mut ops = Vec::new();
        for i in 0..4 {
            pool.activate(c(i), &mut ops).unwrap();
        }
        assert_eq!(pool.activate(c(9), &mut ops), Err(PoolFull(4)));
        replay(&mut slots, &ops);
        ops.clear();
        pool.deactivate(c(0), &mut ops);
        assert_eq!(ops, [SlotOp::Move { from: 3, to: 0 }]);
        replay(&mut slots, &ops);
        check(&pool, &slots);
        assert_eq!(pool.active(), vec![c(3), c(1), c(2)]);
        ops.clear();
        pool.deactivate(c(2), &mut ops);
        assert!(ops.is_empty(), "the last active probe leaves no hole");
        pool.activate(c(0), &mut ops).unwrap();
        assert_eq!(ops, [SlotOp::Install { slot: 2, id: c(0) }]);
    }

    #[test]
    fn random_churn_keeps_bookkeeping_and_slots_in_step() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut pool = ModelPool::new(12, 20);
        let mut slots = vec![None; 12];
        for _ in 0..2000 {
            let mut ops = Vec::new();
            let id = c(rng.random_range(0..20));
            if pool.is_active(id) {
                pool.deactivate(id, &mut ops);
            } else if pool.active_len() < 10 {
                pool.activate(id, &mut ops).unwrap();
            }
            replay(&mut slots, &ops);
            check(&pool, &slots);
        }
    }
}
