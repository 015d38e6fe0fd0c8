//! Python hidden states into the runtime without a host copy.
//!
//! A torch tensor crosses as the same `at::Tensor` (tch's `python-extension`: a new
//! reference, no copy); a numpy array becomes one through `torch.from_numpy`, which shares its
//! buffer. The runtime then reads the values in place, once, when it checks and normalizes
//! them ([`probe_cascade::engine::prepare_hidden`]). Copies happen only where they must: a CUDA
//! tensor scored by the CPU runtime comes to the host, f64 narrows to f32, and a tensor
//! whose last dimension is strided is made contiguous.
//!
//! A tensor that lies on the device of the runtime's resident store (`on`: a CUDA runtime
//! given CUDA tensors, or `device.cpu_kernel = "torch"` given CPU ones) is handed over as it
//! is, row by row as views ([`Hidden::tensor`]), and checked, normalized and scored there
//! ([`probe_cascade::engine::check_tensor`]). On CUDA, when the caller's current stream is not
//! the default one, an event recorded on it orders the runtime's reads after the producer's
//! work on the device: the caller does not synchronise, and nothing waits on the host.
//!
//! The tensor is kept alive by the runtime until it has been read, so it may be dropped on a
//! runtime thread: a libtorch refcount, no GIL needed. A float32 numpy array is read through
//! its buffer (PEP 3118) instead, without making a tensor: the buffer stays with the caller,
//! which holds it until the runtime has let go of the view (a [`Loan`]). Callers must not
//! write to an array or tensor while it is being observed (as with any zero-copy API).

use std::sync::{Arc, Condvar, Mutex};

use half::{bf16, f16};
use probe_cascade::engine::{Hidden, HiddenSource, HiddenValues};
use probe_cascade::types::cuda::StreamEvent;
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use tch::{Device, Kind, Tensor};

use crate::errors::bad_hidden;

/// A tensor whose data the runtime reads. `data_ptr` and the properties read here are const in
/// libtorch, so sharing one tensor between the rows of a batch is safe.
struct Shared {
    tensor: Tensor,
    kind: Kind,
}

// SAFETY: only const accessors (data_ptr, kind) are used from several threads.
unsafe impl Sync for Shared {}

/// One row (or the whole) of a shared tensor.
struct Row {
    shared: Arc<Shared>,
    offset: usize,
    len: usize,
}

impl HiddenSource for Row {
    fn values(&self) -> HiddenValues<'_> {
        let base = self.shared.tensor.data_ptr();
        // SAFETY: the tensor is contiguous in its last dimension, `offset + len` lies within it
        // (checked in `rows`), and it lives as long as `self`.
        unsafe {
            match self.shared.kind {
                Kind::BFloat16 => {
                    HiddenValues::Bf16(std::slice::from_raw_parts((base as *const bf16).add(self.offset), self.len))
                }
                Kind::Half => {
                    HiddenValues::F16(std::slice::from_raw_parts((base as *const f16).add(self.offset), self.len))
                }
                _ => HiddenValues::F32(std::slice::from_raw_parts((base as *const f32).add(self.offset), self.len)),
            }
        }
    }
}

/// A numpy array's buffer, lent to the runtime for one call. Views of it count themselves
/// out when the runtime drops them; `wait` blocks until none is left, so that the caller can
/// release the buffer safely even after it stopped waiting for an answer (Ctrl-C).
pub struct Loan {
    buffer: PyBuffer<f32>,
    outstanding: Arc<(Mutex<usize>, Condvar)>,
}

struct View {
    ptr: *const f32,
    len: usize,
    outstanding: Arc<(Mutex<usize>, Condvar)>,
}

// SAFETY: the memory is the lent buffer's, which the caller keeps alive (and does not write)
// until every view is dropped (`Loan::wait`).
unsafe impl Send for View {}

impl HiddenSource for View {
    fn values(&self) -> HiddenValues<'_> {
        // SAFETY: as above; `ptr .. ptr + len` lies within the buffer (checked in `Loan`).
        HiddenValues::F32(unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }
}

impl Drop for View {
    fn drop(&mut self) {
        let (count, cv) = &*self.outstanding;
        let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            cv.notify_all();
        }
    }
}

impl Loan {
    /// A C-contiguous float32 numpy array of `dims` dimensions, lent as it is; None for
    /// anything else (which goes through torch.from_numpy).
    fn numpy(obj: &Bound<'_, PyAny>, dims: usize) -> Option<Self> {
        let buffer = PyBuffer::<f32>::get(obj).ok()?;
        (buffer.dimensions() == dims && buffer.is_c_contiguous())
            .then(|| Self { buffer, outstanding: Arc::new((Mutex::new(0), Condvar::new())) })
    }

