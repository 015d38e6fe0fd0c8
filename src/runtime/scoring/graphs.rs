//! CUDA graphs for the resident store's sparse scoring rounds (the `cuda-graphs` feature:
//! `make build-gpu`). An eager round on a GPU is a gather and three batched layers, about
//! twenty kernel launches: launch-bound at 190–260 µs on an H200, where a replayed graph
//! takes 41–60 µs. So a round of up to [`MAX_PROBES`] rows and [`MAX_BATCH`] hidden states
//! replays a graph captured once for its bucket (rows and states rounded up to powers of
//! two); bigger rounds, and dense ones (scored in place), stay eager.
//!
//! The capture and replay are a small C++ shim over libtorch's `ATen/cuda`
//! (`cuda_graphs.cpp`), since tch 0.24 binds no graphs. The buckets are bounded by
//! construction (6 row sizes × 6 state counts) and share one memory pool, so they cost about
//! the largest round's intermediates, not their sum. A graph never sees padding rows as
//! answers: rows and states past the round's keep earlier values, and their logits are not
//! read.

use crate::kernel::MAX_BATCH;

/// Rounds of more rows than this are scored eagerly (a round of the cascade is 30–100).
pub const MAX_PROBES: usize = 256;
/// The smallest row bucket.
const MIN_PROBES: usize = 8;

/// The bucket (rows, hidden states) whose graph replays a round of `n` rows and `b` states,
/// if any: each rounded up to a power of two, rows to at least [`MIN_PROBES`].
pub fn bucket(n: usize, b: usize) -> Option<(usize, usize)> {
    (n > 0 && n <= MAX_PROBES && b > 0 && b <= MAX_BATCH)
        .then(|| (n.next_power_of_two().max(MIN_PROBES), b.next_power_of_two()))
}

/// Whether work over store rows `rows` (or, for a dense round, every row below `dense_hi`)
/// meets a row that a prefetch copy still in flight writes (`pending`, sorted): such work
/// must be ordered after the copy; other work need not wait for it.
pub fn touches(pending: &[usize], rows: &[usize], dense_hi: Option<usize>) -> bool {
    if let Some(hi) = dense_hi {
        return pending.first().is_some_and(|&lo| lo < hi);
    }
    rows.iter().any(|r| pending.binary_search(r).is_ok())
}

#[cfg(feature = "cuda-graphs")]
pub use replay::{GraphError, Graphs, SideCopy};

#[cfg(feature = "cuda-graphs")]
mod replay {
    use super::bucket;
    use std::collections::HashMap;
    use std::ffi::{c_char, c_void, CStr};

    use tch::{Device, Tensor};
    use torch_sys::C_tensor;

