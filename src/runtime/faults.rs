//! Fault injection: a plan of failures to cause at chosen probes, for the reliability tests
//! (tests/faults.rs, docs/reliability.md "Faults").
//!
//! A plan is handed to [`Runtime::start_with_faults`](super::Runtime::start_with_faults) or
//! [`Cascade::start_with_faults`](super::Cascade::start_with_faults); the plain `start`s use
//! none, and then every check below is one `Option` test. Each fault names the probe it hits
//! and how many times it fires (`times`, `None` = every time), so a test can make a fault
//! transient (the runtime must recover) or permanent (it must keep failing, by name, only
//! what needs that probe).
//!
//! - Read faults act where the real reader hands back a completion (a thread between its
//!   completion channel and the cache's: [`inject`]), so they go through the io_uring or thread reader, the cache's checks and its waiters exactly
//!   as a failing disk would: EIO, a short read (fewer bytes than asked), a slow read, and
//!   corrupted bytes (a CRC mismatch).
//! - `refuse_io_uring` makes the kernel "say no" to io_uring, as seccomp does.
//! - Panics fire in the named actor while it handles a message involving the probe.
//! - `fail_step` makes the scoring thread fail mid-step: the step scheduler's kernel call for
//!   a step scoring the probe (a `Cascade` is one session, so it is the same scheduler).
//! - `fail_upload` makes copying the probe into the tch backend's resident store fail (a
//!   failed transfer, an exhausted device), before any session's slots change.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::reader::{ProbeReader, ReadCompletion};
use crate::pack::ProbeId;

/// What a faulty read does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFault {
    /// The read fails with EIO.
    Eio,
    /// The read returns half the bytes asked for.
    Short,
    /// The read completes correctly, this much later.
    Slow(Duration),
    /// The read returns the right length with one byte flipped.
    Corrupt,
}

/// Where an injected panic fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PanicSite {
    /// A session's coordinator, as it activates the probe.
    Coordinator,
    /// The weight cache, handling a fetch, a look-up or a prefetch hint of the probe.
    Cache,
    /// The scoring thread: a runtime's step scheduler, scoring a step that holds the probe,
    /// (every stream's, a `Cascade`'s included).
    Scoring,
}

/// A fault at one probe, firing `times` times (`None`: every time).
#[derive(Debug)]
struct Armed<F> {
    fault: F,
    probe: ProbeId,
    times: Option<u64>,
    fired: AtomicU64,
}

impl<F: Copy> Armed<F> {
    fn fire(&self, probe: ProbeId) -> Option<F> {
        if probe != self.probe {
            return None;
        }
        let n = self.fired.fetch_add(1, Ordering::SeqCst);
        match self.times {
            Some(t) if n >= t => None,
            _ => Some(self.fault),
        }
    }
}

/// The faults to inject. Build with the methods; share as `Arc`.
#[derive(Debug, Default)]
pub struct FaultPlan {
    reads: Vec<Armed<ReadFault>>,
    panics: Vec<Armed<PanicSite>>,
    steps: Vec<Armed<()>>,
    uploads: Vec<Armed<()>>,
    refuse_io_uring: bool,
    /// Every read delayed by a pseudo-random time in this range.
    slow_all: Option<(Duration, Duration)>,
    slowed: AtomicU64,
    refused: AtomicU64,
}

impl FaultPlan {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads of `probe` fail in this way, `times` times (`None`: always).
    pub fn read(mut self, probe: ProbeId, fault: ReadFault, times: Option<u64>) -> Self {
        self.reads.push(Armed { fault, probe, times, fired: AtomicU64::new(0) });
        self
    }

    /// `site` panics while handling `probe`, `times` times.
    pub fn panic(mut self, site: PanicSite, probe: ProbeId, times: Option<u64>) -> Self {
        self.panics.push(Armed { fault: site, probe, times, fired: AtomicU64::new(0) });
        self
    }

    /// The scoring fails mid-step for steps that score (or install) `probe`, `times` times.
    pub fn fail_step(mut self, probe: ProbeId, times: Option<u64>) -> Self {
        self.steps.push(Armed { fault: (), probe, times, fired: AtomicU64::new(0) });
        self
    }

