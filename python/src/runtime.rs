//! `Runtime` and `Session`: the Rust runtime behind blocking Python calls.
//!
//! Each `Runtime` owns a tokio runtime (the actors' threads). A call waits for its answer with
//! the GIL released, waking every 50 ms to let Python handle signals, so other Python threads
//! run and Ctrl-C interrupts a wait (the abandoned request is answered into a closed channel
//! and counted by the runtime). A forked child gets an error instead of a hang: tokio's threads
//! do not survive `fork()`.

use std::future::Future;
use std::mem::ManuallyDrop;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use probe_cascade::config::Mode;
use probe_cascade::pack::Pack;
use probe_cascade::runtime::{
    Runtime as CoreRuntime, RuntimeError, Session as CoreSession, SessionOptions, StartError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde_json::Value;

use crate::config::{self, cascade_with, to_json, to_py};
use crate::errors::{base_error, config_error, from_pack, from_runtime};
use crate::hidden;
use crate::report::Report;

/// How often a waiting call lets Python check for signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

pub struct Inner {
    tokio: ManuallyDrop<tokio::runtime::Runtime>,
    rt: ManuallyDrop<CoreRuntime>,
    /// The process that started the threads.
    pid: u32,
    raw: Value,
    source: String,
    pack_dir: PathBuf,
    closed: std::sync::atomic::AtomicBool,
    /// Rings every SIGNAL_POLL: waiting calls wake on it to let Python check for signals.
    /// One shared ticker, so that a call registers no timer of its own (which would wake
    /// tokio's timer driver on every call).
    tick: Arc<tokio::sync::Notify>,
}

impl Inner {
    fn check(&self) -> PyResult<()> {
        let now = std::process::id();
        if now != self.pid {
            return Err(base_error(format!(
                "this Runtime was started in process {}, and this is process {now} (a fork): its threads do \
                 not exist here. Create a new probe_cascade.Runtime in the child process.",
                self.pid
            )));
        }
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(base_error("this Runtime is closed".into()));
        }
        Ok(())
    }

    /// Runs `fut` to completion with the GIL released, checking for signals while it waits.
    fn block<F>(&self, py: Python<'_>, fut: F) -> PyResult<F::Output>
    where
        F: Future + Send,
        F::Output: Send,
    {
        let mut fut = std::pin::pin!(fut);
        loop {
            let (tokio, tick) = (&*self.tokio, &*self.tick);
            let fut = fut.as_mut();
            let done = py.detach(move || {
                tokio.block_on(async move {
                    tokio::select! {
                        biased;
                        out = fut => Some(out),
                        _ = tick.notified() => None,
                    }
                })
            });
            match done {
                Some(out) => return Ok(out),
                None => py.check_signals()?,
            }
        }
    }

    fn shut_down(&self) {
        if !self.closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let rt = &*self.rt;
            self.tokio.block_on(rt.shutdown());
        }
    }

    fn report(&self, r: probe_cascade::engine::TokenReport) -> Report {
        Report::new(r, self.rt.pack().clone())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            // A forked child's copy: the threads are gone, so nothing can be joined or stopped.
            return;
        }
        // Answer what is queued, then stop the threads; without the GIL, in case a runtime
        // thread releases a numpy-backed tensor (which takes the GIL).
        let shut = || {
            self.shut_down();
            // SAFETY: dropped once, here, and never used again.
            unsafe {
                ManuallyDrop::drop(&mut *std::ptr::addr_of_mut!(self.rt));
                ManuallyDrop::take(&mut *std::ptr::addr_of_mut!(self.tokio)).shutdown_timeout(Duration::from_secs(5));
            }
        };
        Python::attach(|py| py.detach(shut));
    }
}

/// A probe pack loaded for scoring: the cache, the reader and the step scheduler, shared by
/// its sessions. `config` is a preset name ("realtime", "decompose", "offline"), a path to a
/// TOML file, or a dict of the same shape.
#[pyclass(module = "probe_cascade", frozen)]
pub struct Runtime {
    inner: Arc<Inner>,
}

