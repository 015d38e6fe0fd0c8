//! Synthetic hidden-state traces for any pack.
//!
//! Each concept's direction is read off its probe (the first layer mapped back through the
//! linearized network) and its firing strength found by bisection, so traces work for imported
//! packs as well as synthetic ones. Tokens dwell on topics (root-to-node paths) for a few
//! tokens; some add a passing side topic, a few are bursts that touch several deep paths.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::pack::normalize;
use crate::npy::Matrix;
use crate::pack::layout::{HIDDEN1, HIDDEN2};
use crate::pack::{ConceptId, Pack, PackError, ProbeWeights};

#[derive(Debug, Clone)]
pub struct TraceParams {
    pub tokens: usize,
    pub seed: u64,
    /// Mean tokens a topic lasts.
    pub mean_dwell: f64,
    /// Chance, for each of `side_topics` draws, that a token adds a shallow side topic.
    pub side_topic: f64,
    pub side_topics: usize,
    /// Chance that a token is a burst touching 2 to `burst_paths` deep paths.
    pub burst: f64,
    pub burst_paths: usize,
    /// Standard deviation of the per-coordinate background noise.
    pub noise: f32,
}

impl Default for TraceParams {
    fn default() -> Self {
        Self {
            tokens: 200,
            seed: 0,
            mean_dwell: 3.0,
            side_topic: 0.5,
            side_topics: 1,
            burst: 0.15,
            burst_paths: 4,
            noise: 1.0,
        }
    }
}

impl TraceParams {
    /// A busy trace: more side topics and bigger, more frequent bursts, so that the seed's
    /// top-30 configuration asks for about as many children per token as the seed's own table
    /// (mean about 25, bursts of 60 and more) rather than the default trace's handful.
    pub fn busy() -> Self {
        Self { mean_dwell: 2.0, side_topic: 0.8, side_topics: 6, burst: 0.3, burst_paths: 48, ..Self::default() }
    }
}

/// Per concept: the input direction that drives its probe, and how far along it the logit
/// crosses zero (None when it never does within reach).
pub struct ConceptGeometry {
    pub direction: Vec<f32>,
    pub firing_strength: Option<f32>,
}

pub fn concept_geometry(pack: &Pack, mut progress: impl FnMut(usize)) -> Result<Vec<ConceptGeometry>, PackError> {
    let mut out = Vec::with_capacity(pack.len());
    for id in pack.hierarchy().ids() {
        // A lens's first probe (every concept has one; synthetic packs have one each).
        let probe = pack.probes_of(id).next().unwrap_or(crate::pack::ProbeId::sole(id));
        let bytes = pack.read_probe(probe)?;
        let w = pack.decode_probe(probe, &bytes)?;
        out.push(geometry_of(&w, pack.hidden_dim()));
        progress(id.index() + 1);
    }
    Ok(out)
}

fn geometry_of(w: &ProbeWeights, d: usize) -> ConceptGeometry {
    // coef = W2ᵀ·w3, direction = W1ᵀ·coef: the gradient with every ReLU open.
    let mut coef = [0f32; HIDDEN1];
    for j in 0..HIDDEN2 {
        for (k, c) in coef.iter_mut().enumerate() {
            *c += w.w3[j] * w.w2[j * HIDDEN1 + k];
        }
    }
    let mut direction = vec![0f32; d];
    for (k, c) in coef.iter().enumerate() {
        direction.iter_mut().zip(&w.w1[k * d..(k + 1) * d]).for_each(|(g, x)| *g += c * x);
    }
    normalize(&mut direction);
    // Along t·direction the first layer is t·v + b1, so bisection costs only the small layers.
    let v: Vec<f32> =
        (0..HIDDEN1).map(|k| w.w1[k * d..(k + 1) * d].iter().zip(&direction).map(|(a, b)| a * b).sum()).collect();
    let logit_at = |t: f32| {
        let a1: Vec<f32> = (0..HIDDEN1).map(|k| (t * v[k] + w.b1[k]).max(0.0)).collect();
        let a2: Vec<f32> = (0..HIDDEN2)
            .map(|j| {
                (w.w2[j * HIDDEN1..(j + 1) * HIDDEN1].iter().zip(&a1).map(|(a, b)| a * b).sum::<f32>() + w.b2[j])
                    .max(0.0)
            })
            .collect();
        w.w3.iter().zip(&a2).map(|(a, b)| a * b).sum::<f32>() + w.b3[0]
    };
    const REACH: f32 = 64.0;
    let firing_strength = if logit_at(0.0) > 0.0 {
        Some(0.0)
    } else if logit_at(REACH) <= 0.0 {
        None
    } else {
        let (mut lo, mut hi) = (0.0f32, REACH);
        for _ in 0..30 {
            let mid = (lo + hi) / 2.0;
            if logit_at(mid) > 0.0 {
                hi = mid
            } else {
                lo = mid
            }
        }
        Some(hi)
    };
    ConceptGeometry { direction, firing_strength }
}