    /// Copying `probe` into the resident store (a device's memory) fails, `times` times, as a
    /// failed host-to-device transfer or an exhausted device would.
    pub fn fail_upload(mut self, probe: ProbeId, times: Option<u64>) -> Self {
        self.uploads.push(Armed { fault: (), probe, times, fired: AtomicU64::new(0) });
        self
    }

    /// Every read completes correctly after a delay drawn from `min..=max` (a busy or
    /// networked disk), where no other read fault applies.
    pub fn slow_reads(mut self, min: Duration, max: Duration) -> Self {
        self.slow_all = Some((min, max.max(min)));
        self
    }

    /// io_uring setup fails with ENOSYS, as under a seccomp filter.
    pub fn refuse_io_uring(mut self) -> Self {
        self.refuse_io_uring = true;
        self
    }

    /// How many times faults have fired, of every kind.
    pub fn fired(&self) -> u64 {
        fn count<F>(v: &[Armed<F>]) -> u64 {
            v.iter()
                .map(|a| {
                    let n = a.fired.load(Ordering::SeqCst);
                    a.times.map_or(n, |t| n.min(t))
                })
                .sum()
        }
        count(&self.reads)
            + count(&self.panics)
            + count(&self.steps)
            + count(&self.uploads)
            + self.slowed.load(Ordering::SeqCst)
            + self.refused.load(Ordering::SeqCst)
    }
}

/// The plan a component was started with: none, in production.
#[derive(Debug, Clone, Default)]
pub struct Faults(Option<Arc<FaultPlan>>);

impl Faults {
    pub fn none() -> Self {
        Self(None)
    }

    pub fn plan(plan: Arc<FaultPlan>) -> Self {
        Self(Some(plan))
    }

