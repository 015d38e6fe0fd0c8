//! The per-token algorithm, once, for every engine: validate and normalize the hidden state,
//! score the active set, expand, prune, report (docs/cascade-semantics.md).

use std::sync::Arc;
use std::time::Instant;

use tracing::debug_span;

use super::{BackendError, Engine, EngineError, ProbeBackend, ReportEntry, StageTimings, TokenReport};
use crate::config::{CascadeConfig, Expansion, Normalization};
use crate::pack::{ConceptId, Pack};
use crate::policy::{self, ConceptSet, Scored};

pub struct CascadeEngine<B> {
    pack: Arc<Pack>,
    config: CascadeConfig,
    normalization: Normalization,
    backend: B,
    active: ConceptSet,
    base: ConceptSet,
}

impl<B: ProbeBackend> CascadeEngine<B> {
    pub fn new(pack: Arc<Pack>, config: &CascadeConfig, mut backend: B) -> Result<Self, EngineError> {
        let h = pack.hierarchy();
        let mut base = ConceptSet::with_capacity(h.len());
        for &layer in &config.base_layers {
            h.layer_members(layer).iter().for_each(|&c| {
                base.insert(ConceptId(c));
            });
        }
        if base.is_empty() {
            return Err(EngineError::Setup(format!(
                "cascade.base_layers = {:?} selects no concept of the pack ({} layers)",
                config.base_layers,
                h.layer_count()
            )));
        }
        if base.len() > config.max_loaded {
            return Err(EngineError::Setup(format!(
                "cascade.max_loaded = {} is smaller than the base layers' {} probes",
                config.max_loaded,
                base.len()
            )));
        }
        let ids: Vec<ConceptId> = base.iter().collect();
        backend.load(&ids).map_err(EngineError::BaseLoad)?;
        let normalization = config.normalization.unwrap_or_else(|| pack.input_normalization().into());
        Ok(Self { config: config.clone(), normalization, backend, active: base.clone(), base, pack })
    }

    fn prepare_hidden(&self, token: usize, hidden: &[f32]) -> Result<Vec<f32>, EngineError> {
        let expected = self.pack.hidden_dim();
        if hidden.len() != expected {
            return Err(EngineError::Width { token, got: hidden.len(), expected });
        }
        if let Some((index, &value)) = hidden.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(EngineError::NonFinite { token, index, value });
        }
        Ok(match self.normalization {
            Normalization::None => hidden.to_vec(),
            Normalization::LayerNorm => layer_norm(hidden),
        })
    }

    fn run_token(
        &mut self,
        h: &[f32],
        loaded: &mut Vec<ConceptId>,
        stages: &mut StageTimings,
    ) -> Result<TokenOutcome, BackendError> {
        let t = Instant::now();
        let initial: Vec<ConceptId> = self.active.iter().collect();
        let logits = self.backend.score(&initial, h)?;
        let mut scored: Vec<Scored> = initial.iter().zip(logits).map(|(&id, logit)| Scored { id, logit }).collect();
        stages.initial_scoring += t.elapsed();

        let hierarchy = self.pack.hierarchy();
        let mut decomposed = ConceptSet::with_capacity(hierarchy.len());
        let (mut children, mut skipped_by_cap) = (0, 0);
        let rounds = match self.config.expansion {
            Expansion::Threshold { .. } => 1,
            Expansion::Decompose { max_depth, .. } => max_depth,
        };
        for _ in 0..rounds {
            let t = Instant::now();
            let room = self.config.max_loaded.saturating_sub(self.active.len());
            let plan = match self.config.expansion {
                Expansion::Threshold { load_threshold } => {
                    Some(policy::threshold_expansion(hierarchy, &scored, &self.active, load_threshold, room))
                }
                Expansion::Decompose { top_k, .. } => {
                    policy::decompose_round(hierarchy, &scored, &decomposed, &self.active, top_k, room)
                }
            };
            stages.expansion_lookup += t.elapsed();
            let Some(plan) = plan else { break };
            plan.decomposed.iter().for_each(|&p| {
                decomposed.insert(p);
            });
            children += plan.requested;
            skipped_by_cap += plan.skipped_by_cap;
            if plan.activate.is_empty() {
                continue;
            }
            let t = Instant::now();
            self.backend.load(&plan.activate)?;
            for &id in &plan.activate {
                self.active.insert(id);
                loaded.push(id);
            }
            stages.loading += t.elapsed();
            let t = Instant::now();
            let logits = self.backend.score(&plan.activate, h)?;
            scored.extend(plan.activate.iter().zip(logits).map(|(&id, logit)| Scored { id, logit }));
            stages.new_scoring += t.elapsed();
        }

        let t = Instant::now();
        // Every active probe was scored this token, so `scored` is the active set with scores.
        debug_assert_eq!(scored.len(), self.active.len());
        let is_base = |id| self.base.contains(id);
        let dropped = policy::prune(&self.config.pruning, &scored, is_base, self.config.max_loaded, skipped_by_cap);
        self.backend.unload(&dropped);
        dropped.iter().for_each(|&id| {
            self.active.remove(id);
        });
        stages.pruning += t.elapsed();

        let t = Instant::now();
        let hide = self.config.hide_decomposed_parents.then_some(&decomposed);
        let top = policy::report(&scored, self.config.report_top_k, hide)
            .into_iter()
            .map(|s| ReportEntry {
                id: s.id,
                name: hierarchy.name(s.id).to_string(),
                layer: hierarchy.layer(s.id),
                prob: s.prob(),
                logit: s.logit,
            })
            .collect();
        stages.sorting += t.elapsed();
        Ok(TokenOutcome { top, children, skipped_by_cap, unloaded: dropped.len(), scored: scored.len() })
    }
}