#[pymethods]
impl Runtime {
    #[new]
    #[pyo3(signature = (pack_dir, config = None))]
    fn new(py: Python<'_>, pack_dir: PathBuf, config: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let resolved = config::resolve(config)?;
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("probe-cascade-rt")
            .enable_all()
            .build()
            .map_err(|e| base_error(format!("starting the runtime's threads: {e}")))?;
        let dir = pack_dir.clone();
        let cfg = resolved.config.clone();
        let started = py.detach(|| {
            let pack = Pack::open(&dir).map_err(|e| from_pack(&e))?;
            tokio.block_on(CoreRuntime::start(Arc::new(pack), &cfg)).map_err(|e| match e {
                // The config does not fit the pack or the machine: a config error, by variant.
                RuntimeError::Start(
                    e @ (StartError::Config(_)
                    | StartError::CacheTooSmall { .. }
                    | StartError::Device(_)
                    | StartError::Kernel { .. }),
                ) => config_error(format!("{}: {e}", resolved.source), None),
                other => from_runtime(&other, None),
            })
        });
        let rt = match started {
            Ok(rt) => rt,
            Err(e) => {
                tokio.shutdown_background();
                return Err(e);
            }
        };
        let tick = Arc::new(tokio::sync::Notify::new());
        let ring = tick.clone();
        tokio.spawn(async move {
            let mut every = tokio::time::interval(SIGNAL_POLL);
            loop {
                every.tick().await;
                ring.notify_waiters();
            }
        });
        Ok(Self {
            inner: Arc::new(Inner {
                tokio: ManuallyDrop::new(tokio),
                rt: ManuallyDrop::new(rt),
                pid: std::process::id(),
                raw: resolved.raw,
                source: resolved.source,
                pack_dir,
                closed: false.into(),
                tick,
            }),
        })
    }

    /// Opens a session (one stream). Keyword overrides: `mode` ("exact" or "pipelined"),
    /// `latency_budget_us`, and any `[cascade]` key (`report_top_k=5`,
    /// `pruning={"top_k": {"keep_top_k": 20}}`, ...).
    #[pyo3(signature = (**overrides))]
    fn session(&self, py: Python<'_>, overrides: Option<&Bound<'_, PyDict>>) -> PyResult<Session> {
        self.inner.check()?;
        let mut options = SessionOptions::default();
        let mut cascade = serde_json::Map::new();
        for (k, v) in overrides.map(|d| d.iter().collect::<Vec<_>>()).unwrap_or_default() {
            let k: String = k.extract()?;
            match k.as_str() {
                "mode" => {
                    let m: String =
                        v.extract().map_err(|_| config_error("`mode` must be a string".into(), Some(k.clone())))?;
                    options.mode = Some(match m.as_str() {
                        "exact" => Mode::Exact,
                        "pipelined" => Mode::Pipelined,
                        _ => {
                            return Err(config_error(
                                format!("`mode` = {m:?}: expected \"exact\" or \"pipelined\""),
                                Some(k),
                            ))
                        }
                    });
                }
                "latency_budget_us" => {
                    options.latency_budget_us = Some(v.extract().map_err(|_| {
                        config_error("`latency_budget_us` must be a non-negative integer".into(), Some(k.clone()))
                    })?)
                }
                _ => {
                    let value = to_json(&v, &format!("cascade.{k}"))?;
                    cascade.insert(k, value);
                }
            }
        }
        if !cascade.is_empty() {
            options.cascade = Some(cascade_with(&self.inner.raw, &cascade)?);
        }
        let inner = &self.inner;
        let rt = &*inner.rt;
        let session = inner.block(py, rt.open_session(options))?.map_err(|e| from_runtime(&e, None))?;
        let id = session.id().0;
        Ok(Session { inner: inner.clone(), session: Mutex::new(Some(Arc::new(session))), id })
    }