    fn shape(&self) -> &[usize] {
        self.buffer.shape()
    }

    /// A view of `len` values from `offset` (checked against the buffer).
    fn view(&self, offset: usize, len: usize) -> Hidden {
        assert!(offset + len <= self.buffer.item_count(), "view past the end of the buffer");
        *self.outstanding.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        // SAFETY: within the buffer, as asserted.
        let ptr = unsafe { (self.buffer.buf_ptr() as *const f32).add(offset) };
        Hidden::borrowed(View { ptr, len, outstanding: self.outstanding.clone() })
    }

    /// Whether the runtime holds no view of the buffer any more (the usual case once a call
    /// has its answer): then `wait` is not needed.
    pub fn released(&self) -> bool {
        *self.outstanding.0.lock().unwrap_or_else(|e| e.into_inner()) == 0
    }

    /// Blocks until the runtime holds no view of the buffer. Call without the GIL.
    pub fn wait(&self) {
        let (count, cv) = &*self.outstanding;
        let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = cv.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
}

static FROM_NUMPY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

static CURRENT_STREAM: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// What orders the runtime's reads of a CUDA tensor on device `index` after the caller's
/// current stream: an event recorded there, or none for the default stream (the runtime's own
/// work goes to the legacy default stream, which is ordered with it already).
fn ready_after_current_stream(py: Python<'_>, index: usize) -> PyResult<Option<Arc<StreamEvent>>> {
    let current = CURRENT_STREAM
        .get_or_try_init(py, || -> PyResult<_> { Ok(py.import("torch.cuda")?.getattr("current_stream")?.unbind()) })?;
    let stream: usize = current.call1(py, (index,))?.getattr(py, "cuda_stream")?.extract(py)?;
    if stream == 0 {
        return Ok(None);
    }
    StreamEvent::record(index, stream)
        .map(|e| Some(Arc::new(e)))
        .map_err(|e| bad_hidden(format!("ordering after the caller's CUDA stream: {e}"), None))
}

/// `t` as it lies, if that is the runtime's store device `on`: the tensor and what orders
/// reading it after its producer.
fn where_it_lies(py: Python<'_>, t: &Tensor, on: Option<Device>) -> PyResult<Option<Option<Arc<StreamEvent>>>> {
    if on != Some(t.device()) {
        return Ok(None);
    }
    match t.device() {
        Device::Cuda(index) => ready_after_current_stream(py, index).map(Some),
        _ => Ok(Some(None)),
    }
}

static NDARRAY: PyOnceLock<Option<Py<pyo3::types::PyType>>> = PyOnceLock::new();

/// `isinstance(obj, numpy.ndarray)`, with the type looked up once (numpy is optional).
fn is_ndarray(obj: &Bound<'_, PyAny>) -> bool {
    let py = obj.py();
    let ty = NDARRAY.get_or_init(py, || {
        let numpy = py.import("numpy").ok()?;
        numpy.getattr("ndarray").ok()?.cast_into::<pyo3::types::PyType>().ok().map(Bound::unbind)
    });
    ty.as_ref().is_some_and(|t| obj.is_instance(t.bind(py)).unwrap_or(false))
}

/// The tensor behind a torch tensor or a numpy array (sharing its memory).
fn tensor_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Tensor> {
    // SAFETY: tch checks the object's type before unpacking it.
    if let Some(t) = unsafe { Tensor::pyobject_unpack(obj.as_ptr() as *mut tch::python::CPyObject) }
        .map_err(|e| bad_hidden(format!("{what}: reading the tensor: {e}"), None))?
    {
        return Ok(t);
    }
    let py = obj.py();
    if !is_ndarray(obj) {
        let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        return Err(bad_hidden(format!("{what} must be a torch.Tensor or a numpy.ndarray, not {ty}"), None));
    }
    let from_numpy = FROM_NUMPY
        .get_or_try_init(py, || -> PyResult<_> { Ok(py.import("torch")?.getattr("from_numpy")?.unbind()) })?;
    let t = from_numpy
        .call1(py, (obj,))
        .map_err(|e| bad_hidden(format!("{what}: this numpy array cannot be read as a tensor ({e})"), None))?;
    // SAFETY: torch.from_numpy returns a tensor.
    unsafe { Tensor::pyobject_unpack(t.as_ptr() as *mut tch::python::CPyObject) }
        .ok()
        .flatten()
        .ok_or_else(|| bad_hidden(format!("{what}: torch.from_numpy did not return a tensor"), None))
}

/// The tensor on the host, in a dtype the runtime reads, contiguous in its last dimension:
/// the same tensor where possible.
fn readable(t: Tensor, what: &str) -> PyResult<Shared> {
    let mut t = t;
    let kind = t.kind();
    let kind = match kind {
        Kind::Float | Kind::BFloat16 | Kind::Half => kind,
        Kind::Double => {
            t = t.to_kind(Kind::Float);
            Kind::Float
        }
        other => {
            return Err(bad_hidden(
                format!("{what} has dtype {other:?}; the runtime reads float32, bfloat16 or float16"),
                None,
            ))
        }
    };
    if t.device() != Device::Cpu {
        t = t.to_device(Device::Cpu);
    }
    if t.dim() > 0 && t.stride().last() != Some(&1) {
        t = t.contiguous();
    }
    Ok(Shared { tensor: t, kind })
}

/// One hidden state: a 1-D tensor or array of D values. A float32 numpy array comes with its
/// [`Loan`], which the caller keeps (and waits on) until the runtime is done with it. A tensor
/// on `on` (the runtime's store device) is handed over where it lies.
pub fn one(obj: &Bound<'_, PyAny>, on: Option<Device>) -> PyResult<(Hidden, Option<Loan>)> {
    if is_ndarray(obj) {
        if let Some(loan) = Loan::numpy(obj, 1) {
            let len = loan.shape()[0];
            return Ok((loan.view(0, len), Some(loan)));
        }
    }
    let t = tensor_of(obj, "the hidden state")?;
    if t.dim() != 1 {
        return Err(bad_hidden(
            format!(
                "the hidden state must be 1-D, [D]; got shape {:?} (for one state per session, use Runtime.observe_batch)",
                t.size()
            ),
            None,
        ));
    }
    if let Some(ready) = where_it_lies(obj.py(), &t, on)? {
        return Ok((Hidden::tensor(t, ready), None));
    }
    let len = t.size()[0] as usize;
    let shared = Arc::new(readable(t, "the hidden state")?);
    Ok((Hidden::borrowed(Row { shared, offset: 0, len }), None))
}

/// The values of a dict keyed by model layer, in `layers`' order: its keys must be exactly
/// `layers`.
fn by_layer<'py>(dict: &Bound<'py, pyo3::types::PyDict>, layers: &[u32]) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let mut given: Vec<(u32, Bound<'py, PyAny>)> = Vec::with_capacity(dict.len());
    for (k, v) in dict.iter() {
        let l =
            k.extract().map_err(|_| bad_hidden(format!("hidden-state keys are model layers (ints); got {k}"), None))?;
        given.push((l, v));
    }
    given.sort_by_key(|(l, _)| *l);
    let keys: Vec<u32> = given.iter().map(|(l, _)| *l).collect();
    if keys != layers {
        return Err(bad_hidden(
            format!("hidden states for model layers {keys:?}, but the pack's probes read model layers {layers:?}"),
            None,
        ));
    }
    Ok(given.into_iter().map(|(_, v)| v).collect())
}

