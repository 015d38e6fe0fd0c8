//! ModelPool: which probe lives in which slot of the device arena.
//!
//! Slots `[0, active_len)` hold the active probes, contiguously, so inference runs on one
//! `narrow()` view. Behind them sit warm probes (resident but inactive) and free slots. A warm
//! probe is reactivated by swapping it to the end of the active block: no bytes from the host.
//! Deactivating moves the probe to a free slot and the last active one into its hole. Pure bookkeeping: the plan comes back
//! as [`SlotOp`]s that the inference thread carries out in order.

use std::collections::HashMap;

use lru::LruCache;

use crate::pack::ConceptId;

/// One step of rearranging the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotOp {
    /// Copy the probe's bytes from the host into the slot.
    Install { slot: usize, id: ConceptId },
    /// Copy slot `from` into slot `to` (the old content of `to` is gone).
    Move { from: usize, to: usize },
    /// Exchange two slots.
    Swap { a: usize, b: usize },
}

impl SlotOp {
    /// The probe this op installs, if it is an install.
    pub fn installed(&self) -> Option<ConceptId> {
        match *self {
            SlotOp::Install { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// Where a probe is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    Active(usize),
    Warm(usize),
    Absent,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("all {0} slots of the model pool are active (raise runtime.pool_slots)")]
pub struct PoolFull(pub usize);

pub struct ModelPool {
    /// Keep deactivated probes resident (worth it on a GPU, where a slot copy is far cheaper
    /// than a host-to-device transfer; on a CPU a reinstall from RAM costs the same as the
    /// copy that keeping it warm takes, so there deactivation just fills the hole).
    keep_warm: bool,
    occupant: Vec<Option<ConceptId>>,
    slot_of: HashMap<ConceptId, usize>,
    active_len: usize,
    /// Warm probes, most recently deactivated first out of eviction.
    warm: LruCache<ConceptId, ()>,
}

impl ModelPool {
    pub fn new(slots: usize, keep_warm: bool) -> Self {
        Self {
            keep_warm,
            occupant: vec![None; slots],
            slot_of: HashMap::new(),
            active_len: 0,
            warm: LruCache::unbounded(),
        }
    }

    pub fn slots(&self) -> usize {
        self.occupant.len()
    }

    pub fn active_len(&self) -> usize {
        self.active_len
    }

    /// Active probes in slot order.
    pub fn active(&self) -> Vec<ConceptId> {
        self.occupant[..self.active_len].iter().map(|o| o.expect("active slots are occupied")).collect()
    }

    pub fn residency(&self, id: ConceptId) -> Residency {
        match self.slot_of.get(&id) {
            Some(&s) if s < self.active_len => Residency::Active(s),
            Some(&s) => Residency::Warm(s),
            None => Residency::Absent,
        }
    }

    fn place(&mut self, slot: usize, id: Option<ConceptId>) {
        if let Some(old) = self.occupant[slot] {
            if self.slot_of.get(&old) == Some(&slot) {
                self.slot_of.remove(&old);
            }
        }
        self.occupant[slot] = id;
        if let Some(id) = id {
            self.slot_of.insert(id, slot);
        }
    }

    fn swap(&mut self, a: usize, b: usize, ops: &mut Vec<SlotOp>) {
        if a == b {
            return;
        }
        let (x, y) = (self.occupant[a], self.occupant[b]);
        self.occupant[a] = y;
        self.occupant[b] = x;
        if let Some(x) = x {
            self.slot_of.insert(x, b);
        }
        if let Some(y) = y {
            self.slot_of.insert(y, a);
        }
        match (x, y) {
            (Some(_), Some(_)) => ops.push(SlotOp::Swap { a, b }),
            (Some(_), None) => ops.push(SlotOp::Move { from: a, to: b }),
            (None, Some(_)) => ops.push(SlotOp::Move { from: b, to: a }),
            (None, None) => {}
        }
    }

    /// Makes `id` active at slot `active_len`. Absent probes get an `Install` (the caller must
    /// supply their bytes); warm ones just move.
    pub fn activate(&mut self, id: ConceptId, ops: &mut Vec<SlotOp>) -> Result<(), PoolFull> {
        match self.residency(id) {
            Residency::Active(_) => return Ok(()),
            Residency::Warm(w) => {
                self.warm.pop(&id);
                let a = self.active_len;
                self.swap(w, a, ops);
            }
            Residency::Absent => {
                let a = self.active_len;
                if a == self.slots() {
                    return Err(PoolFull(self.slots()));
                }
                if let Some(resident) = self.occupant[a] {
                    // Slot a holds a warm probe: keep it warm elsewhere if a slot is free,
                    // else evict the least recently used warm probe to make room.
                    let free = (a + 1..self.slots()).rev().find(|&s| self.occupant[s].is_none());
                    let target = match free {
                        Some(f) => Some(f),
                        None => {
                            let (victim, ()) = self.warm.pop_lru().expect("a warm probe occupies slot a");
                            let vs = self.slot_of[&victim];
                            self.place(vs, None);
                            (vs != a).then_some(vs)
                        }
                    };
                    if let Some(t) = target {
                        if self.occupant[a] == Some(resident) {
                            self.swap(a, t, ops);
                        }
                    }
                }
                self.place(a, Some(id));
                ops.push(SlotOp::Install { slot: a, id });
            }
        }
        self.active_len += 1;
        Ok(())
    }

    /// Makes an active probe warm: it moves to a free slot behind the active block (evicting the
    /// coldest warm probe if none is free) and the last active probe fills its hole. Two slot
    /// copies, against three for a swap through scratch; none when it was the last active one.
    pub fn deactivate(&mut self, id: ConceptId, ops: &mut Vec<SlotOp>) {
        let Residency::Active(s) = self.residency(id) else { return };
        let last = self.active_len - 1;
        if !self.keep_warm {
            if s != last {
                let tail = self.occupant[last];
                ops.push(SlotOp::Move { from: last, to: s });
                self.place(s, tail);
            }
            self.place(last, None);
            self.slot_of.remove(&id);
            self.active_len -= 1;
            return;
        }
        if s != last {
            // Warm probes live at the far end, so the slot after the active block stays free
            // for the next activation.
            let free = (self.active_len..self.slots()).rev().find(|&x| self.occupant[x].is_none()).or_else(|| {
                let (victim, ()) = self.warm.pop_lru()?;
                let slot = self.slot_of[&victim];
                self.place(slot, None);
                Some(slot)
            });
            match free {
                Some(f) => {
                    ops.push(SlotOp::Move { from: s, to: f });
                    self.place(f, Some(id));
                    let tail = self.occupant[last];
                    ops.push(SlotOp::Move { from: last, to: s });
                    self.place(s, tail);
                    self.place(last, None);
                }
                // Every slot is active: swap through scratch.
                None => self.swap(s, last, ops),
            }
        }
        self.active_len -= 1;
        self.warm.put(id, ());
    }

    /// Forgets an active probe entirely (its slot becomes free), e.g. after a failed install.
    pub fn discard(&mut self, id: ConceptId, ops: &mut Vec<SlotOp>) {
        self.deactivate(id, ops);
        self.warm.pop(&id);
        if let Some(&s) = self.slot_of.get(&id) {
            self.place(s, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(i: u32) -> ConceptId {
        ConceptId(i)
    }

    /// Replays ops on a model of the arena and checks it matches the pool's bookkeeping.
    fn replay(arena: &mut [Option<ConceptId>], ops: &[SlotOp]) {
        for op in ops {
            match *op {
                SlotOp::Install { slot, id } => arena[slot] = Some(id),
                SlotOp::Move { from, to } => arena[to] = arena[from],
                SlotOp::Swap { a, b } => arena.swap(a, b),
            }
        }
    }

    fn check(pool: &ModelPool, arena: &[Option<ConceptId>]) {
        for (slot, occ) in pool.occupant.iter().enumerate() {
            if let Some(id) = occ {
                assert_eq!(arena[slot], Some(*id), "slot {slot}");
                assert_eq!(pool.slot_of.get(id), Some(&slot), "slot {slot} is {id:?}'s");
            }
        }
        assert_eq!(pool.slot_of.len(), pool.occupant.iter().flatten().count());
    }

    #[test]
    fn activation_is_contiguous_and_warm_probes_come_back_without_bytes() {
        let mut pool = ModelPool::new(4, true);
        let mut arena = vec![None; 4];
        let mut ops = Vec::new();
        for i in 0..3 {
            pool.activate(c(i), &mut ops).unwrap();
        }
        replay(&mut arena, &ops);
        assert_eq!(pool.active(), vec![c(0), c(1), c(2)]);
        ops.clear();
        pool.deactivate(c(0), &mut ops);
        replay(&mut arena, &ops);
        check(&pool, &arena);
        assert_eq!(pool.active(), vec![c(2), c(1)]);
        assert_eq!(pool.residency(c(0)), Residency::Warm(3), "moved to the free slot");
        ops.clear();
        pool.activate(c(0), &mut ops).unwrap();
        assert!(ops.iter().all(|op| !matches!(op, SlotOp::Install { .. })), "{ops:?}");
        replay(&mut arena, &ops);
        check(&pool, &arena);
        assert_eq!(pool.residency(c(0)), Residency::Active(2));
    }

    #[test]
    fn a_new_probe_keeps_warm_ones_in_free_slots_then_evicts_the_coldest() {
        let mut pool = ModelPool::new(4, true);
        let mut arena = vec![None; 4];
        let mut ops = Vec::new();
        for i in 0..4 {
            pool.activate(c(i), &mut ops).unwrap();
        }
        assert_eq!(pool.activate(c(9), &mut ops), Err(PoolFull(4)));
        pool.deactivate(c(1), &mut ops);
        pool.deactivate(c(2), &mut ops);
        replay(&mut arena, &ops);
        check(&pool, &arena);
        // Two warm probes, no free slot: activating 5 evicts the colder warm probe (1).
        ops.clear();
        pool.activate(c(5), &mut ops).unwrap();
        replay(&mut arena, &ops);
        check(&pool, &arena);
        assert_eq!(pool.residency(c(1)), Residency::Absent);
        assert!(matches!(pool.residency(c(2)), Residency::Warm(_)));
        assert_eq!(pool.active_len(), 3);
        // Discarding frees the slot.
        ops.clear();
        pool.discard(c(5), &mut ops);
        assert_eq!(pool.residency(c(5)), Residency::Absent);
        assert_eq!(pool.active_len(), 2);
    }

    #[test]
    fn random_churn_keeps_bookkeeping_and_arena_in_step() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for keep_warm in [true, false] {
            let mut pool = ModelPool::new(12, keep_warm);
            let mut arena = vec![None; 12];
            for _ in 0..2000 {
                let mut ops = Vec::new();
                let id = c(rng.random_range(0..20));
                match pool.residency(id) {
                    Residency::Active(_) => pool.deactivate(id, &mut ops),
                    _ => {
                        if pool.active_len() < 10 {
                            pool.activate(id, &mut ops).unwrap();
                        }
                    }
                }
                replay(&mut arena, &ops);
                check(&pool, &arena);
                let active = pool.active();
                let mut sorted = active.clone();
                sorted.sort();
                sorted.dedup();
                assert_eq!(sorted.len(), active.len(), "no probe twice");
            }
        }
    }
}