    pub(super) fn refuses_io_uring(&self) -> bool {
        match &self.0 {
            Some(p) if p.refuse_io_uring => {
                p.refused.fetch_add(1, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    fn read_fault(&self, probe: ProbeId) -> Option<ReadFault> {
        let plan = self.0.as_ref()?;
        plan.reads.iter().find_map(|a| a.fire(probe)).or_else(|| {
            let (min, max) = plan.slow_all?;
            // Seeded by the read's number: spread over the range, the same for every run.
            let n = plan.slowed.fetch_add(1, Ordering::SeqCst);
            let us = ChaCha8Rng::seed_from_u64(n).random_range(0..=(max - min).as_micros() as u64);
            Some(ReadFault::Slow(min + Duration::from_micros(us)))
        })
    }

    fn has_read_faults(&self) -> bool {
        self.0.as_ref().is_some_and(|p| !p.reads.is_empty() || p.slow_all.is_some())
    }

    /// Panics if the plan says `site` fails on one of `probes`.
    pub(super) fn maybe_panic(&self, site: PanicSite, probes: impl IntoIterator<Item = ProbeId>) {
        let Some(plan) = &self.0 else { return };
        for probe in probes {
            if plan.panics.iter().any(|a| a.fault == site && a.fire(probe).is_some()) {
                panic!("injected fault: {site:?} panics on probe {}", probe.0);
            }
        }
    }

    /// Whether a step scoring `probes` fails.
    pub(super) fn step_fails(&self, probes: impl IntoIterator<Item = ProbeId>) -> Option<ProbeId> {
        let plan = self.0.as_ref()?;
        probes.into_iter().find(|&p| plan.steps.iter().any(|a| a.fire(p).is_some()))
    }

    /// Whether copying `probes` into the resident store fails.
    pub(super) fn upload_fails(&self, probes: impl IntoIterator<Item = ProbeId>) -> Option<ProbeId> {
        let plan = self.0.as_ref()?;
        probes.into_iter().find(|&p| plan.uploads.iter().any(|a| a.fire(p).is_some()))
    }

    /// Wraps a reader so that its completions pass through the plan's read faults (the reader
    /// itself when there are none).
    pub(super) fn wrap_reader(
        &self,
        start: impl FnOnce(flume::Sender<ReadCompletion>) -> std::io::Result<Box<dyn ProbeReader>>,
        completions: flume::Sender<ReadCompletion>,
    ) -> std::io::Result<Box<dyn ProbeReader>> {
        if !self.has_read_faults() {
            return start(completions);
        }
        // The reader itself is unchanged; only its completions take the detour.
        let (tx, rx) = flume::unbounded();
        let reader = start(tx)?;
        let faults = self.clone();
        std::thread::Builder::new().name("probe-faults".into()).spawn(move || inject(faults, rx, completions))?;
        Ok(reader)
    }
}

/// A completion held back by a slow-read fault until `due`.
struct Delayed {
    due: Instant,
    completion: ReadCompletion,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    // The earliest due first: BinaryHeap is a max-heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.due.cmp(&self.due)
    }
}

/// Applies the read faults to completions, holding slow ones back on one timer heap. Ends when
/// the reader is gone and every held completion has been delivered (or the cache is gone).
fn inject(faults: Faults, rx: flume::Receiver<ReadCompletion>, out: flume::Sender<ReadCompletion>) {
    let mut held: BinaryHeap<Delayed> = BinaryHeap::new();
    let mut open = true;
    while open || !held.is_empty() {
        let now = Instant::now();
        while held.peek().is_some_and(|d| d.due <= now) {
            let d = held.pop().expect("peeked");
            if out.send(d.completion).is_err() {
                return;
            }
        }
        let next = if open {
            match held.peek() {
                Some(d) => rx.recv_timeout(d.due.saturating_duration_since(now)),
                None => rx.recv().map_err(|_| flume::RecvTimeoutError::Disconnected),
            }
        } else {
            std::thread::sleep(held.peek().map_or(Duration::ZERO, |d| d.due.saturating_duration_since(now)));
            continue;
        };
        let mut c = match next {
            Ok(c) => c,
            Err(flume::RecvTimeoutError::Timeout) => continue,
            Err(flume::RecvTimeoutError::Disconnected) => {
                open = false;
                continue;
            }
        };
        let fault = if c.result.is_ok() { faults.read_fault(c.id) } else { None };
        match (fault, c.result) {
            (Some(ReadFault::Eio), Ok(buf)) => {
                c.result = Err((std::io::Error::from_raw_os_error(libc::EIO), buf));
            }
            (Some(ReadFault::Short), Ok(mut buf)) => {
                buf.truncate(buf.len() / 2);
                c.result = Ok(buf);
            }
            (Some(ReadFault::Corrupt), Ok(mut buf)) => {
                let at = buf.len() / 3;
                if let Some(b) = buf.get_mut(at) {
                    *b ^= 0x5a;
                }
                c.result = Ok(buf);
            }
            (Some(ReadFault::Slow(d)), result) => {
                c.result = result;
                held.push(Delayed { due: Instant::now() + d, completion: c });
                continue;
            }
            (_, result) => c.result = result,
        }
        if out.send(c).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_fires_its_times_at_its_probe_only() {
        let plan = Arc::new(FaultPlan::new().read(ProbeId(3), ReadFault::Eio, Some(2)));
        let f = Faults::plan(plan.clone());
        assert_eq!(f.read_fault(ProbeId(4)), None);
        assert_eq!(f.read_fault(ProbeId(3)), Some(ReadFault::Eio));
        assert_eq!(f.read_fault(ProbeId(3)), Some(ReadFault::Eio));
        assert_eq!(f.read_fault(ProbeId(3)), None);
        assert_eq!(plan.fired(), 2);
        assert!(Faults::none().read_fault(ProbeId(3)).is_none());
    }

    #[test]
    fn slow_completions_come_out_in_due_order_and_the_rest_at_once() {
        let plan = FaultPlan::new()
            .read(ProbeId(1), ReadFault::Slow(Duration::from_millis(40)), None)
            .read(ProbeId(2), ReadFault::Slow(Duration::from_millis(10)), None)
            .read(ProbeId(5), ReadFault::Short, None);
        let faults = Faults::plan(Arc::new(plan));
        let (tx, rx) = flume::unbounded();
        let (out_tx, out) = flume::unbounded();
        let t = std::thread::spawn(move || inject(faults, rx, out_tx));
        for id in [1, 2, 3, 5] {
            tx.send(ReadCompletion { id: ProbeId(id), result: Ok(vec![7; 8]) }).unwrap();
        }
        drop(tx);
        let got: Vec<(u32, usize)> =
            out.iter().map(|c| (c.id.0, c.result.as_ref().map(|b| b.len()).unwrap_or(0))).collect();
        t.join().unwrap();
        assert_eq!(got, vec![(3, 8), (5, 4), (2, 8), (1, 8)]);
    }
}