struct TokenOutcome {
    top: Vec<ReportEntry>,
    children: usize,
    skipped_by_cap: usize,
    unloaded: usize,
    scored: usize,
}

impl<B: ProbeBackend> Engine for CascadeEngine<B> {
    fn name(&self) -> &'static str {
        self.backend.name()
    }

    fn observe(&mut self, token: usize, hidden: &[f32]) -> Result<TokenReport, EngineError> {
        let _span = debug_span!("token", index = token, engine = self.backend.name()).entered();
        let start = Instant::now();
        let h = self.prepare_hidden(token, hidden)?;
        let mut loaded = Vec::new();
        let mut stages = StageTimings::default();
        match self.run_token(&h, &mut loaded, &mut stages) {
            Ok(o) => Ok(TokenReport {
                index: token,
                top: o.top,
                children: o.children,
                loaded: loaded.len(),
                unloaded: o.unloaded,
                skipped_by_cap: o.skipped_by_cap,
                scored: o.scored,
                active: self.active.len(),
                stages,
                elapsed: start.elapsed(),
            }),
            Err(source) => {
                // Leave the active set as it was before the token, so the next one starts clean.
                self.backend.unload(&loaded);
                loaded.iter().for_each(|&id| {
                    self.active.remove(id);
                });
                Err(EngineError::Backend { token, source })
            }
        }
    }

    fn active(&self) -> Vec<ConceptId> {
        self.active.iter().collect()
    }
}

/// LayerNorm over the whole vector, no affine parameters, eps 1e-5 (PyTorch's definition:
/// biased variance). Accumulates in f64 so every engine normalizes identically.
pub fn layer_norm(x: &[f32]) -> Vec<f32> {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + 1e-5).sqrt();
    x.iter().map(|&v| ((v as f64 - mean) * inv) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::layer_norm;

    #[test]
    fn layer_norm_matches_the_definition() {
        let y = layer_norm(&[1.0, 2.0, 3.0, 4.0]);
        // mean 2.5, biased variance 1.25
        let want = [-1.5f64, -0.5, 0.5, 1.5].map(|v| (v / (1.25f64 + 1e-5).sqrt()) as f32);
        assert_eq!(y, want);
    }
}
