//! Python hidden states into the runtime without a host copy.
//!
//! A torch tensor crosses as the same `at::Tensor` (tch's `python-extension`: a new
//! reference, no copy); a numpy array becomes one through `torch.from_numpy`, which shares its
//! buffer. The runtime then reads the values in place, once, when it checks and normalizes
//! them ([`probe_cascade::engine::prepare_hidden`]). Copies happen only where they must: a CUDA
//! tensor scored by the CPU runtime comes to the host, f64 narrows to f32, and a tensor
//! whose last dimension is strided is made contiguous.
//!
//! The tensor is kept alive by the runtime until it has been read, so it may be dropped on a
//! runtime thread: a libtorch refcount, no GIL needed. Callers must not write to a tensor
//! while it is being observed (as with any zero-copy API).

use std::sync::Arc;

use half::{bf16, f16};
use probe_cascade::engine::{Hidden, HiddenSource, HiddenValues};
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

static FROM_NUMPY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The tensor behind a torch tensor or a numpy array (sharing its memory).
fn tensor_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Tensor> {
    // SAFETY: tch checks the object's type before unpacking it.
    if let Some(t) = unsafe { Tensor::pyobject_unpack(obj.as_ptr() as *mut tch::python::CPyObject) }
        .map_err(|e| bad_hidden(format!("{what}: reading the tensor: {e}"), None))?
    {
        return Ok(t);
    }
    let py = obj.py();
    let is_ndarray = obj.get_type().name().is_ok_and(|n| n == "ndarray") && obj.hasattr("__array_interface__")?;
    if !is_ndarray {
        let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        return Err(bad_hidden(format!("{what} must be a torch.Tensor or a numpy.ndarray, not {ty}"), None));
    }
    let from_numpy = FROM_NUMPY.get_or_try_init(py, || -> PyResult<_> {
        Ok(py.import("torch")?.getattr("from_numpy")?.unbind())
    })?;
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

/// One hidden state: a 1-D tensor or array of D values.
pub fn one(obj: &Bound<'_, PyAny>) -> PyResult<Hidden> {
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
    let len = t.size()[0] as usize;
    let shared = Arc::new(readable(t, "the hidden state")?);
    Ok(Hidden::borrowed(Row { shared, offset: 0, len }))
}

/// B hidden states: a 2-D tensor or array [B, D] (its rows shared, not copied), or a sequence
/// of 1-D ones.
pub fn rows(obj: &Bound<'_, PyAny>, expected: usize) -> PyResult<Vec<Hidden>> {
    if let Ok(seq) = obj.cast::<pyo3::types::PyList>() {
        return seq.iter().map(|item| one(&item)).collect();
    }
    if let Ok(seq) = obj.cast::<pyo3::types::PyTuple>() {
        return seq.iter().map(|item| one(&item)).collect();
    }
    let t = tensor_of(obj, "the hidden states")?;
    if t.dim() != 2 {
        return Err(bad_hidden(
            format!("the hidden states must be 2-D, [sessions, D], or a list of 1-D states; got shape {:?}", t.size()),
            None,
        ));
    }
    let (b, d) = (t.size()[0] as usize, t.size()[1] as usize);
    if b != expected {
        return Err(bad_hidden(format!("{b} hidden states for {expected} sessions: pass one row per session"), None));
    }
    let shared = Arc::new(readable(t, "the hidden states")?);
    let row_stride = if b > 1 { shared.tensor.stride()[0] as usize } else { d };
    Ok((0..b).map(|i| Hidden::borrowed(Row { shared: shared.clone(), offset: i * row_stride, len: d })).collect())
}
