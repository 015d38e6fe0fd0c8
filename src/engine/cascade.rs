//! The per-token algorithm, once, for every engine: validate and normalize the hidden state,
//! score the active set, expand, prune, report (docs/cascade-semantics.md).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tracing::debug_span;

use super::{BackendError, Engine, EngineError, HiddenValues, ProbeBackend, ReportEntry, StageTimings, TokenReport};
use crate::config::{CascadeConfig, Normalization};
use crate::pack::{ConceptId, Pack, ProbeId};
use crate::policy::{self, lens::score_lenses, simplex::Baselines, ConceptSet, Scored, TokenCascade, Watch};
use crate::types::hidden::DeviceHidden;
use crate::types::HiddenError;
use crate::types::{Alert, ProbeScore, SimplexReading};

pub struct CascadeEngine<B> {
    pack: Arc<Pack>,
    config: Arc<CascadeConfig>,
    watch: Watch,
    normalization: Normalization,
    backend: B,
    active: ConceptSet,
    base: ConceptSet,
    /// v2 packs: this token's probe logits of every lens scored, for the report.
    probe_logits: HashMap<ConceptId, Vec<f32>>,
    /// The simplex poles' rolling baselines in this stream.
    baselines: Baselines,
    /// Every simplex pole's probe (`Pack::pole_probes`), scored each token; often none.
    poles: Vec<ProbeId>,
}

impl<B: ProbeBackend> CascadeEngine<B> {
    pub fn new(pack: Arc<Pack>, config: &CascadeConfig, mut backend: B) -> Result<Self, EngineError> {
        let base = policy::base_set(pack.hierarchy(), config)?;
        let watch = Watch::compile(pack.hierarchy(), &config.watch, policy::default_alert_threshold(&pack))?;
        let probes: Vec<ProbeId> = policy::pinned_probes(&pack, &base).collect();
        backend.load(&probes).map_err(EngineError::BaseLoad)?;
        let normalization = config.normalization_for(pack.input_normalization());
        Ok(Self {
            config: Arc::new(config.clone()),
            watch,
            normalization,
            backend,
            active: base.clone(),
            base,
            baselines: Baselines::for_pack(&pack),
            poles: pack.pole_probes().collect(),
            pack,
            probe_logits: HashMap::new(),
        })
    }

    /// The probes of `concepts`, in order.
    fn probes(&self, concepts: &[ConceptId]) -> Vec<ProbeId> {
        concepts.iter().flat_map(|&c| self.pack.probes_of(c)).collect()
    }

    /// Scores lenses: each probe against the hidden state of its model layer (one backend call
    /// per model layer), then each lens from its probes ([`score_lens`]).
    fn score(&mut self, concepts: &[ConceptId], states: &[Vec<f32>]) -> Result<Vec<Scored>, BackendError> {
        let probes = self.probes(concepts);
        let logits = self.logits(&probes, states)?;
        Ok(score_lenses(&self.pack, concepts, &logits, &mut self.probe_logits))
    }

    /// Logits of loaded probes, in order, each against its model layer's state (one backend
    /// call per model layer).
    fn logits(&mut self, probes: &[ProbeId], states: &[Vec<f32>]) -> Result<Vec<f32>, BackendError> {
        let mut logits = vec![0f32; probes.len()];
        for (state, h) in states.iter().enumerate() {
            let (at, ids): (Vec<usize>, Vec<ProbeId>) = probes
                .iter()
                .enumerate()
                .filter(|(_, &p)| self.pack.probe(p).state as usize == state)
                .map(|(i, &p)| (i, p))
                .unzip();
            if ids.is_empty() {
                continue;
            }
            for (i, l) in at.into_iter().zip(self.backend.score(&ids, h)?) {
                logits[i] = l;
            }
        }
        Ok(logits)
    }

