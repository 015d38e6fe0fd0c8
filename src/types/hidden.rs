//! A hidden state as callers hand it over: an owned `Vec<f32>`, a view of memory someone
//! else owns (a torch tensor, a numpy array) in f32, bf16 or f16, or a torch tensor on the
//! device the runtime scores on. The runtime reads it once, in `engine::prepare_hidden` (or
//! `engine::check_tensor` for a tensor on its device), which checks it, widens it to f32 and
//! normalizes it into the runtime's own working copy; a view is never copied before that, and
//! a tensor on the runtime's device never comes to the host.

use std::sync::Arc;

use half::{bf16, f16};
use tch::Tensor;

use super::cuda::StreamEvent;

/// The values of a hidden state, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum HiddenValues<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl HiddenValues<'_> {
    pub fn len(&self) -> usize {
        match self {
            HiddenValues::F32(v) => v.len(),
            HiddenValues::Bf16(v) => v.len(),
            HiddenValues::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i` as f32 (exact: bf16 and f16 widen without rounding).
    pub fn get(&self, i: usize) -> f32 {
        match self {
            HiddenValues::F32(v) => v[i],
            HiddenValues::Bf16(v) => v[i].to_f32(),
            HiddenValues::F16(v) => v[i].to_f32(),
        }
    }

    /// The values as f32, widened where needed.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HiddenValues::F32(v) => v.to_vec(),
            HiddenValues::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HiddenValues::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    pub fn dtype(&self) -> &'static str {
        match self {
            HiddenValues::F32(_) => "f32",
            HiddenValues::Bf16(_) => "bf16",
            HiddenValues::F16(_) => "f16",
        }
    }
}

impl<'a> From<&'a [f32]> for HiddenValues<'a> {
    fn from(v: &'a [f32]) -> Self {
        HiddenValues::F32(v)
    }
}

impl<'a> From<&'a Vec<f32>> for HiddenValues<'a> {
    fn from(v: &'a Vec<f32>) -> Self {
        HiddenValues::F32(v)
    }
}

/// Memory owned elsewhere that holds one hidden state, kept alive for as long as the runtime
/// holds the [`Hidden`]. It may be dropped on any thread.
pub trait HiddenSource: Send + 'static {
    fn values(&self) -> HiddenValues<'_>;
}

/// A torch tensor handed over where it lies, for a runtime that scores on its device (the
/// resident store): checked, normalized and scored there, never copied to the host.
pub struct DeviceHidden {
    /// 1-D, of D values, float32, bfloat16 or float16.
    pub tensor: Tensor,
    /// Recorded on the caller's CUDA stream when that is not the default stream: the runtime
    /// orders its reads after it (the caller need not synchronise).
    /// Shared by the rows of one call.
    pub ready: Option<Arc<StreamEvent>>,
}

/// One hidden state handed to the runtime.
pub struct Hidden(Repr);

enum Repr {
    Owned(Vec<f32>),
    Borrowed(Box<dyn HiddenSource>),
    Tensor(DeviceHidden),
}

impl Hidden {
    /// A view of memory someone else owns: read in place, not copied.
    pub fn borrowed(source: impl HiddenSource) -> Self {
        Hidden(Repr::Borrowed(Box::new(source)))
    }

    /// A tensor on the device the runtime scores on, read there. The tensor is kept alive
    /// until the token that reads it has been answered, so the caller's allocator cannot hand
    /// its memory out while the device may still be reading it.
    pub fn tensor(tensor: Tensor, ready: Option<Arc<StreamEvent>>) -> Self {
        Hidden(Repr::Tensor(DeviceHidden { tensor, ready }))
    }

    /// Where the state lies: values in host memory, or a tensor on a device.
    pub fn get(&self) -> HiddenRef<'_> {
        match &self.0 {
            Repr::Owned(v) => HiddenRef::Host(HiddenValues::F32(v)),
            Repr::Borrowed(s) => HiddenRef::Host(s.values()),
            Repr::Tensor(t) => HiddenRef::Device(t),
        }
    }

    /// The values, in host memory; `None` for a [`Hidden::tensor`].
    pub fn values(&self) -> Option<HiddenValues<'_>> {
        match self.get() {
            HiddenRef::Host(v) => Some(v),
            HiddenRef::Device(_) => None,
        }
    }
}

/// A [`Hidden`], borrowed: values in host memory, or a tensor to read on its device.
pub enum HiddenRef<'a> {
    Host(HiddenValues<'a>),
    Device(&'a DeviceHidden),
}

impl From<Vec<f32>> for Hidden {
    fn from(v: Vec<f32>) -> Self {
        Hidden(Repr::Owned(v))
    }
}

impl From<&[f32]> for Hidden {
    fn from(v: &[f32]) -> Self {
        Hidden(Repr::Owned(v.to_vec()))
    }
}

impl std::fmt::Debug for Hidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.get() {
            HiddenRef::Host(v) => write!(f, "Hidden({} × {})", v.len(), v.dtype()),
            HiddenRef::Device(t) => {
                write!(f, "Hidden({:?} {:?} on {:?})", t.tensor.size(), t.tensor.kind(), t.tensor.device())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Halves(Vec<bf16>);

    impl HiddenSource for Halves {
        fn values(&self) -> HiddenValues<'_> {
            HiddenValues::Bf16(&self.0)
        }
    }

    #[test]
    fn a_borrowed_source_widens_exactly() {
        let raw: Vec<f32> = vec![1.0, -2.5, 0.15625, 3.0e-3];
        let h = Hidden::borrowed(Halves(raw.iter().map(|&x| bf16::from_f32(x)).collect()));
        let widened = h.values().unwrap().to_f32();
        let want: Vec<f32> = raw.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        assert_eq!(widened, want);
        assert_eq!(h.values().unwrap().get(1), -2.5);
        assert_eq!(format!("{h:?}"), "Hidden(4 × bf16)");
        assert_eq!(Hidden::from(raw.clone()).values().unwrap().to_f32(), raw);
    }

    #[test]
    fn a_tensor_has_no_host_values_and_says_what_it_is() {
        let h = Hidden::tensor(Tensor::from_slice(&[1.0f32, 2.0, 3.0]), None);
        assert!(h.values().is_none());
        assert!(matches!(h.get(), HiddenRef::Device(t) if t.tensor.size() == [3]));
        assert_eq!(format!("{h:?}"), "Hidden([3] Float on Cpu)");
    }
}
