//! WeightCache: probe bytes in host RAM, an LRU under a byte budget, fed by the reader.
//!
//! The `lru` crate counts entries, not bytes, so the actor keeps its own byte total and evicts
//! from the cold end until a new entry fits. An entry is *pinned* while anyone else holds its
//! `Arc` (a session's slot on the CPU kernel, or an install in flight): pinned entries are skipped by
//! eviction, and their bytes stay valid whatever the cache does. Concurrent misses on one probe
//! share one read. Buffers come back through a bounded channel when the last `Arc` drops, so
//! steady-state reads land in recycled, already-faulted memory.

use std::collections::{HashMap, VecDeque};
use std::ops::Deref;
use std::sync::Arc;

use kameo::error::Infallible;
use kameo::message::{Context, Message};
use kameo::prelude::{Actor, ActorRef, DelegatedReply, ReplySender};
use lru::LruCache;

use super::faults::{Faults, PanicSite};
use super::reader::{ProbeReader, ReadCompletion, ReadRequest, ReaderKind};
use crate::pack::{Pack, PackError, ProbeId};

/// A probe's verified bytes. Dropping the last reference returns the buffer for reuse.
#[derive(Debug)]
pub struct ProbeBytes {
    pub id: ProbeId,
    bytes: Vec<u8>,
    recycle: flume::Sender<Vec<u8>>,
}

impl ProbeBytes {
    /// Bytes that belong to no cache (their buffer is freed, not recycled, on drop): for tests
    /// and benchmarks that drive a scoring backend without a cache.
    pub fn detached(id: ProbeId, bytes: Vec<u8>) -> Self {
        Self { id, bytes, recycle: flume::bounded(0).0 }
    }
}

impl Deref for ProbeBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for ProbeBytes {
    fn drop(&mut self) {
        // A full pool means enough spare buffers already: let this one go.
        let _ = self.recycle.try_send(std::mem::take(&mut self.bytes));
    }
}

/// A read that failed; shared by every request that waited on it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ReadError(pub Arc<PackError>);

pub type Fetched = Result<Arc<ProbeBytes>, ReadError>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, kameo::Reply)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Misses that joined a read already in flight for the same probe.
    pub merged: u64,
    /// Reads issued (misses and hints).
    pub reads: u64,
    pub hint_reads: u64,
    pub bytes_read: u64,
    pub read_errors: u64,
    pub evictions: u64,
    /// Handler panics survived (the message that panicked got an error; see `on_panic`).
    pub panics: u64,
    pub resident_bytes: u64,
    pub entries: u64,
    /// Reads issued and not completed, and reads waiting for a queue slot.
    pub in_flight: u64,
}

enum Waiter {
    Get { request: u64, index: usize },
    Hint,
}

struct GetRequest {
    results: Vec<Option<Fetched>>,
    remaining: usize,
    reply: Option<ReplySender<Vec<Fetched>>>,
}

pub struct WeightCache {
    pack: Arc<Pack>,
    budget: u64,
    used: u64,
    lru: LruCache<ProbeId, Arc<ProbeBytes>>,
    pending: HashMap<ProbeId, Vec<Waiter>>,
    backlog: VecDeque<ProbeId>,
    in_flight: usize,
    queue_depth: usize,
    reader: Box<dyn ProbeReader>,
    completions: Option<flume::Receiver<ReadCompletion>>,
    spare_tx: flume::Sender<Vec<u8>>,
    spare_rx: flume::Receiver<Vec<u8>>,
    requests: HashMap<u64, GetRequest>,
    next_request: u64,
    stats: CacheStats,
    faults: Faults,
}

/// How the cache is sized and fed.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub budget_bytes: u64,
    pub queue_depth: usize,
    pub reader: ReaderKind,
    pub fallback_threads: usize,
    /// Injected faults (tests only).
    pub faults: Faults,
}

impl WeightCache {
    pub fn new(pack: Arc<Pack>, settings: &CacheSettings) -> std::io::Result<Self> {
        let (tx, completions) = flume::unbounded();
        let shards = pack.shards().iter().map(|s| s.path.clone()).collect();
        let reader = super::reader::start_reader_with_faults(
            settings.reader,
            shards,
            settings.queue_depth,
            settings.fallback_threads,
            tx,
            &settings.faults,
        )?;
        let probe = pack.layout().byte_len().max(1) as u64;
        // Enough spare buffers to refill the whole budget plus every read in flight.
        let spares = (settings.budget_bytes / probe) as usize + settings.queue_depth + 1;
        let (spare_tx, spare_rx) = flume::bounded(spares);
        Ok(Self {
            pack,
            budget: settings.budget_bytes,
            used: 0,
            lru: LruCache::unbounded(),
            pending: HashMap::new(),
            backlog: VecDeque::new(),
            in_flight: 0,
            queue_depth: settings.queue_depth.max(1),
            reader,
            completions: Some(completions),
            spare_tx,
            spare_rx,
            requests: HashMap::new(),
            next_request: 0,
            stats: CacheStats::default(),
            faults: settings.faults.clone(),
        })
    }