/// One token's hidden states, one per model layer of a pack that reads `layers`: a dict
/// `{model_layer: 1-D state}` (every layer, no other), or a 2-D tensor or array
/// `[len(layers), D]` / a sequence of 1-D states in `layers`' order.
pub fn layers(obj: &Bound<'_, PyAny>, layers: &[u32], on: Option<Device>) -> PyResult<(Vec<Hidden>, Vec<Loan>)> {
    let Ok(dict) = obj.cast::<pyo3::types::PyDict>() else {
        return rows_of(obj, layers.len(), "model layers", on);
    };
    let items = by_layer(dict, layers)?;
    let (mut states, mut loans) = (Vec::with_capacity(layers.len()), Vec::new());
    for item in items {
        let (h, loan) = one(&item, on)?;
        states.push(h);
        loans.extend(loan);
    }
    Ok((states, loans))
}

/// One decode step of `sessions` sessions: per session, its states (one per model layer of a
/// pack that reads `layers`). `obj` is what [`rows`] takes, or a dict {model_layer: that}
/// holding every layer of the pack.
pub fn batch(
    obj: &Bound<'_, PyAny>,
    sessions: usize,
    layers: &[u32],
    on: Option<Device>,
) -> PyResult<(Vec<Vec<Hidden>>, Vec<Loan>)> {
    let check = |states: &Vec<Hidden>| -> PyResult<()> {
        if states.len() != sessions {
            return Err(bad_hidden(
                format!("{} hidden states for {sessions} sessions: pass one per session", states.len()),
                None,
            ));
        }
        Ok(())
    };
    let Ok(dict) = obj.cast::<pyo3::types::PyDict>() else {
        let (states, loans) = rows(obj, sessions, on)?;
        check(&states)?;
        return Ok((states.into_iter().map(|h| vec![h]).collect(), loans));
    };
    let items = by_layer(dict, layers)?;
    let mut per_session: Vec<Vec<Hidden>> = (0..sessions).map(|_| Vec::with_capacity(layers.len())).collect();
    let mut loans = Vec::new();
    for item in items {
        let (states, mut more) = rows(&item, sessions, on)?;
        check(&states)?;
        for (mine, h) in per_session.iter_mut().zip(states) {
            mine.push(h);
        }
        loans.append(&mut more);
    }
    Ok((per_session, loans))
}