    fn run_token(
        &mut self,
        h: &[Vec<f32>],
        loaded: &mut Vec<ConceptId>,
        stages: &mut StageTimings,
    ) -> Result<TokenOutcome, BackendError> {
        let t = Instant::now();
        self.probe_logits.clear();
        let initial: Vec<ConceptId> = self.active.iter().collect();
        let initial = self.score(&initial, h)?;
        let pole_logits = if self.poles.is_empty() {
            Vec::new()
        } else {
            let poles = std::mem::take(&mut self.poles);
            let logits = self.logits(&poles, h);
            self.poles = poles;
            logits?
        };
        stages.initial_scoring += t.elapsed();

        let pack = self.pack.clone();
        let config = self.config.clone();
        let hierarchy = pack.hierarchy();
        let mut token = TokenCascade::new(hierarchy, &config, initial);
        loop {
            let t = Instant::now();
            let next = token.next_expansion(&self.active);
            stages.expansion_lookup += t.elapsed();
            let Some(ids) = next else { break };
            let t = Instant::now();
            self.backend.load(&self.probes(&ids))?;
            for &id in &ids {
                self.active.insert(id);
                loaded.push(id);
            }
            stages.loading += t.elapsed();
            let t = Instant::now();
            token.add_scores(&self.score(&ids, h)?);
            stages.new_scoring += t.elapsed();
        }

        let t = Instant::now();
        debug_assert_eq!(token.scored().len(), self.active.len());
        let dropped = token.prune(|id| self.base.contains(id));
        self.backend.unload(&self.probes(&dropped));
        dropped.iter().for_each(|&id| {
            self.active.remove(id);
        });
        stages.pruning += t.elapsed();

        let t = Instant::now();
        let shown = policy::lens::reported(&pack, token.scored());
        let mut top = report_entries(hierarchy, &token.report(&shown));
        probe_scores(&pack, &mut top, &self.probe_logits);
        let alerts = alert_entries(hierarchy, &self.watch, &shown);
        stages.sorting += t.elapsed();
        let simplex = simplex_readings(&pack, &mut self.baselines, &pole_logits);
        Ok(TokenOutcome {
            top,
            alerts,
            simplex,
            children: token.children,
            skipped_by_cap: token.skipped_by_cap,
            unloaded: dropped.len(),
            scored: policy::scored_by_id(&shown),
        })
    }
}

/// Names and probabilities for reported scores.
pub fn report_entries(hierarchy: &crate::pack::Hierarchy, top: &[Scored]) -> Vec<ReportEntry> {
    top.iter()
        .map(|s| ReportEntry {
            id: s.id,
            name: hierarchy.name(s.id).to_string(),
            layer: hierarchy.layer(s.id),
            prob: s.prob,
            logit: s.logit,
            probes: Vec::new(),
        })
        .collect()
}

/// The probes of each reported lens, from their logits this token (a v2 pack's report).
pub fn probe_scores(pack: &Pack, top: &mut [ReportEntry], logits: &HashMap<ConceptId, Vec<f32>>) {
    for e in top {
        let Some(l) = logits.get(&e.id) else { continue };
        e.probes = pack
            .probes_of(e.id)
            .zip(l)
            .map(|(p, &logit)| {
                let prob = policy::sigmoid(logit);
                ProbeScore {
                    model_layer: pack.probe(p).model_layer,
                    logit,
                    prob,
                    calibrated: pack.quantiles(p).map(|q| policy::lens::calibrate(prob, q) as f32),
                }
            })
            .collect();
    }
}

/// Names for a token's alerts: every alert of `watch` over `scored` (everything scored this
/// token, not the report).
pub fn alert_entries(hierarchy: &crate::pack::Hierarchy, watch: &Watch, scored: &[Scored]) -> Vec<Alert> {
    if watch.is_empty() {
        return Vec::new();
    }
    watch
        .alerts(scored)
        .into_iter()
        .map(|a| Alert {
            profile: watch.name(a.profile).to_string(),
            id: a.scored.id,
            concept: hierarchy.name(a.scored.id).to_string(),
            layer: hierarchy.layer(a.scored.id),
            watched: hierarchy.name(a.watched).to_string(),
            score: a.scored.prob,
            logit: a.scored.logit,
        })
        .collect()
}

