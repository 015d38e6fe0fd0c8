//! The seed's cost model, kept as the baseline every speedup is measured against. Each load
//! does what the seed's `load_probe` did: read the probe's file into a state dict
//! (`torch.load`), construct a fresh model with PyTorch's default Linear initialization
//! (`SimpleMLP(hidden_dim)`), copy the state dict into it (`load_state_dict`) and move it to the
//! device (`.to(device)`). Each probe is scored on its own, with a host sync per probe (the
//! seed's `.item()`). Only active probes are held, as the seed held its loaded models.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::tensors::{hidden_column, HeldProbes};
use super::{BackendError, ProbeBackend};
use crate::pack::{Pack, ProbeId};

pub struct NaiveBackend(HeldProbes);

impl NaiveBackend {
    pub fn new(pack: Arc<Pack>, device: Device, compute: Kind) -> Self {
        Self(HeldProbes::new(pack, device, compute))
    }
}

impl ProbeBackend for NaiveBackend {
    fn name(&self) -> &'static str {
        "naive"
    }

    fn load(&mut self, ids: &[ProbeId]) -> Result<(), BackendError> {
        let (device, compute) = (self.0.device, self.0.compute);
        for &id in ids {
            // torch.load: a fresh open and read, tensors built on the host.
            let state = self.0.read(id, Device::Cpu, Kind::Float)?;
            // SimpleMLP(D) → load_state_dict → .to(device).
            let model = state.try_map(fresh_param)?;
            let probe = model.try_map(|t| t.f_to_kind(compute)?.f_to_device(device))?;
            self.0.insert(id, probe);
        }
        Ok(())
    }

    fn unload(&mut self, ids: &[ProbeId]) {
        self.0.remove(ids);
    }

    fn score(&mut self, ids: &[ProbeId], hidden: &[f32]) -> Result<Vec<f32>, BackendError> {
        let x = hidden_column(hidden, self.0.device, self.0.compute)?;
        let mut logits = Vec::with_capacity(ids.len());
        for id in ids {
            let p = self.0.get(*id)?;
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
