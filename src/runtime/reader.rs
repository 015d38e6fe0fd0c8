//! Probe reads: one positioned read per probe into a recycled buffer, many in flight.
//!
//! io_uring (through tokio-uring) is the fast path. tokio-uring runs its own single-threaded
//! runtime, so it gets a dedicated OS thread; requests and completions cross over flume
//! channels. Where the kernel refuses io_uring (ENOSYS in old kernels, EPERM under seccomp, as
//! many containers are set up), a small pool of threads doing `pread` serves the same
//! interface. tokio-uring is no longer maintained, which is one more reason it sits behind the
//! [`ProbeReader`] trait: another backend (tokio's own io_uring support, say) can replace it.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use tokio_uring::buf::BoundedBuf;

use super::faults::Faults;
use crate::pack::{Pack, ProbeId};
pub use crate::types::ReaderKind;

/// Read `len` bytes at `offset` of shard `shard` into `buf` (whose capacity is reused).
#[derive(Debug)]
pub struct ReadRequest {
    pub id: ProbeId,
    pub shard: u32,
    pub offset: u64,
    pub len: usize,
    pub buf: Vec<u8>,
}

impl ReadRequest {
    /// A read of probe `id`'s bytes, wherever the pack keeps them, into `buf`.
    pub fn for_probe(pack: &Pack, id: ProbeId, buf: Vec<u8>) -> Self {
        let loc = pack.location(id);
        Self { id, shard: loc.shard, offset: loc.offset, len: loc.length as usize, buf }
    }
}

#[derive(Debug)]
pub struct ReadCompletion {
    pub id: ProbeId,
    /// The filled buffer, or the error and the buffer back for recycling.
    pub result: Result<Vec<u8>, (std::io::Error, Vec<u8>)>,
}

/// Accepts read requests; completions arrive on the channel given at start.
pub trait ProbeReader: Send + Sync {
    /// Queues a read. Fails only when the reader has stopped.
    fn submit(&self, req: ReadRequest) -> Result<(), ReadRequest>;
    /// The backend actually running.
    fn kind(&self) -> ReaderKind;
}

/// Starts a reader over the pack's shard files. `ReaderKind::Auto` tries io_uring and falls
/// back to threads, logging the reason once.
pub fn start_reader(
    kind: ReaderKind,
    shards: Vec<PathBuf>,
    queue_depth: usize,
    threads: usize,
    completions: flume::Sender<ReadCompletion>,
) -> std::io::Result<Box<dyn ProbeReader>> {
    start_reader_with_faults(kind, shards, queue_depth, threads, completions, &Faults::none())
}

/// [`start_reader`], with `faults` (tests only) that may refuse io_uring and tamper with
/// completions.
pub fn start_reader_with_faults(
    kind: ReaderKind,
    shards: Vec<PathBuf>,
    queue_depth: usize,
    threads: usize,
    completions: flume::Sender<ReadCompletion>,
    faults: &Faults,
) -> std::io::Result<Box<dyn ProbeReader>> {
    let refuse = faults.refuses_io_uring();
    faults.wrap_reader(
        |completions| start_backend(kind, Arc::new(shards), queue_depth, threads, completions, refuse),
        completions,
    )
}

fn start_backend(
    kind: ReaderKind,
    shards: Arc<Vec<PathBuf>>,
    queue_depth: usize,
    threads: usize,
    completions: flume::Sender<ReadCompletion>,
    refuse_io_uring: bool,
) -> std::io::Result<Box<dyn ProbeReader>> {
    if kind != ReaderKind::Threads {
        let uring = if refuse_io_uring {
            Err(std::io::Error::from_raw_os_error(libc::ENOSYS)) // as an old kernel or seccomp says
        } else {
            UringReader::start(shards.clone(), queue_depth, completions.clone())
        };
        match uring {
            Ok(r) => return Ok(Box::new(r)),
            Err(e) if kind == ReaderKind::IoUring => return Err(e),
            Err(e) => tracing::warn!("io_uring is unavailable ({e}); reading probes with {threads} threads instead"),
        }
    }
    Ok(Box::new(ThreadReader::start(shards, threads, completions)))
}