    /// One decode step of many sessions, scored together: `hidden` is [len(sessions), D] (a
    /// tensor or array whose rows are read in place) or a list of 1-D states; on a pack whose
    /// probes read several model layers, a dict {model_layer: that} with every layer. Returns
    /// one report per session, in order. With `errors="return"`, a failed item's place holds
    /// its exception instead of raising the first one.
    #[pyo3(signature = (sessions, hidden, *, errors = "raise"))]
    fn observe_batch<'py>(
        &self,
        py: Python<'py>,
        sessions: Vec<PyRef<'py, Session>>,
        hidden: &Bound<'py, PyAny>,
        errors: &str,
    ) -> PyResult<Bound<'py, PyList>> {
        self.inner.check()?;
        let raise = match errors {
            "raise" => true,
            "return" => false,
            _ => return Err(config_error(format!("errors = {errors:?}: expected \"raise\" or \"return\""), None)),
        };
        let rt = &*self.inner.rt;
        let (states, loans) = hidden::batch(hidden, sessions.len(), rt.pack().model_layers(), rt.store_device())?;
        let mut items = Vec::with_capacity(sessions.len());
        for (s, h) in sessions.iter().zip(states) {
            if !Arc::ptr_eq(&s.inner, &self.inner) {
                return Err(base_error(format!("session {} belongs to another Runtime", s.id)));
            }
            items.push((s.core()?.id(), h));
        }
        let answers = self.inner.block(py, rt.observe_batch_states(items));
        if !loans.iter().all(hidden::Loan::released) {
            py.detach(|| loans.iter().for_each(hidden::Loan::wait));
        }
        let answers = answers?;
        let out = PyList::empty(py);
        for (i, a) in answers.into_iter().enumerate() {
            match a {
                Ok(r) => out.append(self.inner.report(r))?,
                Err(e) if raise => return Err(from_runtime(&e, Some(i))),
                Err(e) => out.append(from_runtime(&e, Some(i)).into_value(py))?,
            }
        }
        Ok(out)
    }

    /// For the overhead benchmark (python/bench/observe_overhead.py): opens a session and
    /// observes `rows` ([T, D] float32) from Rust, with no Python in the loop; returns each
    /// token's wall time in nanoseconds, measured as `Session.observe` is (one blocking call).
    #[pyo3(signature = (rows, *, session_options = None))]
    fn _time_rust_observe(
        &self,
        py: Python<'_>,
        rows: &Bound<'_, PyAny>,
        session_options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<u64>> {
        self.inner.check()?;
        let (states, loans) = hidden::host_rows(rows, rows.len()?)?;
        drop(loans);
        let session = self.session(py, session_options)?;
        let core = session.core()?;
        let tokio = &*self.inner.tokio;
        let times = py.detach(|| {
            let mut times = Vec::with_capacity(states.len());
            for x in &states {
                let hidden = probe_cascade::engine::Hidden::borrowed(Borrowed(x.as_ptr(), x.len()));
                let t = std::time::Instant::now();
                let r = tokio.block_on(core.observe(hidden));
                times.push(t.elapsed().as_nanos() as u64);
                r?;
            }
            Ok::<_, RuntimeError>(times)
        });
        drop(core);
        session.release(py);
        times.map_err(|e| from_runtime(&e, None))
    }

    /// Scores recordings, each its own session, `concurrency` at once (the runtime batches
    /// their tokens into steps): `recordings` is a list of `(name, source)`, a source being a
    /// `.npy` path, a `(safetensors path, tensor)` pair or a [T, D] array. Returns
    /// `{table: Arrow IPC bytes}` for every table of the dataset schema (`probe_cascade.dataset`
    /// wraps this). A bad recording or token is a `failures` row; only a runtime failure raises.
    #[pyo3(signature = (recordings, *, concurrency = 8, skip_bad_tokens = false))]
    fn _score_recordings<'py>(
        &self,
        py: Python<'py>,
        recordings: Vec<(String, Bound<'py, PyAny>)>,
        concurrency: usize,
        skip_bad_tokens: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.inner.check()?;
        let mut outcomes = Vec::with_capacity(recordings.len());
        let mut todo = Vec::with_capacity(recordings.len());
        for (name, source) in recordings {
            match crate::dataset::recording(name, &source) {
                Ok(r) => todo.push(r),
                Err(failed) => outcomes.push(failed),
            }
        }
        let rt = &*self.inner.rt;
        let options = probe_cascade_dataset::Options { concurrency, skip_bad_tokens };
        let scored = self.inner.block(py, async {
            let mut done = Vec::new();
            probe_cascade_dataset::score_all(rt, todo, options, |o| {
                done.push(o);
                Ok::<_, probe_cascade_dataset::ScoreError>(())
            })
            .await
            .map(|()| done)
        })?;
        outcomes.extend(scored.map_err(|e| match &e {
            probe_cascade_dataset::ScoreError::Concurrency { .. } => {
                config_error(e.to_string(), Some("concurrency".into()))
            }
            _ => base_error(probe_cascade_dataset::score::error_chain(&e)),
        })?);
        crate::dataset::ipc_tables(py, &outcomes)
    }

    /// What the runtime has done: the step scheduler's and the weight cache's counters.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.inner.check()?;
        let rt = &*self.inner.rt;
        let (steps, cache) = self.inner.block(py, async { (rt.step_stats().await, rt.cache_stats().await) })?;
        let steps = steps.map_err(|e| from_runtime(&e, None))?;
        let cache = cache.map_err(|e| from_runtime(&e, None))?;
        let d = PyDict::new(py);
        d.set_item("steps", to_py(py, &serde_json::to_value(steps).unwrap_or_default())?)?;
        d.set_item("cache", to_py(py, &serde_json::to_value(cache).unwrap_or_default())?)?;
        d.set_item("sessions", rt.sessions().len())?;
        Ok(d)
    }

    /// Answers what is queued, then stops the runtime's threads. Sessions fail afterwards.
    fn close(&self, py: Python<'_>) {
        if std::process::id() == self.inner.pid {
            let inner = &self.inner;
            py.detach(|| inner.shut_down());
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    /// Where the resident store scores (`"cuda:0"`, `"cpu"` with `device.cpu_kernel =
    /// "torch"`), or None on the CPU kernel. A torch tensor given on this device is scored
    /// where it lies, with no host copy, after the caller's current CUDA stream.
    #[getter]
    fn store_device(&self) -> Option<String> {
        self.inner.rt.store_device().map(probe_cascade::engine::tensors::device_name)
    }

    /// D: the width of the hidden states the pack's probes read.
    #[getter]
    fn hidden_dim(&self) -> usize {
        self.inner.rt.pack().hidden_dim()
    }

    /// Concepts in the pack.
    #[getter]
    fn concepts(&self) -> usize {
        self.inner.rt.pack().len()
    }

    #[getter]
    fn pack_dir(&self) -> PathBuf {
        self.inner.pack_dir.clone()
    }

    /// The pack as headspace's `GET /v1/pack` describes it: `{model, pack, total_lenses,
    /// calibrated, alert_threshold, fields, concepts, watch}` (docs/headspace.md).
    fn pack_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let rt = &self.inner.rt;
        let info = probe_cascade::headspace::pack_info(rt.pack(), None, &rt.config().cascade.watch);
        let value = serde_json::to_value(&info).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
        to_py(py, &value)
    }

    /// The pack's metadata and hierarchy as JSON (`probe_cascade::viewer::PackView`, what the
    /// viewer reads; `probe_cascade.viewer` puts it in HTML reports).
    fn _pack_view(&self) -> String {
        let rt = &self.inner.rt;
        let view = probe_cascade::viewer::PackView::new(rt.pack()).watching(&rt.config().cascade.watch);
        serde_json::to_string(&view).expect("a pack view serializes")
    }

    /// The config as given (a dict), and where it came from.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.inner.raw)
    }

    #[getter]
    fn config_source(&self) -> String {
        self.inner.source.clone()
    }

    /// Sessions open now.
    #[getter]
    fn open_sessions(&self) -> usize {
        self.inner.rt.sessions().len()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn __repr__(&self) -> String {
        let pack = self.inner.rt.pack();
        format!(
            "Runtime({:?}, {} concepts, D={}, config={})",
            self.inner.pack_dir.display().to_string(),
            pack.len(),
            pack.hidden_dim(),
            self.inner.source
        )
    }
}