struct Topic {
    path: Vec<u32>,
    remaining: u32,
}

pub fn synth_trace(pack: &Pack, geometry: &[ConceptGeometry], p: &TraceParams) -> Matrix {
    let d = pack.hidden_dim();
    let h = pack.hierarchy();
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let roots: Vec<u32> =
        h.layer_members(0).iter().copied().filter(|&c| geometry[c as usize].firing_strength.is_some()).collect();
    let random_path = |rng: &mut ChaCha8Rng, max_depth: usize| -> Vec<u32> {
        let mut path = Vec::new();
        if roots.is_empty() {
            return path;
        }
        let mut cur = roots[rng.random_range(0..roots.len())];
        path.push(cur);
        let depth = rng.random_range(1..=max_depth.max(1));
        while path.len() < depth {
            let kids: Vec<u32> = h
                .children(ConceptId(cur))
                .iter()
                .copied()
                .filter(|&c| geometry[c as usize].firing_strength.is_some())
                .collect();
            if kids.is_empty() {
                break;
            }
            cur = kids[rng.random_range(0..kids.len())];
            path.push(cur);
        }
        path
    };
    let dwell =
        |rng: &mut ChaCha8Rng| 1 + (-(rng.random_range(f64::EPSILON..1.0)).ln() * (p.mean_dwell - 1.0).max(0.0)) as u32;
    let max_depth = h.layer_count().max(1);
    let mut topic = Topic { path: random_path(&mut rng, max_depth), remaining: dwell(&mut rng) };
    let mut data = Vec::with_capacity(p.tokens * d);
    for _ in 0..p.tokens {
        if topic.remaining == 0 {
            topic = Topic { path: random_path(&mut rng, max_depth), remaining: dwell(&mut rng) };
        }
        topic.remaining -= 1;
        let mut firing: Vec<u32> = topic.path.clone();
        for _ in 0..p.side_topics {
            if rng.random_bool(p.side_topic) {
                firing.extend(random_path(&mut rng, 2));
            }
        }
        if rng.random_bool(p.burst) {
            for _ in 0..rng.random_range(2..=p.burst_paths.max(2)) {
                firing.extend(random_path(&mut rng, max_depth));
            }
        }
        let mut row: Vec<f32> = (0..d).map(|_| p.noise * rng.sample::<f32, _>(StandardNormal)).collect();
        for &c in &firing {
            let g = &geometry[c as usize];
            let strength = g.firing_strength.unwrap_or(0.0) * rng.random_range(1.15f32..1.7);
            row.iter_mut().zip(&g.direction).for_each(|(x, u)| *x += strength * u);
        }
        // A sub-threshold echo of another root: present in the state, not enough to fire.
        if !roots.is_empty() && rng.random_bool(0.5) {
            let g = &geometry[roots[rng.random_range(0..roots.len())] as usize];
            let strength = g.firing_strength.unwrap_or(0.0) * rng.random_range(0.3f32..0.8);
            row.iter_mut().zip(&g.direction).for_each(|(x, u)| *x += strength * u);
        }
        data.extend_from_slice(&row);
    }
    Matrix { rows: p.tokens, cols: d, data }
}