/// This token's simplex readings from every pole's logit (in [`Pack::pole_probes`] order),
/// advancing the stream's baselines.
pub fn simplex_readings(pack: &Pack, baselines: &mut Baselines, logits: &[f32]) -> Vec<SimplexReading> {
    if logits.is_empty() {
        return Vec::new();
    }
    let probs: Vec<f32> = logits.iter().map(|&l| policy::sigmoid(l)).collect();
    let deviations = baselines.observe(&probs);
    let poles = pack.simplexes().iter().flat_map(|s| s.poles.iter().map(move |(pole, _)| (&s.name, pole)));
    poles
        .zip(logits.iter().zip(probs).zip(deviations))
        .map(|((simplex, pole), ((&logit, prob), deviation))| SimplexReading {
            simplex: simplex.clone(),
            pole: pole.clone(),
            prob,
            logit,
            deviation,
        })
        .collect()
}

struct TokenOutcome {
    top: Vec<ReportEntry>,
    alerts: Vec<Alert>,
    simplex: Vec<SimplexReading>,
    children: usize,
    skipped_by_cap: usize,
    unloaded: usize,
    /// Ids ascending, and their logits and scores.
    scored: (Vec<ConceptId>, Vec<f32>, Vec<f32>),
}

impl<B: ProbeBackend> Engine for CascadeEngine<B> {
    fn name(&self) -> &'static str {
        self.backend.name()
    }

    fn observe_states(&mut self, token: usize, states: &[&[f32]]) -> Result<TokenReport, EngineError> {
        let _span = debug_span!("token", index = token, engine = self.backend.name()).entered();
        let start = Instant::now();
        let h = prepare_states(token, states, &self.pack, self.normalization)?;
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
                scored: o.scored.0.len(),
                scored_ids: o.scored.0,
                scored_logits: o.scored.1,
                scored_probs: o.scored.2,
                active: self.active.len(),
                stages,
                elapsed: start.elapsed(),
                in_flight: Vec::new(),
                failed_loads: Vec::new(),
                alerts: o.alerts,
                simplex: o.simplex,
            }),
            Err(source) => {
                // Leave the active set as it was before the token, so the next one starts clean.
                self.backend.unload(&self.probes(&loaded));
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

/// Step 0 for token `token`: [`check_hidden`], its error naming the token.
pub fn prepare_hidden<'a>(
    token: usize,
    hidden: impl Into<HiddenValues<'a>>,
    expected: usize,
    normalization: Normalization,
) -> Result<Vec<f32>, EngineError> {
    check_hidden(hidden, expected, normalization).map_err(|source| EngineError::Hidden { token, source })
}

/// A trace row as one token's hidden states: the row itself for a pack that reads one model
/// layer, else its `hidden_dim`-long pieces, one per model layer in the pack's order (how
/// `run`, `bench`, `tune` and `soak` read traces of `T × (L·D)` values).
pub fn token_views<'a>(row: &'a [f32], pack: &Pack) -> Vec<&'a [f32]> {
    if pack.hidden_states() == 1 {
        vec![row]
    } else {
        row.chunks(pack.hidden_dim().max(1)).collect()
    }
}

/// [`token_views`], owned, for the runtime's sessions.
pub fn token_states(row: &[f32], pack: &Pack) -> Vec<crate::types::Hidden> {
    token_views(row, pack).into_iter().map(crate::types::Hidden::from).collect()
}

/// Step 0 for an observation of one hidden state per model layer of `pack`: their number
/// first (an error naming the layers the pack reads), then each as [`prepare_hidden`].
pub fn prepare_states(
    token: usize,
    states: &[&[f32]],
    pack: &Pack,
    normalization: Normalization,
) -> Result<Vec<Vec<f32>>, EngineError> {
    if states.len() != pack.hidden_states() {
        let source = HiddenError::States { got: states.len(), layers: pack.model_layers().to_vec() };
        return Err(EngineError::Hidden { token, source });
    }
    states.iter().map(|h| prepare_hidden(token, *h, pack.hidden_dim(), normalization)).collect()
}

/// Rejects a hidden state of the wrong width or with NaN/infinity, then normalizes it into a
/// working copy (one pass over the caller's memory, widened exactly).
pub fn check_hidden<'a>(
    hidden: impl Into<HiddenValues<'a>>,
    expected: usize,
    normalization: Normalization,
) -> Result<Vec<f32>, HiddenError> {
    let hidden = hidden.into();
    if hidden.len() != expected {
        return Err(HiddenError::Width { got: hidden.len(), expected });
    }
    let x = hidden.to_f32();
    if let Some((index, &value)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(HiddenError::NonFinite { index, value });
    }
    Ok(match normalization {
        Normalization::None => x,
        Normalization::LayerNorm => layer_norm(&x),
    })
}