/// A row the benchmark owns for the whole loop: read in place, like a caller's tensor.
struct Borrowed(*const f32, usize);

// SAFETY: points into a Vec that outlives every observe that reads it (see _time_rust_observe).
unsafe impl Send for Borrowed {}

impl probe_cascade::engine::HiddenSource for Borrowed {
    fn values(&self) -> probe_cascade::engine::HiddenValues<'_> {
        // SAFETY: as above.
        probe_cascade::engine::HiddenValues::F32(unsafe { std::slice::from_raw_parts(self.0, self.1) })
    }
}

/// One stream on a Runtime: its own active set and token counter. `observe` scores one hidden
/// state; tokens are numbered from 0.
#[pyclass(module = "probe_cascade", frozen)]
pub struct Session {
    inner: Arc<Inner>,
    session: Mutex<Option<Arc<CoreSession>>>,
    id: u64,
}

impl Session {
    fn core(&self) -> PyResult<Arc<CoreSession>> {
        self.inner.check()?;
        self.session
            .lock()
            .expect("session lock")
            .clone()
            .ok_or_else(|| base_error(format!("session {} is closed", self.id)))
    }

    fn release(&self, py: Python<'_>) {
        let Some(s) = self.session.lock().expect("session lock").take() else {
            return;
        };
        if std::process::id() != self.inner.pid {
            std::mem::forget(s);
            return;
        }
        let inner = &self.inner;
        py.detach(|| match Arc::try_unwrap(s) {
            Ok(s) if !inner.closed.load(std::sync::atomic::Ordering::SeqCst) => inner.tokio.block_on(s.close()),
            // In use on another thread (or the runtime is closed): the last user closes it.
            other => {
                let _guard = inner.tokio.enter();
                drop(other);
            }
        });
    }
}