fn fill(file: &File, req: &mut ReadRequest) -> std::io::Result<()> {
    req.buf.clear();
    req.buf.resize(req.len, 0);
    file.read_exact_at(&mut req.buf, req.offset)
}

/// `pread` on a few threads: the fallback.
pub struct ThreadReader {
    requests: flume::Sender<ReadRequest>,
}

impl ThreadReader {
    fn start(shards: Arc<Vec<PathBuf>>, threads: usize, completions: flume::Sender<ReadCompletion>) -> Self {
        let (requests, rx) = flume::unbounded::<ReadRequest>();
        for i in 0..threads.max(1) {
            let (rx, completions, shards) = (rx.clone(), completions.clone(), shards.clone());
            std::thread::Builder::new()
                .name(format!("probe-read-{i}"))
                .spawn(move || {
                    let mut files: HashMap<u32, File> = HashMap::new();
                    while let Ok(mut req) = rx.recv() {
                        let file = match files.entry(req.shard) {
                            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
                            std::collections::hash_map::Entry::Vacant(v) => {
                                File::open(&shards[req.shard as usize]).map(|f| v.insert(f))
                            }
                        };
                        let result = match file.and_then(|f| fill(f, &mut req)) {
                            Ok(()) => Ok(req.buf),
                            Err(e) => Err((e, req.buf)),
                        };
                        if completions.send(ReadCompletion { id: req.id, result }).is_err() {
                            break;
                        }
                    }
                })
                .expect("spawning a reader thread");
        }
        Self { requests }
    }
}

impl ProbeReader for ThreadReader {
    fn submit(&self, req: ReadRequest) -> Result<(), ReadRequest> {
        self.requests.send(req).map_err(|e| e.into_inner())
    }
    fn kind(&self) -> ReaderKind {
        ReaderKind::Threads
    }
}

/// io_uring on a dedicated thread running tokio-uring's runtime.
pub struct UringReader {
    requests: flume::Sender<ReadRequest>,
}

impl UringReader {
    fn start(
        shards: Arc<Vec<PathBuf>>,
        queue_depth: usize,
        completions: flume::Sender<ReadCompletion>,
    ) -> std::io::Result<Self> {
        let (requests, rx) = flume::unbounded::<ReadRequest>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let entries = queue_depth.clamp(1, 4096).next_power_of_two() as u32;
        std::thread::Builder::new().name("probe-uring".into()).spawn(move || {
            // Building the runtime is where an unsupported kernel says no.
            let rt = match tokio_uring::Runtime::new(tokio_uring::builder().entries(entries)) {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            rt.block_on(async move {
                let mut files: HashMap<u32, Rc<tokio_uring::fs::File>> = HashMap::new();
                while let Ok(req) = rx.recv_async().await {
                    let file = match files.get(&req.shard) {
                        Some(f) => Ok(f.clone()),
                        None => match tokio_uring::fs::File::open(&shards[req.shard as usize]).await {
                            Ok(f) => Ok(files.entry(req.shard).or_insert(Rc::new(f)).clone()),
                            Err(e) => Err(e),
                        },
                    };
                    let completions = completions.clone();
                    // Each read is its own task, so up to queue_depth reads are in the ring at once
                    // (the cache never has more outstanding).
                    tokio_uring::spawn(async move {
                        let result = match file {
                            Err(e) => Err((e, req.buf)),
                            Ok(file) => {
                                let mut buf = req.buf;
                                buf.clear();
                                if buf.capacity() < req.len {
                                    buf.reserve_exact(req.len);
                                }
                                let (res, slice) = file.read_exact_at(buf.slice(..req.len), req.offset).await;
                                let buf = slice.into_inner();
                                match res {
                                    Ok(()) => Ok(buf),
                                    Err(e) => Err((e, buf)),
                                }
                            }
                        };
                        let _ = completions.send(ReadCompletion { id: req.id, result });
                    });
                }
            });
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { requests }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::other("the io_uring thread exited before starting")),
        }
    }
}

impl ProbeReader for UringReader {
    fn submit(&self, req: ReadRequest) -> Result<(), ReadRequest> {
        self.requests.send(req).map_err(|e| e.into_inner())
    }
    fn kind(&self) -> ReaderKind {
        ReaderKind::IoUring
    }
}
