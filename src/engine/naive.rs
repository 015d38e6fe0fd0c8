//! The seed's cost model, kept as the baseline every speedup is measured against. Each load
//! does what the seed's `load_probe` did: read the probe's file into a state dict
//! (`torch.load`), construct a fresh model with PyTorch's default Linear initialization
//! (`SimpleMLP(hidden_dim)`), copy the state dict into it (`load_state_dict`) and move it to the
//! device (`.to(device)`). Each probe is scored on its own, with a host sync per probe (the
//! seed's `.item()`). Only active probes are held, as the seed held its loaded models.

use std::collections::HashMap;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::tensors::{hidden_column, ProbeTensors};
use super::{BackendError, ProbeBackend};
use crate::pack::{ConceptId, Pack};

pub struct NaiveBackend {
    pack: Arc<Pack>,
    device: Device,
    compute: Kind,
    loaded: HashMap<ConceptId, ProbeTensors>,
}

impl NaiveBackend {
    pub fn new(pack: Arc<Pack>, device: Device, compute: Kind) -> Self {
        Self { pack, device, compute, loaded: HashMap::new() }
    }
}

impl ProbeBackend for NaiveBackend {
    fn name(&self) -> &'static str {
        "naive"
    }

    fn load(&mut self, ids: &[ConceptId]) -> Result<(), BackendError> {
        for &id in ids {
            // torch.load: a fresh open and read, tensors built on the host.
            let bytes = self.pack.read_probe(id)?;
            let state = ProbeTensors::from_bytes(
                &self.pack.layout(),
                &self.pack.tensor_offsets(id),
                &bytes,
                Device::Cpu,
                Kind::Float,
            )?;
            // SimpleMLP(D) → load_state_dict → .to(device).
            let model = ProbeTensors {
                w1: fresh_param(&state.w1)?,
                b1: fresh_param(&state.b1)?,
                w2: fresh_param(&state.w2)?,
                b2: fresh_param(&state.b2)?,
                w3: fresh_param(&state.w3)?,
                b3: fresh_param(&state.b3)?,
            };
            let on_device = |t: &Tensor| t.f_to_kind(self.compute)?.f_to_device(self.device);
            let probe = ProbeTensors {
                w1: on_device(&model.w1)?,
                b1: on_device(&model.b1)?,
                w2: on_device(&model.w2)?,
                b2: on_device(&model.b2)?,
                w3: on_device(&model.w3)?,
                b3: on_device(&model.b3)?,
            };
            self.loaded.insert(id, probe);
        }
        Ok(())
    }

    fn unload(&mut self, ids: &[ConceptId]) {
        for id in ids {
            self.loaded.remove(id);
        }
    }

    fn score(&mut self, ids: &[ConceptId], hidden: &[f32]) -> Result<Vec<f32>, BackendError> {
        let x = hidden_column(hidden, self.device, self.compute)?;
        let mut logits = Vec::with_capacity(ids.len());
        for id in ids {
            let p = self.loaded.get(id).ok_or(BackendError::NotLoaded(*id))?;
            let a1 = p.b1.f_unsqueeze(1)?.f_addmm(&p.w1, &x)?.f_relu()?;
            let a2 = p.b2.f_unsqueeze(1)?.f_addmm(&p.w2, &a1)?.f_relu()?;
            let logit = p.b3.f_unsqueeze(1)?.f_addmm(&p.w3, &a2)?;
            logits.push(logit.f_double_value(&[0, 0])? as f32);
        }
        Ok(logits)
    }
}

/// A parameter the way `nn.Linear` makes one (kaiming-uniform with a = √5, i.e. uniform in
/// ±1/√fan_in), then overwritten with the loaded values, as `load_state_dict` does.
fn fresh_param(loaded: &Tensor) -> Result<Tensor, tch::TchError> {
    let size = loaded.size();
    let fan_in = *size.last().unwrap_or(&1) as f64;
    let bound = 1.0 / fan_in.max(1.0).sqrt();
    let mut param = Tensor::f_empty(size.as_slice(), (Kind::Float, Device::Cpu))?;
    let _ = param.f_uniform_(-bound, bound)?;
    param.f_copy_(loaded)?;
    Ok(param)
}