#[pymethods]
impl Session {
    /// Scores one token: a 1-D torch.Tensor (CPU or CUDA; float32, bfloat16 or float16) or
    /// numpy array of D values, read in place. On a pack whose probes read several model
    /// layers: a dict {model_layer: 1-D state}, or a [layers, D] tensor or array in the pack's
    /// model-layer order.
    fn observe(&self, py: Python<'_>, hidden: &Bound<'_, PyAny>) -> PyResult<Report> {
        let s = self.core()?;
        let model_layers = self.inner.rt.pack().model_layers();
        let layered = model_layers.len() > 1 || hidden.cast::<pyo3::types::PyDict>().is_ok();
        let (states, loans) = if layered {
            hidden::layers(hidden, model_layers, self.inner.rt.store_device())?
        } else {
            let (h, loan) = hidden::one(hidden, self.inner.rt.store_device())?;
            (vec![h], loan.into_iter().collect())
        };
        let answer = self.inner.block(py, s.observe_states(states));
        for loan in loans.iter().filter(|l| !l.released()) {
            // Released by the time an answer comes (the runtime drops a state once it has
            // read it); after Ctrl-C, once the runtime has taken the request off its queue.
            py.detach(|| loan.wait());
        }
        let r = answer?.map_err(|e| from_runtime(&e, None))?;
        Ok(self.inner.report(r))
    }

    /// The names of the session's active probes.
    fn active(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let s = self.core()?;
        let ids = self.inner.block(py, s.active())?.map_err(|e| from_runtime(&e, None))?;
        let h = self.inner.rt.pack().hierarchy();
        Ok(ids.into_iter().map(|id| h.name(id).to_string()).collect())
    }

    /// Waits until no load of this session is in flight (pipelined mode).
    fn settle(&self, py: Python<'_>) -> PyResult<()> {
        let s = self.core()?;
        self.inner.block(py, s.settle())?.map_err(|e| from_runtime(&e, None))
    }

    /// Answers what is queued, then frees the session's place and its probes.
    fn close(&self, py: Python<'_>) {
        self.release(py);
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.release(py);
        false
    }

    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    #[getter]
    fn closed(&self) -> bool {
        self.session.lock().expect("session lock").is_none()
    }

    fn __repr__(&self) -> String {
        format!("Session({}{})", self.id, if self.closed() { ", closed" } else { "" })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.session.lock().map(|s| s.is_some()).unwrap_or(false) {
            Python::attach(|py| self.release(py));
        }
    }
}
