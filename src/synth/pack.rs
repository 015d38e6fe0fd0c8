//! Deterministic synthetic packs whose probes behave like trained ones.
//!
//! Each concept has a unit direction u in R^D; a child's direction leans towards its parents'
//! (correlation `parent_correlation`), so a child tends to fire only where its parent fires.
//! A probe's first layer is mostly u (positive and negative detector units with spread knees)
//! plus small noise, and its output is calibrated so that logit ≈ slope·(u·h − threshold).

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::names::{HEADS, MODIFIERS, ROOTS};
use crate::pack::layout::{HIDDEN1, HIDDEN2};
use crate::pack::{ConceptDef, DType, InputNormalization, PackSpec, ProbeWeights};

#[derive(Debug, Clone)]
pub struct SynthParams {
    pub concepts: usize,
    pub roots: usize,
    pub layers: usize,
    /// Mean children per parent; by default chosen so `layers` layers hold `concepts`.
    pub branching: Option<f64>,
    pub hidden_dim: usize,
    pub dtype: DType,
    pub seed: u64,
    pub probes_per_shard: usize,
    /// Share of non-root concepts that get a second parent (the hierarchy is a DAG).
    pub second_parent_share: f64,
    /// Share of non-root concepts that reuse a name from another layer.
    pub repeated_name_share: f64,
    pub parent_correlation: f32,
}

impl SynthParams {
    /// About 1,000 concepts, 14 roots, 5 layers, D=2560, bf16.
    pub fn demo() -> Self {
        Self {
            concepts: 1000,
            roots: 14,
            layers: 5,
            branching: None,
            hidden_dim: 2560,
            dtype: DType::Bf16,
            seed: 0,
            probes_per_shard: 256,
            second_parent_share: 0.05,
            repeated_name_share: 0.03,
            parent_correlation: 0.3,
        }
    }

    /// A small pack for tests: 60 concepts, 4 roots, 3 layers, D=32, f32.
    pub fn tiny() -> Self {
        Self {
            concepts: 60,
            roots: 4,
            layers: 3,
            hidden_dim: 32,
            dtype: DType::F32,
            probes_per_shard: 16,
            ..Self::demo()
        }
    }

    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "demo" => Some(Self::demo()),
            "tiny" => Some(Self::tiny()),
            _ => None,
        }
    }

    /// Concepts per layer: roots, then geometric growth, the last layer taking the remainder.
    pub fn layer_sizes(&self) -> Vec<usize> {
        let roots = self.roots.max(1).min(self.concepts.max(1));
        let layers = self.layers.max(1);
        let growth = self.branching.unwrap_or_else(|| {
            // Solve roots·(1 + g + … + g^(L−1)) = concepts for g by bisection.
            let total = |g: f64| (0..layers).map(|l| roots as f64 * g.powi(l as i32)).sum::<f64>();
            let (mut lo, mut hi) = (0.0f64, 64.0f64);
            for _ in 0..100 {
                let mid = (lo + hi) / 2.0;
                if total(mid) < self.concepts as f64 {
                    lo = mid
                } else {
                    hi = mid
                }
            }
            lo
        });
        let mut sizes = vec![roots];
        let mut used = roots;
        for l in 1..layers {
            if used >= self.concepts {
                break;
            }
            let want = if l + 1 == layers {
                self.concepts - used
            } else {
                ((roots as f64 * growth.powi(l as i32)).round() as usize).clamp(1, self.concepts - used)
            };
            sizes.push(want);
            used += want;
        }
        sizes
    }
}

/// The hierarchy plus each concept's direction and firing threshold.
pub struct SynthHierarchy {
    pub spec: PackSpec,
    pub directions: Vec<Vec<f32>>,
    pub thresholds: Vec<f32>,
}

pub fn synth_hierarchy(p: &SynthParams) -> SynthHierarchy {
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let sizes = p.layer_sizes();
    let mut concepts: Vec<ConceptDef> = Vec::with_capacity(p.concepts);
    let mut names_by_layer: Vec<HashSet<String>> = vec![HashSet::new(); sizes.len()];
    let mut layer_start = 0;
    for (layer, &size) in sizes.iter().enumerate() {
        let prev = if layer == 0 { 0..0 } else { layer_start - sizes[layer - 1]..layer_start };
        // Uneven popularity: a few parents get many children, some none (as in WordNet).
        let weights: Vec<f64> = prev.clone().map(|_| (rng.sample::<f64, _>(StandardNormal) * 0.8).exp()).collect();
        let total: f64 = weights.iter().sum();
        for i in 0..size {
            let mut parents = Vec::new();
            if layer > 0 {
                parents.push(pick_weighted(&mut rng, &weights, total) as u32 + prev.start as u32);
                if prev.len() > 1 && rng.random_bool(p.second_parent_share) {
                    let second = pick_weighted(&mut rng, &weights, total) as u32 + prev.start as u32;
                    if second != parents[0] {
                        parents.push(second);
                    }
                }
            }
            let name = if layer == 0 {
                ROOTS.get(i).map(|s| s.to_string()).unwrap_or_else(|| format!("Root{i}"))
            } else if rng.random_bool(p.repeated_name_share) && layer_start > 0 {
                // Reuse a name from an earlier layer, as SUMO/WordNet hierarchies do.
                concepts[rng.random_range(0..layer_start)].name.clone()
            } else {
                format!(
                    "{}{}",
                    MODIFIERS[rng.random_range(0..MODIFIERS.len())],
                    HEADS[rng.random_range(0..HEADS.len())]
                )
            };
            let mut unique = name.clone();
            let mut n = 2;
            while names_by_layer[layer].contains(&unique) {
                unique = format!("{name}{n}");
                n += 1;
            }
            names_by_layer[layer].insert(unique.clone());
            concepts.push(ConceptDef { name: unique, layer: layer as u16, parents });
        }
        layer_start += size;
    }

    let d = p.hidden_dim;
    let rho = p.parent_correlation.clamp(0.0, 0.99);
    let mut directions: Vec<Vec<f32>> = Vec::with_capacity(concepts.len());
    for c in &concepts {
        let mut r: Vec<f32> = (0..d).map(|_| rng.sample(StandardNormal)).collect();
        normalize(&mut r);
        if !c.parents.is_empty() {
            let mut mean = vec![0f32; d];
            for &q in &c.parents {
                mean.iter_mut().zip(&directions[q as usize]).for_each(|(m, v)| *m += v);
            }
            normalize(&mut mean);
            let keep = (1.0 - rho * rho).sqrt();
            r.iter_mut().zip(&mean).for_each(|(x, m)| *x = rho * m + keep * *x);
            normalize(&mut r);
        }
        directions.push(r);
    }
    let thresholds = concepts.iter().map(|_| rng.random_range(2.5f32..3.5)).collect();
    let spec = PackSpec {
        hidden_dim: d,
        dtype: p.dtype,
        input_normalization: InputNormalization::None,
        probes_per_shard: p.probes_per_shard,
        concepts,
        lenses: None,
    };
    SynthHierarchy { spec, directions, thresholds }
}