    pub fn reader_kind(&self) -> ReaderKind {
        self.reader.kind()
    }

    fn start_read(&mut self, id: ProbeId) {
        if self.in_flight >= self.queue_depth {
            self.backlog.push_back(id);
            return;
        }
        let buf = self.spare_rx.try_recv().unwrap_or_default();
        let req = ReadRequest::for_probe(&self.pack, id, buf);
        self.stats.reads += 1;
        self.in_flight += 1;
        if let Err(req) = self.reader.submit(req) {
            self.in_flight -= 1;
            let e = std::io::Error::other("the probe reader has stopped");
            self.finish(req.id, Err(ReadError(Arc::new(self.pack.read_error(req.id, e)))));
        }
    }

    fn want(&mut self, id: ProbeId, waiter: Waiter) {
        match self.pending.get_mut(&id) {
            Some(waiters) => {
                if matches!(waiter, Waiter::Get { .. }) {
                    self.stats.merged += 1;
                }
                waiters.push(waiter);
            }
            None => {
                self.pending.insert(id, vec![waiter]);
                self.start_read(id);
            }
        }
    }

    fn on_completion(&mut self, c: ReadCompletion) {
        self.in_flight -= 1;
        let want = self.pack.location(c.id).length as usize;
        let outcome = match c.result {
            // A reader that hands back fewer bytes than asked is caught here, by length, not
            // left to the CRC (the kernel reads a probe's full length).
            Ok(bytes) if bytes.len() != want => {
                let e = self.pack.short_read_error(c.id, bytes.len());
                let _ = self.spare_tx.try_send(bytes);
                Err(ReadError(Arc::new(e)))
            }
            Ok(bytes) => match self.pack.check_crc(c.id, &bytes) {
                Ok(()) => {
                    self.stats.bytes_read += bytes.len() as u64;
                    Ok(Arc::new(ProbeBytes { id: c.id, bytes, recycle: self.spare_tx.clone() }))
                }
                Err(e) => {
                    let _ = self.spare_tx.try_send(bytes);
                    Err(ReadError(Arc::new(e)))
                }
            },
            Err((e, buf)) => {
                let _ = self.spare_tx.try_send(buf);
                Err(ReadError(Arc::new(self.pack.read_error(c.id, e))))
            }
        };
        if outcome.is_err() {
            self.stats.read_errors += 1;
        }
        if let Ok(entry) = &outcome {
            self.insert(entry.clone());
        }
        self.finish(c.id, outcome);
        while self.in_flight < self.queue_depth {
            let Some(id) = self.backlog.pop_front() else { break };
            self.start_read(id);
        }
    }

    fn finish(&mut self, id: ProbeId, outcome: Fetched) {
        for waiter in self.pending.remove(&id).unwrap_or_default() {
            if let Waiter::Get { request, index } = waiter {
                self.deliver(request, index, outcome.clone());
            }
        }
    }

    fn deliver(&mut self, request: u64, index: usize, outcome: Fetched) {
        let Some(req) = self.requests.get_mut(&request) else { return };
        req.results[index] = Some(outcome);
        req.remaining -= 1;
        if req.remaining == 0 {
            let req = self.requests.remove(&request).expect("request present");
            let results = req.results.into_iter().map(|r| r.expect("every result filled")).collect();
            if let Some(reply) = req.reply {
                reply.send(results);
            }
        }
    }

    /// Inserts under the byte budget, evicting cold unpinned entries. An entry that cannot fit
    /// is not cached (its requesters still get it).
    fn insert(&mut self, entry: Arc<ProbeBytes>) {
        let size = entry.len() as u64;
        if size > self.budget {
            return;
        }
        while self.used + size > self.budget {
            let victim = self.lru.iter().rev().find(|(_, v)| Arc::strong_count(v) == 1).map(|(k, _)| *k);
            let Some(victim) = victim else { return };
            if let Some(v) = self.lru.pop(&victim) {
                self.used -= v.len() as u64;
                self.stats.evictions += 1;
            }
        }
        self.used += size;
        if let Some(old) = self.lru.put(entry.id, entry) {
            self.used -= old.len() as u64;
        }
    }
}

impl Actor for WeightCache {
    type Args = Self;
    type Error = Infallible;

