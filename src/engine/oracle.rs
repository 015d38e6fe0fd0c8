//! The exhaustive oracle: every probe of the pack scored on every token, on the CPU kernel.
//! It is the ground truth a cascade approximates: a concept the cascade did not score is one
//! it missed, and by the kernel's invariant a probe's logit here has the same bits as the
//! runtime's for that probe and hidden state (whatever else either scored with it).
//!
//! It holds the whole pack's weights in RAM (the pack's size: 179 MB for 562 f32 probes at
//! D=576) and scores up to [`MAX_BATCH`] tokens per pass, so each weight is read once per
//! batch rather than once per token.

use std::sync::Arc;
use std::time::Instant;

use super::{alert_entries, prepare_hidden, report_entries, Engine, EngineError, StageTimings, TokenReport};
use crate::config::{Config, Normalization};
use crate::kernel::{Isa, Kernel, ProbeRef, MAX_BATCH};
use crate::pack::{ConceptId, Pack, ProbeId};
use crate::policy::lens::score_lens;
use crate::policy::{rank, Scored, Watch};

pub struct OracleEngine {
    pack: Arc<Pack>,
    kernel: Kernel,
    isa: Isa,
    normalization: Normalization,
    report_top_k: usize,
    watch: Watch,
    /// Every probe's bytes, by concept id.
    probes: Vec<Vec<u8>>,
    ranges: Vec<[std::ops::Range<usize>; 6]>,
}

impl OracleEngine {
    /// Reads (and CRC-checks) every probe of `pack`. The kernel path is `device.cpu_kernel`'s
    /// (`auto` and `torch`: the best this CPU has), on `device.threads` threads; the input
    /// normalization and `report_top_k` are the config's.
    pub fn new(pack: Arc<Pack>, config: &Config) -> Result<Self, EngineError> {
        let isa = config.device.cpu_kernel.isa().unwrap_or_else(Isa::best);
        let threads = super::tensors::math_threads(&config.device);
        let layout = pack.layout();
        let kernel = Kernel::new(&layout, isa, threads)
            .map_err(|e| EngineError::Setup(format!("device.cpu_kernel = \"{}\": {e}", config.device.cpu_kernel)))?;
        if !pack.one_probe_per_concept() || pack.hidden_states() > 1 {
            return Err(EngineError::Setup(format!(
                "{}: the oracle scores lenses of one probe at one model layer so far; this pack has {} probes for \
                 {} lenses over model layers {:?} (use the reference engine)",
                pack.dir().display(),
                pack.probe_count(),
                pack.len(),
                pack.model_layers()
            )));
        }
        let mut probes = Vec::with_capacity(pack.len());
        let mut ranges = Vec::with_capacity(pack.len());
        for i in 0..pack.len() {
            let id = ProbeId(i as u32);
            probes.push(
                pack.read_probe(id).map_err(|e| EngineError::Setup(format!("the oracle reads every probe: {e}")))?,
            );
            ranges.push(layout.ranges(&pack.tensor_offsets(id)));
        }
        let normalization = config.cascade.normalization_for(pack.input_normalization());
        let watch =
            Watch::compile(pack.hierarchy(), &config.cascade.watch, crate::policy::default_alert_threshold(&pack))?;
        let report_top_k = config.cascade.report_top_k;
        Ok(Self { pack, kernel, isa, normalization, report_top_k, watch, probes, ranges })
    }

    /// The kernel path it scores on.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn pack(&self) -> &Arc<Pack> {
        &self.pack
    }

    /// Every probe's logit for each hidden state (raw, as a caller would pass them: checked
    /// and normalized here): `out[t][c]` for hidden state `t` and concept `c`. `first_token`
    /// numbers the hidden states in errors.
    pub fn score_all(&self, first_token: usize, hidden: &[&[f32]]) -> Result<Vec<Vec<f32>>, EngineError> {
        let refs: Vec<ProbeRef> =
            self.probes.iter().zip(&self.ranges).map(|(bytes, ranges)| ProbeRef { bytes, ranges }).collect();
        let mut out = Vec::with_capacity(hidden.len());
        for (chunk_index, chunk) in hidden.chunks(MAX_BATCH).enumerate() {
            let first = first_token + chunk_index * MAX_BATCH;
            let xs: Vec<Vec<f32>> = chunk
                .iter()
                .enumerate()
                .map(|(i, h)| prepare_hidden(first + i, *h, self.pack.hidden_dim(), self.normalization))
                .collect::<Result<_, _>>()?;
            let views: Vec<&[f32]> = xs.iter().map(|x| &x[..]).collect();
            let mut logits = vec![0f32; refs.len() * views.len()];
            self.kernel
                .score(&refs, &views, &mut logits)
                .map_err(|source| EngineError::Kernel { token: first, source })?;
            // The kernel writes probe-major (`logits[p * B + b]`); callers want token-major.
            for b in 0..views.len() {
                out.push((0..refs.len()).map(|p| logits[p * views.len() + b]).collect());
            }
        }
        Ok(out)
    }
}

impl Engine for OracleEngine {
    fn name(&self) -> &'static str {
        "oracle"
    }

    fn observe_states(&mut self, token: usize, states: &[&[f32]]) -> Result<TokenReport, EngineError> {
        // The oracle starts only on packs that read one model layer.
        let [hidden] = states else {
            let source = crate::types::HiddenError::States { got: states.len(), layers: Vec::new() };
            return Err(EngineError::Hidden { token, source });
        };
        let start = Instant::now();
        let logits = self.score_all(token, &[hidden])?.pop().unwrap_or_default();
        let scoring = start.elapsed();
        let t = Instant::now();
        let pack = &self.pack;
        let mut scored: Vec<Scored> =
            logits.iter().enumerate().map(|(i, &logit)| score_lens(pack, ConceptId(i as u32), &[logit])).collect();
        let alerts = alert_entries(self.pack.hierarchy(), &self.watch, &scored);
        let scored_probs = scored.iter().map(|s| s.prob).collect();
        scored.sort_by(rank);
        scored.truncate(self.report_top_k);
        let top = report_entries(self.pack.hierarchy(), &scored);
        let stages = StageTimings { initial_scoring: scoring, sorting: t.elapsed(), ..Default::default() };
        let n = self.pack.len();
        Ok(TokenReport {
            index: token,
            top,
            children: 0,
            loaded: 0,
            unloaded: 0,
            skipped_by_cap: 0,
            scored: n,
            scored_ids: (0..n as u32).map(ConceptId).collect(),
            scored_logits: logits,
            scored_probs,
            active: n,
            stages,
            elapsed: start.elapsed(),
            in_flight: Vec::new(),
            failed_loads: Vec::new(),
            alerts,
        })
    }

    fn active(&self) -> Vec<ConceptId> {
        (0..self.pack.len() as u32).map(ConceptId).collect()
    }
}
