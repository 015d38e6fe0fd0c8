//! The resident store's bookkeeping: which of the store's rows holds which probe, which rows
//! are pinned, and which are warm and may be evicted. Pure policy, tested without tch: the tch
//! backend ([`super::torch`]) owns one [`Book`] and the tensors whose rows it describes.
//!
//! Why a store and not per-session slots: on a device, copying a probe in is what costs (the
//! bytes cross PCIe), so a probe, once copied, stays until its row is needed for another. A
//! session's slots hold [`Pin`]s, which name rows: activation takes a pin on a resident row,
//! pruning moves pins between slots, and neither touches a weight byte.
//!
//! - **Pinned**: a row held by any session's slot (a reference count: one per slot holding
//!   it), or a base probe of the runtime's config, pinned for good once it is resident.
//! - **Warm**: resident, held by nobody; evicted least recently released first
//!   ([`lru::LruCache`], the crate the weight cache uses too) when a probe needs a row and no
//!   row is free.
//! - **Budget**: the store has a fixed number of rows (`device.store_bytes`, or by default
//!   the whole pack where it fits); nothing here allocates more.
//!
//! The [`ResidentView`] is what the coordinators read to skip fetching bytes for a probe the
//! store already holds. The book is its only writer; a reader may see a probe as resident
//! that is evicted before its install arrives, which the backend answers with
//! [`super::ScoringError::Evicted`], without touching the session's slots, so the coordinator
//! fetches the bytes and asks again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::pack::ProbeId;
use crate::policy::ProbeSet;
pub use crate::types::StoreStats;

/// Which probes the store holds now, readable from any thread.
#[derive(Debug)]
pub struct ResidentView {
    resident: Vec<AtomicBool>,
}

impl ResidentView {
    fn new(concepts: usize) -> Self {
        Self { resident: (0..concepts).map(|_| AtomicBool::new(false)).collect() }
    }

    /// Whether the store held `id` when asked (it may be evicted right after).
    pub fn contains(&self, id: ProbeId) -> bool {
        self.resident.get(id.0 as usize).is_some_and(|r| r.load(Ordering::Acquire))
    }

    fn set(&self, id: ProbeId, resident: bool) {
        if let Some(r) = self.resident.get(id.0 as usize) {
            r.store(resident, Ordering::Release);
        }
    }
}

/// Why the store cannot take a request's probes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the resident store is full: device.store_bytes = {store_bytes} holds {rows} probes, {pinned} of them \
     pinned by open sessions and base layers, and {need} more are needed with {left} rows left to free \
     (close a session, lower cascade.max_loaded, or raise device.store_bytes)"
)]
pub struct StoreFull {
    pub store_bytes: u64,
    pub rows: usize,
    pub pinned: usize,
    pub need: usize,
    pub left: usize,
}

/// A slot's hold on a store row: the row stays resident (pinned) while any pin of it lives.
pub struct Pin {
    row: usize,
    id: ProbeId,
    book: Arc<Mutex<Book>>,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pin(row {} = probe {})", self.row, self.id.0)
    }
}

impl Pin {
    pub fn row(&self) -> usize {
        self.row
    }

    pub fn id(&self) -> ProbeId {
        self.id
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        // A poisoned lock means a panic mid-update elsewhere; the count is then moot.
        if let Ok(mut book) = self.book.lock() {
            book.release(self.row);
        }
    }
}

/// The rows of the store and their states. Shared as `Arc<Mutex<Book>>` so that a [`Pin`]
/// can give its row back when it drops; only the scoring thread touches it.
pub struct Book {
    row_bytes: usize,
    id_of: Vec<Option<ProbeId>>,
    refs: Vec<u32>,
    row_of: HashMap<ProbeId, usize>,
    /// Resident rows held by nobody, least recently released first out.
    warm: LruCache<ProbeId, ()>,
    free: Vec<usize>,
    /// Base probes: pinned for good once resident.
    forever: ProbeSet,
    /// Prefetched probes not activated yet.
    hinted: ProbeSet,
    view: Arc<ResidentView>,
    stats: StoreStats,
}

