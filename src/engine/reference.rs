//! The reference engine's backend: obviously right rather than fast. Probes are loaded
//! synchronously from the pack when activated and dropped when deactivated; scoring stacks
//! the requested probes and runs them through `batched_logits`, once.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::tensors::{batched_logits, hidden_column, to_host_f32, HeldProbes, ProbeTensors, RowSplit};
use super::{BackendError, ProbeBackend};
use crate::pack::{Pack, ProbeId};

pub struct ReferenceBackend(HeldProbes);

impl ReferenceBackend {
    pub fn new(pack: Arc<Pack>, device: Device, compute: Kind) -> Self {
        Self(HeldProbes::new(pack, device, compute))
    }
}

impl ProbeBackend for ReferenceBackend {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn load(&mut self, ids: &[ProbeId]) -> Result<(), BackendError> {
        for &id in ids {
            let probe = self.0.read(id, self.0.device, self.0.compute)?;
            self.0.insert(id, probe);
        }
        Ok(())
    }

    fn unload(&mut self, ids: &[ProbeId]) {
        self.0.remove(ids);
    }

    fn score(&mut self, ids: &[ProbeId], hidden: &[f32]) -> Result<Vec<f32>, BackendError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let probes: Vec<&ProbeTensors> = ids.iter().map(|&id| self.0.get(id)).collect::<Result<_, _>>()?;
        let stack =
            |f: &dyn Fn(&ProbeTensors) -> &Tensor| Tensor::f_stack(&probes.iter().map(|p| f(p)).collect::<Vec<_>>(), 0);
        let x = hidden_column(hidden, self.0.device, self.0.compute)?;
        let logits = batched_logits(
            &stack(&|p| &p.w1)?,
            &stack(&|p| &p.b1)?.f_unsqueeze(2)?,
            &stack(&|p| &p.w2)?,
            &stack(&|p| &p.b2)?.f_unsqueeze(2)?,
            &stack(&|p| &p.w3)?,
            &stack(&|p| &p.b3)?.f_unsqueeze(2)?,
            &x,
            // Obviously right: one `addmv` call (the runtime's row blocks give the same bits).
            &RowSplit::none(),
        )?;
        Ok(to_host_f32(&logits)?)
    }
}
