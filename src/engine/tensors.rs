//! tch helpers shared by the engines: device selection and probe tensors from pack bytes.

use std::collections::HashMap;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::{BackendError, EngineError};
use crate::config::{DeviceConfig, DeviceKind};
use crate::pack::{ConceptId, DType, Pack, ProbeLayout, TensorOffsets};

pub fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::Bf16 => Kind::BFloat16,
    }
}

/// Resolves the configured device, and sets the math thread count (a process-wide setting).
pub fn open_device(config: &DeviceConfig) -> Result<Device, EngineError> {
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    tch::set_num_threads(threads as i32);
    match config.kind().map_err(|m| EngineError::Device(format!("device.device {m}")))? {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda(n) => {
            let count = tch::Cuda::device_count();
            if (n as i64) < count {
                Ok(Device::Cuda(n))
            } else {
                Err(EngineError::Device(format!(
                    "device.device = \"{}\" but libtorch sees {count} CUDA device(s) (a CPU-only libtorch sees none)",
                    config.device
                )))
            }
        }
    }
}

/// One probe's six tensors on the device, in the compute dtype.
pub struct ProbeTensors {
    pub w1: Tensor,
    pub b1: Tensor,
    pub w2: Tensor,
    pub b2: Tensor,
    pub w3: Tensor,
    pub b3: Tensor,
}

impl ProbeTensors {
    /// Builds fresh tensors from a probe's checked bytes.
    pub fn from_bytes(
        layout: &ProbeLayout,
        offsets: &TensorOffsets,
        bytes: &[u8],
        device: Device,
        compute: Kind,
    ) -> Result<Self, tch::TchError> {
        let storage = kind_of(layout.dtype);
        let ranges = layout.ranges(offsets);
        let slots = layout.tensors();
        let make = |i: usize| -> Result<Tensor, tch::TchError> {
            let shape: Vec<i64> = slots[i].shape().iter().map(|&d| d as i64).collect();
            Tensor::f_from_data_size(&bytes[ranges[i].clone()], &shape, storage)?
                .f_to_kind(compute)?
                .f_to_device(device)
        };
        use crate::pack::layout::{B1, B2, B3, W1, W2, W3};
        Ok(Self { w1: make(W1)?, b1: make(B1)?, w2: make(W2)?, b2: make(B2)?, w3: make(W3)?, b3: make(B3)? })
    }
}

impl ProbeTensors {
    /// Applies `f` to each of the six tensors.
    pub fn try_map(&self, f: impl Fn(&Tensor) -> Result<Tensor, tch::TchError>) -> Result<Self, tch::TchError> {
        Ok(Self {
            w1: f(&self.w1)?,
            b1: f(&self.b1)?,
            w2: f(&self.w2)?,
            b2: f(&self.b2)?,
            w3: f(&self.w3)?,
            b3: f(&self.b3)?,
        })
    }
}

/// What a synchronous backend holds: the tensors of its active probes, on one device.
pub struct HeldProbes {
    pub pack: Arc<Pack>,
    pub device: Device,
    pub compute: Kind,
    probes: HashMap<ConceptId, ProbeTensors>,
}

impl HeldProbes {
    pub fn new(pack: Arc<Pack>, device: Device, compute: Kind) -> Self {
        Self { pack, device, compute, probes: HashMap::new() }
    }

    /// Reads a probe from the pack (a fresh open and read, CRC checked) into new tensors.
    pub fn read(&self, id: ConceptId, device: Device, kind: Kind) -> Result<ProbeTensors, BackendError> {
        let bytes = self.pack.read_probe(id)?;
        Ok(ProbeTensors::from_bytes(&self.pack.layout(), &self.pack.tensor_offsets(id), &bytes, device, kind)?)
    }

    pub fn insert(&mut self, id: ConceptId, probe: ProbeTensors) {
        self.probes.insert(id, probe);
    }

    pub fn remove(&mut self, ids: &[ConceptId]) {
        for id in ids {
            self.probes.remove(id);
        }
    }

    pub fn get(&self, id: ConceptId) -> Result<&ProbeTensors, BackendError> {
        self.probes.get(&id).ok_or(BackendError::NotLoaded(id))
    }
}

/// The hidden state as a [D, 1] column on the device.
pub fn hidden_column(hidden: &[f32], device: Device, compute: Kind) -> Result<Tensor, tch::TchError> {
    Tensor::f_from_slice(hidden)?.f_view([hidden.len() as i64, 1])?.f_to_kind(compute)?.f_to_device(device)
}

/// Copies a small float tensor back to the host as f32.
pub fn to_host_f32(t: &Tensor) -> Result<Vec<f32>, tch::TchError> {
    let t = t.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?.f_view([-1])?;
    Vec::<f32>::try_from(&t)
}

/// Logits of `n` stacked probes: weights `[n,128,D]`, `[n,64,128]`, `[n,1,64]`, biases
/// `[n,128,1]`, `[n,64,1]`, `[n,1,1]` (contiguous), hidden state `[D,1]`. The first layer is
/// one matrix-vector product over all `n·128` rows: on CPU that runs near the memory-bandwidth
/// floor, where `baddbmm` with a broadcast input ran 2.5× slower (measured on a 2-core
/// machine). Every engine scores through this function, so their logits agree bit for bit.
pub fn batched_logits(
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
    w3: &Tensor,
    b3: &Tensor,
    x: &Tensor,
) -> Result<Tensor, tch::TchError> {
    let n = w1.size()[0];
    let d = x.size()[0];
    let a1 = b1.f_view([-1])?.f_addmv(&w1.f_view([-1, d])?, &x.f_view([-1])?)?.f_relu()?.f_view([n, -1, 1])?;
    let a2 = b2.f_baddbmm(w2, &a1, 1, 1)?.f_relu()?;
    b3.f_baddbmm(w3, &a2, 1, 1)?.f_view([-1])
}