/// The probe of concept `id`: deterministic given (seed, id), whatever order probes are made in.
pub fn synth_probe(seed: u64, id: u32, direction: &[f32], threshold: f32) -> ProbeWeights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(id as u64 + 1);
    let d = direction.len();
    let noise = 0.3 / (d as f32).sqrt();
    let positive_units = HIDDEN1 * 3 / 4;
    let mut w1 = Vec::with_capacity(HIDDEN1 * d);
    let mut b1 = Vec::with_capacity(HIDDEN1);
    for k in 0..HIDDEN1 {
        let gain: f32 = rng.random_range(0.5..1.5);
        let knee: f32 = rng.random_range(0.0..threshold);
        let sign = if k < positive_units { 1.0 } else { -1.0 };
        for &u in direction {
            let n: f32 = rng.sample(StandardNormal);
            w1.push(sign * gain * u + noise * n);
        }
        // Positive units switch on above their knee, negative ones below it.
        b1.push(-sign * gain * knee);
    }
    let positive_out = HIDDEN2 * 3 / 4;
    let mut w2 = Vec::with_capacity(HIDDEN2 * HIDDEN1);
    for j in 0..HIDDEN2 {
        for k in 0..HIDDEN1 {
            let same_group = (j < positive_out) == (k < positive_units);
            let scale = if same_group { 2.0 / positive_units as f32 } else { 0.0 };
            let jitter: f32 = rng.random_range(0.0..1.0);
            w2.push(scale * jitter + 0.002 * rng.sample::<f32, _>(StandardNormal));
        }
    }
    let b2 = vec![0.0; HIDDEN2];
    let mut w3: Vec<f32> =
        (0..HIDDEN2).map(|j| if j < positive_out { 1.0 } else { -1.0 } * rng.random_range(0.5f32..1.5)).collect();
    let mut probe = ProbeWeights { w1, b1, w2, b2, w3: w3.clone(), b3: vec![0.0] };
    // Calibrate along the concept's own direction: zero logit at the threshold, slope 2 per unit.
    let at = |probe: &ProbeWeights, z: f32| {
        let h: Vec<f32> = direction.iter().map(|u| u * z).collect();
        probe.logit(&h)
    };
    let slope = (at(&probe, threshold + 0.5) - at(&probe, threshold - 0.5)).max(1e-3);
    let scale = 2.0 / slope;
    w3.iter_mut().for_each(|w| *w *= scale);
    probe.w3 = w3;
    probe.b3 = vec![-at(&probe, threshold)];
    probe
}

fn pick_weighted(rng: &mut ChaCha8Rng, weights: &[f64], total: f64) -> usize {
    let mut x = rng.random_range(0.0..total);
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.len() - 1
}

pub(crate) fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// Synthesizes and writes a whole pack. Probes are made in parallel batches and written in id
/// order; the files are byte-identical for a given seed whatever the thread count.
pub fn write_synth_pack(
    dir: &std::path::Path,
    p: &SynthParams,
    mut progress: impl FnMut(usize),
) -> Result<crate::pack::Manifest, crate::pack::PackError> {
    let hierarchy = synth_hierarchy(p);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let batch = threads * 8;
    let mut ready: std::collections::VecDeque<ProbeWeights> = Default::default();
    let mut next = 0usize;
    let make = |id: usize| synth_probe(p.seed, id as u32, &hierarchy.directions[id], hierarchy.thresholds[id]);
    crate::pack::write_pack(
        dir,
        &hierarchy.spec,
        |id| {
            if ready.is_empty() {
                let end = (next + batch).min(hierarchy.directions.len());
                let ids: Vec<usize> = (next..end).collect();
                let chunk = ids.len().div_ceil(threads).max(1);
                let made: Vec<Vec<ProbeWeights>> = std::thread::scope(|s| {
                    let handles: Vec<_> =
                        ids.chunks(chunk).map(|c| s.spawn(move || c.iter().map(|&i| make(i)).collect())).collect();
                    handles.into_iter().map(|h| h.join().expect("probe synthesis thread panicked")).collect()
                });
                ready.extend(made.into_iter().flatten());
                next = end;
            }
            debug_assert_eq!(id as usize, next - ready.len());
            ready.pop_front().expect("a probe was made for every id")
        },
        &mut progress,
    )
}