    async fn on_start(mut state: Self, actor_ref: ActorRef<Self>) -> Result<Self, Self::Error> {
        // Completions come back as messages. The forwarder holds a weak reference so that it
        // never keeps the cache alive, and the cache never waits on it: no cycle.
        let completions = state.completions.take().expect("completions taken once");
        let weak = actor_ref.downgrade();
        tokio::spawn(async move {
            while let Ok(c) = completions.recv_async().await {
                let Some(cache) = weak.upgrade() else { break };
                if cache.tell(ReadDone(c)).await.is_err() {
                    break;
                }
            }
        });
        Ok(state)
    }

    /// The cache is shared by every session: a panic while handling one message must not take
    /// it away from all of them, so it goes on. The panicking message's sender gets an error
    /// (kameo drops its reply). What a handler can leave half done is one request's
    /// bookkeeping: waiters for a request that is gone are skipped by `deliver`, and a read
    /// still in flight completes into the cache as usual.
    async fn on_panic(
        &mut self,
        _: kameo::prelude::WeakActorRef<Self>,
        err: kameo::error::PanicError,
    ) -> Result<std::ops::ControlFlow<kameo::error::ActorStopReason>, Self::Error> {
        self.stats.panics += 1;
        tracing::error!("the weight cache survived a panic in a handler: {err}");
        Ok(std::ops::ControlFlow::Continue(()))
    }
}

/// Fetch probes' bytes: hits at once, misses when their reads land. One result per id, in order.
pub struct Get(pub Vec<ProbeId>);

impl Message<Get> for WeightCache {
    type Reply = DelegatedReply<Vec<Fetched>>;

    async fn handle(&mut self, Get(ids): Get, ctx: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.faults.maybe_panic(PanicSite::Cache, ids.iter().copied());
        let mut results: Vec<Option<Fetched>> = Vec::with_capacity(ids.len());
        let mut misses = Vec::new();
        for (index, &id) in ids.iter().enumerate() {
            match self.lru.get(&id) {
                Some(hit) => {
                    self.stats.hits += 1;
                    results.push(Some(Ok(hit.clone())));
                }
                None => {
                    self.stats.misses += 1;
                    results.push(None);
                    misses.push((index, id));
                }
            }
        }
        let (delegated, reply) = ctx.reply_sender();
        let request = self.next_request;
        self.next_request += 1;
        self.requests.insert(request, GetRequest { results, remaining: misses.len() + 1, reply });
        for (index, id) in misses {
            self.want(id, Waiter::Get { request, index });
        }
        // The extra count keeps the request open until every miss is registered.
        if let Some(req) = self.requests.get_mut(&request) {
            req.remaining -= 1;
            if req.remaining == 0 {
                let req = self.requests.remove(&request).expect("request present");
                if let Some(reply) = req.reply {
                    reply.send(req.results.into_iter().map(|r| r.expect("filled")).collect());
                }
            }
        }
        delegated
    }
}

/// The probes among `ids` whose bytes are in RAM now; never reads.
pub struct Peek(pub Vec<ProbeId>);

impl Message<Peek> for WeightCache {
    type Reply = Vec<(ProbeId, Arc<ProbeBytes>)>;

    async fn handle(&mut self, Peek(ids): Peek, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.faults.maybe_panic(PanicSite::Cache, ids.iter().copied());
        let hits: Vec<_> = ids.into_iter().filter_map(|id| self.lru.get(&id).map(|b| (id, b.clone()))).collect();
        self.stats.hits += hits.len() as u64;
        hits
    }
}

/// Speculative prefetch: read these into RAM if they are not there, without taking a slot.
pub struct Prefetch(pub Vec<ProbeId>);

impl Message<Prefetch> for WeightCache {
    type Reply = ();

    async fn handle(&mut self, Prefetch(ids): Prefetch, _: &mut Context<Self, Self::Reply>) {
        self.faults.maybe_panic(PanicSite::Cache, ids.iter().copied());
        for id in ids {
            if !self.lru.contains(&id) && !self.pending.contains_key(&id) {
                self.stats.hint_reads += 1;
                self.want(id, Waiter::Hint);
            }
        }
    }
}

pub struct ReadDone(pub ReadCompletion);

impl Message<ReadDone> for WeightCache {
    type Reply = ();

    async fn handle(&mut self, ReadDone(c): ReadDone, _: &mut Context<Self, Self::Reply>) {
        self.on_completion(c);
    }
}

pub struct Stats;

impl Message<Stats> for WeightCache {
    type Reply = CacheStats;

    async fn handle(&mut self, _: Stats, _: &mut Context<Self, Self::Reply>) -> CacheStats {
        CacheStats {
            resident_bytes: self.used,
            entries: self.lru.len() as u64,
            in_flight: (self.in_flight + self.backlog.len()) as u64,
            ..self.stats
        }
    }
}