/// B hidden states: a 2-D tensor or array [B, D] (its rows shared, not copied), or a sequence
/// of 1-D ones. Loans as in [`one`]; tensors on `on` as there.
pub fn rows(obj: &Bound<'_, PyAny>, expected: usize, on: Option<Device>) -> PyResult<(Vec<Hidden>, Vec<Loan>)> {
    rows_of(obj, expected, "sessions", on)
}

/// B hidden states in host memory ([`rows`] with no store device): their values.
pub fn host_rows(obj: &Bound<'_, PyAny>, expected: usize) -> PyResult<(Vec<Vec<f32>>, Vec<Loan>)> {
    let (views, loans) = rows(obj, expected, None)?;
    let values = views
        .iter()
        .map(|h| {
            h.values()
                .map(|v| v.to_f32())
                .ok_or_else(|| bad_hidden("a hidden state is not in host memory".into(), None))
        })
        .collect::<PyResult<_>>()?;
    Ok((values, loans))
}

/// [`rows`], naming what the rows are (`sessions`, `model layers`) in its errors.
fn rows_of(
    obj: &Bound<'_, PyAny>,
    expected: usize,
    what: &str,
    on: Option<Device>,
) -> PyResult<(Vec<Hidden>, Vec<Loan>)> {
    let seq: Option<Vec<Bound<'_, PyAny>>> = if let Ok(l) = obj.cast::<pyo3::types::PyList>() {
        Some(l.iter().collect())
    } else if let Ok(t) = obj.cast::<pyo3::types::PyTuple>() {
        Some(t.iter().collect())
    } else {
        None
    };
    if let Some(items) = seq {
        let (mut states, mut loans) = (Vec::with_capacity(items.len()), Vec::new());
        for item in &items {
            let (h, loan) = one(item, on)?;
            states.push(h);
            loans.extend(loan);
        }
        return Ok((states, loans));
    }
    let count = |b: usize| -> PyResult<()> {
        if b != expected {
            return Err(bad_hidden(format!("{b} hidden states for {expected} {what}: pass one row each"), None));
        }
        Ok(())
    };
    if is_ndarray(obj) {
        if let Some(loan) = Loan::numpy(obj, 2) {
            let (b, d) = (loan.shape()[0], loan.shape()[1]);
            count(b)?;
            let states = (0..b).map(|i| loan.view(i * d, d)).collect();
            return Ok((states, vec![loan]));
        }
    }
    let t = tensor_of(obj, "the hidden states")?;
    if t.dim() != 2 {
        return Err(bad_hidden(
            format!("the hidden states must be 2-D, [{what}, D], or a list of 1-D states; got shape {:?}", t.size()),
            None,
        ));
    }
    let (b, d) = (t.size()[0] as usize, t.size()[1] as usize);
    count(b)?;
    if let Some(ready) = where_it_lies(obj.py(), &t, on)? {
        // Row views of the caller's tensor: no copy, on the host or the device.
        let states = (0..b)
            .map(|i| Ok(Hidden::tensor(t.f_select(0, i as i64)?, ready.clone())))
            .collect::<Result<_, tch::TchError>>()
            .map_err(|e| bad_hidden(format!("the hidden states: taking row views: {e}"), None))?;
        return Ok((states, Vec::new()));
    }
    let shared = Arc::new(readable(t, "the hidden states")?);
    let row_stride = if b > 1 { shared.tensor.stride()[0] as usize } else { d };
    let states =
        (0..b).map(|i| Hidden::borrowed(Row { shared: shared.clone(), offset: i * row_stride, len: d })).collect();
    Ok((states, Vec::new()))
}