impl Book {
    /// A store of `rows` rows of `row_bytes` each, for a pack of `concepts` concepts; `forever`
    /// are the probes never evicted once in.
    pub fn new(rows: usize, row_bytes: usize, concepts: usize, forever: ProbeSet) -> Self {
        Self {
            row_bytes,
            id_of: vec![None; rows],
            refs: vec![0; rows],
            row_of: HashMap::new(),
            warm: LruCache::unbounded(),
            free: (0..rows).rev().collect(),
            forever,
            hinted: ProbeSet::with_capacity(concepts),
            view: Arc::new(ResidentView::new(concepts)),
            stats: StoreStats::default(),
        }
    }

    pub fn view(&self) -> Arc<ResidentView> {
        self.view.clone()
    }

    pub fn rows(&self) -> usize {
        self.id_of.len()
    }

    pub fn is_resident(&self, id: ProbeId) -> bool {
        self.row_of.contains_key(&id)
    }

    /// Rows that taking new probes could use now: free ones and warm ones.
    pub fn room(&self) -> usize {
        self.free.len() + self.warm.len()
    }

    fn pinned(&self) -> usize {
        self.row_of.len() - self.warm.len()
    }

    /// Whether `need` more probes fit, or the error naming the budget.
    pub fn check_room(&self, need: usize) -> Result<(), StoreFull> {
        if need <= self.room() {
            return Ok(());
        }
        Err(StoreFull {
            store_bytes: (self.rows() * self.row_bytes) as u64,
            rows: self.rows(),
            pinned: self.pinned(),
            need,
            left: self.room(),
        })
    }

    /// A row for `id`, which is not resident: a free one, else the least recently released
    /// warm one (evicted). The row counts as pinned by the caller until [`Book::filled`] or
    /// [`Book::unfilled`].
    pub fn take_row(&mut self, id: ProbeId) -> Result<usize, StoreFull> {
        debug_assert!(!self.is_resident(id));
        let row = match self.free.pop() {
            Some(row) => row,
            None => {
                let (old, ()) = self.warm.pop_lru().ok_or_else(|| self.check_room(1).unwrap_err())?;
                let row = self.row_of.remove(&old).expect("a warm probe has a row");
                self.view.set(old, false);
                self.hinted.remove(old);
                self.id_of[row] = None;
                self.stats.evictions += 1;
                row
            }
        };
        self.id_of[row] = Some(id);
        self.row_of.insert(id, row);
        Ok(row)
    }

    /// The probe's bytes are in its row: it is resident, and warm until pinned.
    pub fn filled(&mut self, row: usize) {
        let id = self.id_of[row].expect("a taken row");
        self.stats.uploads += 1;
        self.view.set(id, true);
        if self.refs[row] == 0 {
            self.park(id);
        }
    }

    /// Copying into a taken row failed: the row is free again, holding nothing.
    pub fn unfilled(&mut self, row: usize) {
        if let Some(id) = self.id_of[row].take() {
            self.row_of.remove(&id);
            self.view.set(id, false);
        }
        self.refs[row] = 0;
        self.free.push(row);
    }

    /// A pin on resident probe `id` (`None` if it is not resident).
    pub fn pin(book: &Arc<Mutex<Book>>, id: ProbeId) -> Option<Pin> {
        let mut b = book.lock().expect("store book");
        let row = *b.row_of.get(&id)?;
        if b.refs[row] == 0 {
            b.warm.pop(&id);
        }
        b.refs[row] += 1;
        Some(Pin { row, id, book: book.clone() })
    }

    /// Counts an install that found its probe resident (and, the first time, a prefetched
    /// probe that was used).
    pub fn count_hit(&mut self, id: ProbeId) {
        self.stats.hits += 1;
        if self.hinted.remove(id) {
            self.stats.prefetch_used += 1;
        }
    }

    /// `ids` were copied in ahead of their activation (prefetch hints).
    pub fn count_prefetched(&mut self, ids: &[ProbeId]) {
        self.stats.prefetched += ids.len() as u64;
        ids.iter().for_each(|&id| {
            self.hinted.insert(id);
        });
    }

    fn release(&mut self, row: usize) {
        self.refs[row] = self.refs[row].saturating_sub(1);
        if self.refs[row] == 0 {
            if let Some(id) = self.id_of[row] {
                self.park(id);
            }
        }
    }

