//! The exhaustive oracle: every probe of the pack scored on every token, on the CPU kernel.
//! It is the ground truth a cascade approximates: a concept the cascade did not score is one
//! it missed, and by the kernel's invariant a probe's logit here has the same bits as the
//! runtime's for that probe and hidden state (whatever else either scored with it).
//!
//! It holds the whole pack's weights in RAM (the pack's size: 179 MB for 562 f32 probes at
//! D=576) and scores up to [`MAX_BATCH`] tokens per pass, so each weight is read once per
//! batch rather than once per token. In a pack of lenses each probe is scored against its own
//! model layer's state, and each lens is `policy::lens::score_lens` of its probes.

use std::sync::Arc;
use std::time::Instant;

use super::{
    alert_entries, prepare_hidden, report_entries, simplex_readings, Engine, EngineError, StageTimings, TokenReport,
};
use crate::config::{Config, Normalization};
use crate::kernel::{Isa, Kernel, ProbeRef, MAX_BATCH};
use crate::pack::{ConceptId, Pack, ProbeId};
use crate::policy::lens::{reported, score_lens};
use crate::policy::{rank, simplex::Baselines, Scored, Watch};
use crate::types::HiddenError;

pub struct OracleEngine {
    pack: Arc<Pack>,
    kernel: Kernel,
    isa: Isa,
    normalization: Normalization,
    report_top_k: usize,
    watch: Watch,
    /// Every probe's bytes, by probe id.
    probes: Vec<Vec<u8>>,
    ranges: Vec<[std::ops::Range<usize>; 6]>,
    /// `by_state[s]`: the probes reading the observation's state s, in id order.
    by_state: Vec<Vec<usize>>,
    /// The simplex poles' rolling baselines over the tokens `observe_states` saw.
    baselines: Baselines,
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
        let mut probes = Vec::with_capacity(pack.probe_count());
        let mut ranges = Vec::with_capacity(pack.probe_count());
        for i in 0..pack.probe_count() {
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
        let mut by_state = vec![Vec::new(); pack.hidden_states()];
        for p in 0..pack.probe_count() {
            by_state[pack.probe(ProbeId(p as u32)).state as usize].push(p);
        }
        let baselines = Baselines::for_pack(&pack);
        Ok(Self { pack, kernel, isa, normalization, report_top_k, watch, probes, ranges, by_state, baselines })
    }

    /// The kernel path it scores on.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn pack(&self) -> &Arc<Pack> {
        &self.pack
    }

    /// Every lens's score for each token, as reported (`policy::lens::reported`), from hidden
    /// states as a caller would pass them (checked and normalized here): `out[t][c]` for token
    /// `t` and concept `c`. A token is one hidden
    /// state per model layer of the pack, side by side (`states × D` values, as `run` reads
    /// traces). `first_token` numbers the tokens in errors.
    pub fn score_all(&self, first_token: usize, tokens: &[&[f32]]) -> Result<Vec<Vec<Scored>>, EngineError> {
        let rows = self.logits_all(first_token, tokens)?;
        Ok(rows.iter().map(|row| self.lenses(row)).collect())
    }

    /// Every lens's score as reported, from one token's logits of every probe.
    fn lenses(&self, row: &[f32]) -> Vec<Scored> {
        let lenses: Vec<Scored> = self
            .pack
            .hierarchy()
            .ids()
            .map(|c| {
                let probes = self.pack.probes_of(c);
                let first = probes.clone().next().map_or(0, |p| p.index());
                score_lens(&self.pack, c, &row[first..first + probes.len()])
            })
            .collect();
        reported(&self.pack, &lenses).into_owned()
    }

    /// Every probe's logit (lenses' and simplex poles') for each token, by probe id.
    fn logits_all(&self, first_token: usize, tokens: &[&[f32]]) -> Result<Vec<Vec<f32>>, EngineError> {
        let (d, states) = (self.pack.hidden_dim(), self.pack.hidden_states());
        let mut out = Vec::with_capacity(tokens.len());
        for (chunk_index, chunk) in tokens.chunks(MAX_BATCH).enumerate() {
            let first = first_token + chunk_index * MAX_BATCH;
            // xs[t][s]: token t's state s, normalized.
            let xs: Vec<Vec<Vec<f32>>> = chunk
                .iter()
                .enumerate()
                .map(|(i, row)| {
                    let token = first + i;
                    if row.len() != states * d {
                        let source = match states {
                            1 => HiddenError::Width { got: row.len(), expected: d },
                            _ => HiddenError::States { got: row.len() / d, layers: self.pack.model_layers().to_vec() },
                        };
                        return Err(EngineError::Hidden { token, source });
                    }
                    row.chunks(d).map(|h| prepare_hidden(token, h, d, self.normalization)).collect()
                })
                .collect::<Result<_, _>>()?;
            // logits[t][p]: every probe, against its own layer's state.
            let mut logits = vec![vec![0f32; self.probes.len()]; chunk.len()];
            for (s, ids) in self.by_state.iter().enumerate() {
                if ids.is_empty() {
                    continue;
                }
                let refs: Vec<ProbeRef> =
                    ids.iter().map(|&p| ProbeRef { bytes: &self.probes[p], ranges: &self.ranges[p] }).collect();
                let views: Vec<&[f32]> = xs.iter().map(|x| &x[s][..]).collect();
                let mut flat = vec![0f32; refs.len() * views.len()];
                self.kernel
                    .score(&refs, &views, &mut flat)
                    .map_err(|source| EngineError::Kernel { token: first, source })?;
                // The kernel writes probe-major (`flat[k * B + b]`).
                for (k, &p) in ids.iter().enumerate() {
                    for (b, row) in logits.iter_mut().enumerate() {
                        row[p] = flat[k * views.len() + b];
                    }
                }
            }
            out.extend(logits);
        }
        Ok(out)
    }
}

impl Engine for OracleEngine {
    fn name(&self) -> &'static str {
        "oracle"
    }

    fn observe_states(&mut self, token: usize, states: &[&[f32]]) -> Result<TokenReport, EngineError> {
        let start = Instant::now();
        if states.len() != self.pack.hidden_states() {
            let source = HiddenError::States { got: states.len(), layers: self.pack.model_layers().to_vec() };
            return Err(EngineError::Hidden { token, source });
        }
        let row: Vec<f32> = states.concat();
        let logits = self.logits_all(token, &[&row])?.pop().unwrap_or_default();
        let mut scored = self.lenses(&logits);
        let simplex = simplex_readings(&self.pack, &mut self.baselines, &logits[self.pack.lens_probe_count()..]);
        let scoring = start.elapsed();
        let t = Instant::now();
        let alerts = alert_entries(self.pack.hierarchy(), &self.watch, &scored);
        let (scored_ids, scored_logits, scored_probs) = crate::policy::scored_by_id(&scored);
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
            scored_ids,
            scored_logits,
            scored_probs,
            active: n,
            stages,
            elapsed: start.elapsed(),
            in_flight: Vec::new(),
            failed_loads: Vec::new(),
            alerts,
            simplex,
        })
    }

    fn active(&self) -> Vec<ConceptId> {
        (0..self.pack.len() as u32).map(ConceptId).collect()
    }
}