/// LayerNorm over the whole vector, no affine parameters, eps 1e-5 (PyTorch's definition:
/// biased variance). Accumulates in f64 so every engine normalizes identically.
pub fn layer_norm(x: &[f32]) -> Vec<f32> {
    layer_norm_f64(x).into_iter().map(|v| v as f32).collect()
}

/// [`check_hidden`] for a tensor on the device the runtime scores on, done there: the width
/// from its shape, NaN or infinity found with one readback (`nonzero`, which waits for the
/// tensor's producer: the token's first scoring round would wait for it anyway), then
/// normalized in f64 as [`layer_norm_f64`] does. Returns a 1-D float32 tensor on the same
/// device, the runtime's own (the caller's may be written once the token is answered).
/// A [`DeviceHidden::ready`] event is waited for on the device first.
pub fn check_tensor(
    hidden: &DeviceHidden,
    expected: usize,
    normalization: Normalization,
) -> Result<tch::Tensor, HiddenError> {
    use tch::Kind;
    let t = &hidden.tensor;
    let device = t.device();
    if let Some(ready) = &hidden.ready {
        ready.order_default_stream().map_err(HiddenError::Order)?;
    }
    check_shape(t, expected)?;
    let torch = |source| HiddenError::Device { device: super::tensors::device_name(device), source: Arc::new(source) };
    tch::no_grad(|| {
        let bad = t.f_isfinite()?.f_logical_not()?.f_nonzero()?;
        if bad.size()[0] > 0 {
            let index = bad.f_int64_value(&[0, 0])?;
            let value = t.f_double_value(&[index])? as f32;
            return Ok(Err(HiddenError::NonFinite { index: index as usize, value }));
        }
        let x = match normalization {
            // A copy (`copy = true`), not the caller's tensor, which `to_kind` of float32 would be.
            Normalization::None => t.f_to_dtype(Kind::Float, false, true)?.f_contiguous()?,
            Normalization::LayerNorm => {
                let x = t.f_to_kind(Kind::Double)?;
                let mean = x.f_mean(Kind::Double)?;
                let centred = x.f_sub(&mean)?;
                let var = centred.f_square()?.f_mean(Kind::Double)?;
                centred.f_mul(&var.f_add_scalar(LAYER_NORM_EPS)?.f_rsqrt()?)?.f_to_kind(Kind::Float)?
            }
        };
        Ok(Ok(x))
    })
    .map_err(torch)?
}

/// A hidden-state tensor's dtype and shape: a float dtype, 1-D, `expected` values.
fn check_shape(t: &tch::Tensor, expected: usize) -> Result<(), HiddenError> {
    use tch::Kind;
    if !matches!(t.kind(), Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double) {
        return Err(HiddenError::Dtype { dtype: format!("{:?}", t.kind()) });
    }
    let got = t.numel();
    if t.dim() != 1 || got != expected {
        return Err(HiddenError::Width { got, expected });
    }
    Ok(())
}

/// A tensor handed over on a device the runtime does not score on, in host memory as f32
/// (after its producer's stream, where it names one), to be checked as any host state.
pub fn tensor_to_host(hidden: &DeviceHidden, expected: usize) -> Result<Vec<f32>, HiddenError> {
    let t = &hidden.tensor;
    check_shape(t, expected)?;
    if let Some(ready) = &hidden.ready {
        ready.order_default_stream().map_err(HiddenError::Order)?;
    }
    let torch =
        |source| HiddenError::Device { device: super::tensors::device_name(t.device()), source: Arc::new(source) };
    let host = t.f_to_device(tch::Device::Cpu).and_then(|h| h.f_to_kind(tch::Kind::Float)).map_err(torch)?;
    Vec::<f32>::try_from(host).map_err(torch)
}

/// `nn.LayerNorm`'s default epsilon, which `layer_norm` packs and imported probes assume.
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// [`layer_norm`] before rounding to f32 (the import's check compares in f64).
pub fn layer_norm_f64(x: &[f32]) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + LAYER_NORM_EPS).sqrt();
    x.iter().map(|&v| (v as f64 - mean) * inv).collect()
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