    /// A row nobody holds: warm, or pinned for good if it is a base probe.
    fn park(&mut self, id: ProbeId) {
        if !self.forever.contains(id) {
            self.warm.put(id, ());
        }
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            rows: self.rows(),
            row_bytes: self.row_bytes,
            resident: self.row_of.len(),
            pinned: self.pinned(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(i: u32) -> ProbeId {
        ProbeId(i)
    }

    fn book(rows: usize, forever: &[u32]) -> Arc<Mutex<Book>> {
        let mut set = ProbeSet::with_capacity(64);
        forever.iter().for_each(|&i| {
            set.insert(c(i));
        });
        Arc::new(Mutex::new(Book::new(rows, 100, 64, set)))
    }

    /// Rows held by slots, and the slots' references to them.
    fn held(b: &Book) -> (usize, usize) {
        (b.refs.iter().filter(|&&r| r > 0).count(), b.refs.iter().map(|&r| r as usize).sum())
    }

    /// Copies `id` in (as the backend does) and pins it.
    fn load(b: &Arc<Mutex<Book>>, id: u32) -> Result<Pin, StoreFull> {
        if let Some(p) = Book::pin(b, c(id)) {
            b.lock().unwrap().count_hit(c(id));
            return Ok(p);
        }
        let row = b.lock().unwrap().take_row(c(id))?;
        b.lock().unwrap().filled(row);
        Ok(Book::pin(b, c(id)).unwrap())
    }

    #[test]
    fn a_released_probe_stays_resident_and_is_pinned_again_without_a_copy() {
        let b = book(4, &[]);
        let p = load(&b, 7).unwrap();
        let row = p.row();
        drop(p);
        assert!(b.lock().unwrap().view().contains(c(7)));
        let again = load(&b, 7).unwrap();
        assert_eq!(again.row(), row, "same row: no bytes moved");
        let s = b.lock().unwrap().stats();
        assert_eq!((s.uploads, s.hits, s.resident, s.pinned), (1, 1, 1, 1));
    }

    #[test]
    fn eviction_takes_the_least_recently_released_warm_probe_never_a_pinned_or_base_one() {
        let b = book(4, &[0]);
        let base = load(&b, 0).unwrap();
        drop(base); // a base probe: pinned for good
        let held = load(&b, 1).unwrap();
        let (p2, p3) = (load(&b, 2).unwrap(), load(&b, 3).unwrap());
        drop(p3);
        drop(p2); // 3 released first, then 2
        let _p4 = load(&b, 4).unwrap();
        let view = b.lock().unwrap().view();
        assert!(!view.contains(c(3)), "3 was the least recently released");
        assert!(view.contains(c(2)) && view.contains(c(0)) && view.contains(c(1)));
        let _p5 = load(&b, 5).unwrap();
        assert!(!view.contains(c(2)));
        // Rows: 0 (base), 1 (held), 4 and 5 (held): nothing left to evict.
        let e = load(&b, 6).unwrap_err();
        assert_eq!((e.rows, e.pinned, e.need, e.left), (4, 4, 1, 0));
        assert!(e.to_string().contains("device.store_bytes = 400"), "{e}");
        drop(held);
        assert_eq!(load(&b, 6).unwrap().row(), 1, "1's row, reused");
        assert_eq!(b.lock().unwrap().stats().evictions, 3);
    }

    #[test]
    fn a_failed_copy_leaves_its_row_free_and_the_probe_absent() {
        let b = book(2, &[]);
        let row = b.lock().unwrap().take_row(c(9)).unwrap();
        b.lock().unwrap().unfilled(row);
        let bk = b.lock().unwrap();
        assert!(!bk.is_resident(c(9)) && !bk.view().contains(c(9)));
        assert_eq!(bk.room(), 2);
    }

    #[test]
    fn random_churn_never_exceeds_the_rows_and_never_evicts_a_pinned_probe() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let b = book(8, &[0, 1]);
        let mut pins: Vec<Pin> = Vec::new();
        for _ in 0..5000 {
            if rng.random_bool(0.55) && pins.len() < 8 {
                match load(&b, rng.random_range(0..40)) {
                    Ok(p) => pins.push(p),
                    Err(e) => assert_eq!(e.left, 0, "refused only when nothing can be freed"),
                }
            } else if !pins.is_empty() {
                pins.swap_remove(rng.random_range(0..pins.len()));
            }
            let bk = b.lock().unwrap();
            let s = bk.stats();
            assert!(s.resident <= 8);
            for p in &pins {
                assert_eq!(bk.row_of.get(&p.id()), Some(&p.row()), "a pinned probe keeps its row");
                assert!(bk.view.contains(p.id()));
            }
            let (held, refs) = held(&bk);
            assert!(held <= s.pinned && refs == pins.len());
        }
    }
}
