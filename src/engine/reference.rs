//! The reference engine's backend: obviously right rather than fast. Probes are loaded
//! synchronously from the pack when activated and dropped when deactivated; scoring stacks
//! the requested probes and runs them through `batched_logits`, once.

use std::collections::HashMap;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::tensors::{batched_logits, hidden_column, to_host_f32, ProbeTensors};
use super::{BackendError, ProbeBackend};
use crate::pack::{ConceptId, Pack};

pub struct ReferenceBackend {
    pack: Arc<Pack>,
    device: Device,
    compute: Kind,
    loaded: HashMap<ConceptId, ProbeTensors>,
}

impl ReferenceBackend {
    pub fn new(pack: Arc<Pack>, device: Device, compute: Kind) -> Self {
        Self { pack, device, compute, loaded: HashMap::new() }
    }
}

impl ProbeBackend for ReferenceBackend {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn load(&mut self, ids: &[ConceptId]) -> Result<(), BackendError> {
        for &id in ids {
            let bytes = self.pack.read_probe(id)?;
            let layout = self.pack.layout();
            let probe =
                ProbeTensors::from_bytes(&layout, &self.pack.tensor_offsets(id), &bytes, self.device, self.compute)?;
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
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let probes: Vec<&ProbeTensors> =
            ids.iter().map(|id| self.loaded.get(id).ok_or(BackendError::NotLoaded(*id))).collect::<Result<_, _>>()?;
        let stack =
            |f: &dyn Fn(&ProbeTensors) -> &Tensor| Tensor::f_stack(&probes.iter().map(|p| f(p)).collect::<Vec<_>>(), 0);
        let x = hidden_column(hidden, self.device, self.compute)?;
        let logits = batched_logits(
            &stack(&|p| &p.w1)?,
            &stack(&|p| &p.b1)?.f_unsqueeze(2)?,
            &stack(&|p| &p.w2)?,
            &stack(&|p| &p.b2)?.f_unsqueeze(2)?,
            &stack(&|p| &p.w3)?,
            &stack(&|p| &p.b3)?.f_unsqueeze(2)?,
            &x,
        )?;
        Ok(to_host_f32(&logits)?)
    }
}