    extern "C" {
        fn pc_graph_capture(
            w: *const *const C_tensor,
            n: i64,
            b: i64,
            out: *mut *mut C_tensor,
            err: *mut c_char,
            err_len: usize,
        ) -> *mut c_void;
        fn pc_graph_replay(
            graph: *mut c_void,
            idx_host: *const C_tensor,
            x_host: *const C_tensor,
            n: i64,
            b: i64,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        fn pc_graph_free(graph: *mut c_void);
        fn pc_side_begin(device: i64, err: *mut c_char, err_len: usize) -> *mut c_void;
        fn pc_side_end(copy: *mut c_void, err: *mut c_char, err_len: usize) -> i32;
        fn pc_side_done(copy: *mut c_void, err: *mut c_char, err_len: usize) -> i32;
        fn pc_side_order(copy: *mut c_void, err: *mut c_char, err_len: usize) -> i32;
        fn pc_side_free(copy: *mut c_void);
    }

    /// Runs `f` with an error buffer; its message, when `failed` says so.
    fn with_error<T>(f: impl FnOnce(*mut c_char, usize) -> T, failed: impl Fn(&T) -> bool) -> Result<T, String> {
        let mut err = [0 as c_char; 1024];
        let value = f(err.as_mut_ptr(), err.len());
        if failed(&value) {
            // SAFETY: the shim writes a NUL-terminated string into `err` (snprintf), or nothing
            // (it is zeroed).
            let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(if message.is_empty() { "unknown error".into() } else { message });
        }
        Ok(value)
    }

    /// One captured round and its output tensor (`[rows · states]` f32 on the device).
    struct Graph {
        handle: *mut c_void,
        out: Tensor,
    }

    impl Drop for Graph {
        fn drop(&mut self) {
            // SAFETY: `handle` came from `pc_graph_capture` and is freed once, here.
            unsafe { pc_graph_free(self.handle) }
        }
    }

    /// The store's graphs, by bucket; owned by the scoring thread with the store's tensors.
    #[derive(Default)]
    pub struct Graphs {
        graphs: HashMap<(usize, usize), Graph>,
    }

    // SAFETY: a `Graph` is only used from the thread that owns the store (the backend is `Send`,
    // moved once onto the step scheduler's thread, like its tensors).
    unsafe impl Send for Graph {}

    /// A graph round that failed, naming its bucket.
    #[derive(Debug, thiserror::Error)]
    pub enum GraphError {
        /// The shim's capture or replay threw: its message (all that crosses from C++).
        #[error("CUDA graph for {rows} probes × {states} hidden states: {message}")]
        Shim { rows: usize, states: usize, message: String },
        #[error("reading back the CUDA graph for {rows} probes × {states} hidden states")]
        Readback {
            rows: usize,
            states: usize,
            #[source]
            source: tch::TchError,
        },
        /// A side-stream copy's stream or event call threw: its message.
        #[error("side-stream copy on cuda:{device}: {message}")]
        Side { device: usize, message: String },
    }

    /// A copy queued on a side stream (the store's prefetch), and the event after it. Dropping
    /// it releases the event: anything that must come after the copy is ordered first
    /// ([`SideCopy::order_current`]), or has seen it done ([`SideCopy::done`]).
    pub struct SideCopy {
        handle: *mut c_void,
        device: usize,
    }

    // SAFETY: the handle is the shim's, used only from the thread that owns the store (one at a
    // time), and c10's streams and events may be used from any thread.
    unsafe impl Send for SideCopy {}

    impl SideCopy {
        /// Queues what `queue` asks of tch on a side stream of CUDA device `device`, after what
        /// this thread's current stream has queued, and records an event after it; the current
        /// stream is this thread's again on return. `queue`'s own result comes back beside the
        /// copy, whose event covers whatever it did queue. `Err`: the shim failed, and nothing
        /// is left in flight (the device was waited for if anything had been queued).
        pub fn run<T, E>(
            device: usize,
            queue: impl FnOnce() -> Result<T, E>,
        ) -> Result<(Self, Result<T, E>), GraphError> {
            let side = |message| GraphError::Side { device, message };
            // SAFETY: the shim returns null or a copy it allocated, freed once on drop.
            let handle = with_error(|err, len| unsafe { pc_side_begin(device as i64, err, len) }, |h| h.is_null())
                .map_err(side)?;
            let copy = Self { handle, device };
            let queued = queue();
            // SAFETY: a live handle; `end` runs once, after `begin`, on this thread.
            if let Err(message) = with_error(|err, len| unsafe { pc_side_end(copy.handle, err, len) }, |rc| *rc != 0) {
                // No event to order after: wait here, so that nothing is left in flight.
                tch::Cuda::synchronize(device as i64);
                return Err(side(message));
            }
            Ok((copy, queued))
        }

        /// Has everything the copy queued run?
        pub fn done(&self) -> Result<bool, GraphError> {
            // SAFETY: a live handle.
            let rc = with_error(|err, len| unsafe { pc_side_done(self.handle, err, len) }, |rc| *rc < 0)
                .map_err(|message| GraphError::Side { device: self.device, message })?;
            Ok(rc == 1)
        }

        /// Makes this thread's current stream wait for the copy, on the device: the host does
        /// not wait.
        pub fn order_current(&self) -> Result<(), GraphError> {
            // SAFETY: a live handle.
            with_error(|err, len| unsafe { pc_side_order(self.handle, err, len) }, |rc| *rc != 0)
                .map(|_| ())
                .map_err(|message| GraphError::Side { device: self.device, message })
        }
    }

    impl Drop for SideCopy {
        fn drop(&mut self) {
            // SAFETY: the handle was allocated by `pc_side_begin` and is freed only here.
            unsafe { pc_side_free(self.handle) }
        }
    }

    impl Graphs {
        /// Logits of `n` rows × `b` states, `out[i * b + j]`, from the host buffers `idx_host`
        /// (i64, at least `n`: store rows) and `x_host` (f32, at least `b · D`), by the graph of
        /// `(rows, states)` (their [`bucket`]), capturing it first if this is its first round. `store` is the store's six
        /// tensors in pack layout order (b1, w1, b2, w2, b3, w3): they must not move while the
        /// graphs live (the store is allocated once).
        pub fn score(
            &mut self,
            (rows, states): (usize, usize),
            store: [&Tensor; 6],
            idx_host: &Tensor,
            x_host: &Tensor,
            n: usize,
            b: usize,
        ) -> Result<Vec<f32>, GraphError> {
            debug_assert_eq!(bucket(n, b), Some((rows, states)));
            let fail = |message: String| GraphError::Shim { rows, states, message };
            let graph = match self.graphs.entry((rows, states)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(capture(store, rows, states).map_err(fail)?),
            };
            with_error(
                // SAFETY: `graph.handle` is live; the host tensors outlive the call and hold at least
                // n and b·D values (the caller's buffers); their copies are queued on the current
                // stream before the replay, and the readback below waits for both.
                |err, len| unsafe {
                    pc_graph_replay(graph.handle, idx_host.as_ptr(), x_host.as_ptr(), n as i64, b as i64, err, len)
                },
                |rc| *rc != 0,
            )
            .map_err(fail)?;
            let logits = (|| {
                let t = graph
                    .out
                    .f_view([rows as i64, states as i64])?
                    .f_narrow(0, 0, n as i64)?
                    .f_narrow(1, 0, b as i64)?;
                crate::engine::tensors::to_host_f32(&t)
            })()
            .map_err(|source| GraphError::Readback { rows, states, source })?;
            Ok(logits)
        }
    }

    fn capture(store: [&Tensor; 6], rows: usize, states: usize) -> Result<Graph, String> {
        debug_assert!(store.iter().all(|t| matches!(t.device(), Device::Cuda(_))));
        let ptrs: Vec<*const C_tensor> = store.iter().map(|t| t.as_ptr()).collect();
        let mut out: *mut C_tensor = std::ptr::null_mut();
        let handle = with_error(
            // SAFETY: `ptrs` points at six live tensors for the call; the shim sets `out` to a new
            // tensor on success, which `Tensor::from_ptr` then owns.
            |err, len| unsafe { pc_graph_capture(ptrs.as_ptr(), rows as i64, states as i64, &mut out, err, len) },
            |h| h.is_null(),
        )?;
        // SAFETY: set by a successful capture, owned by no one else.
        let out = unsafe { Tensor::from_ptr(out) };
        Ok(Graph { handle, out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_fall_in_power_of_two_buckets_up_to_the_limits() {
        assert_eq!(bucket(1, 1), Some((8, 1)));
        assert_eq!(bucket(30, 3), Some((32, 4)));
        assert_eq!(bucket(100, 32), Some((128, 32)));
        assert_eq!(bucket(MAX_PROBES, MAX_BATCH), Some((MAX_PROBES, MAX_BATCH)));
        assert_eq!(bucket(MAX_PROBES + 1, 1), None);
        assert_eq!(bucket(8, MAX_BATCH + 1), None);
        assert_eq!(bucket(0, 1), None);
    }

    #[test]
    fn work_waits_for_a_prefetch_only_where_it_meets_the_rows_being_written() {
        let pending = [3, 9, 40];
        assert!(touches(&pending, &[1, 9], None));
        assert!(!touches(&pending, &[1, 2, 10, 39], None));
        assert!(!touches(&[], &[1, 2], None));
        // A dense round reads every row below its highest.
        assert!(touches(&pending, &[0, 1], Some(4)));
        assert!(!touches(&pending, &[0, 1, 2], Some(3)));
        assert!(!touches(&[], &[0], Some(100)));
    }
}
