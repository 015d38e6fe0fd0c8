//! The CPU scoring kernel: scores probes where their bytes lie (the weight cache's buffers),
//! in their stored dtype, for B hidden states at once, with results that are the same bits
//! whatever else is scored with them.
//!
//! **The invariant.** A probe's logit for a hidden state depends only on that probe's bytes
//! and that hidden state: not on the other probes in the call, their number or order, the
//! other hidden states (B), the thread count or block assignment, or the instruction set.
//!
//! **Why it holds by construction.** Every dot product (the first layer's D-long rows, the
//! second's 128-long rows, the last layer's 64) is computed in one fixed order, [`dot`]:
//!
//! 1. 16 partial sums, all starting at +0.0. Element `i` goes to partial `i % 16`, in
//!    increasing `i`, by a fused multiply-add (one rounding). The input is zero-padded to a
//!    multiple of 16, so every partial sees the same number of FMAs on every path.
//! 2. The 16 partials are summed in a fixed tree: `p[l] += p[l + 8]` for l < 8, then `+4`,
//!    `+2`, `+1`.
//! 3. The bias is added, then ReLU (`v > 0 ? v : +0`) for the hidden layers.
//!
//! bf16 weights are widened to f32 exactly (a 16-bit shift), so both dtypes share that order.
//! The SIMD paths only compute step 1 (AVX2: the 16 partials in two 8-lane registers; AVX-512:
//! one 16-lane register), storing the partials to memory; steps 2 and 3 are the same scalar
//! code for every path. A probe is scored by one thread from start to end, so threads only
//! decide *who* computes a logit, never *how*. [`reference_logit`] is a plain scalar model of
//! this order; unit tests hold every path to it bit for bit.
//!
//! Faster instructions with their own rounding (AVX512-BF16 `vdpbf16ps`, AMX) would break
//! the invariant, so none is used.

mod cpu;
mod x86;

use std::ops::Range;

pub use cpu::CpuInfo;

use crate::pack::layout::{ProbeLayout, B1, B2, B3, HIDDEN1, HIDDEN2, W1, W2, W3};
use crate::pack::DType;

/// Width of the fixed reduction: partial sums per dot product.
pub const LANES: usize = 16;
/// Most hidden states one call scores.
pub const MAX_BATCH: usize = 32;

/// An instruction-set path for step 1 of the reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    /// Plain Rust (`f32::mul_add`): every machine.
    Scalar,
    /// AVX2 with FMA: every x86-64 CPU this project has met.
    Avx2,
    /// AVX-512F: 16 lanes in one register.
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx512 => "avx512f",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => x86::has_avx2_fma(),
            Isa::Avx512 => x86::has_avx512f(),
        }
    }

    /// Every path this CPU can run, slowest first.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.supported()).collect()
    }

    /// The fastest path this CPU can run.
    pub fn best() -> Isa {
        *Isa::available().last().expect("scalar is always available")
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "scalar" => Ok(Isa::Scalar),
            "avx2" | "avx2+fma" => Ok(Isa::Avx2),
            "avx512" | "avx512f" => Ok(Isa::Avx512),
            other => Err(format!("unknown kernel path `{other}` (expected scalar, avx2 or avx512)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("the {0} kernel path needs CPU features this machine does not have")]
    Unsupported(Isa),
    #[error("{0} hidden states in one call; the kernel takes 1 to {MAX_BATCH}")]
    Batch(usize),
    #[error("hidden state {index} has width {got}, the pack's D is {want}")]
    Width { index: usize, got: usize, want: usize },
    #[error("probe {index}: tensor {tensor} needs bytes {range:?} but the probe has {len}")]
    Bytes { index: usize, tensor: usize, range: Range<usize>, len: usize },
    #[error("{got} output values where the call scores {want}")]
    Output { got: usize, want: usize },
    #[error("{sets} sets of hidden states for {probes} probes")]
    Sets { sets: usize, probes: usize },
    #[error("probe {probe}: hidden-state set {set:?} must name 1 to 32 of the call's {batch} states")]
    Set { probe: usize, set: Vec<usize>, batch: usize },
    #[error("could not start {threads} kernel threads: {reason}")]
    Threads { threads: usize, reason: String },
}

/// One probe's bytes in the pack's layout, with where each of its six tensors lies.
#[derive(Debug, Clone, Copy)]
pub struct ProbeRef<'a> {
    pub bytes: &'a [u8],
    /// Byte ranges in pack layout order: b1, w1, b2, w2, b3, w3.
    pub ranges: &'a [Range<usize>; 6],
}

/// Weights in their stored dtype, little-endian, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [u8]),
    Bf16(&'a [u8]),
}

impl Weights<'_> {
    fn len(&self) -> usize {
        match self {
            Weights::F32(b) => b.len() / 4,
            Weights::Bf16(b) => b.len() / 2,
        }
    }

    /// Element `i`, widened to f32 exactly.
    #[inline]
    fn get(&self, i: usize) -> f32 {
        match self {
            Weights::F32(b) => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
            Weights::Bf16(b) => f32::from_bits(u32::from(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])) << 16),
        }
    }

    /// Elements `[start, start + n)`.
    fn slice(&self, start: usize, n: usize) -> Self {
        match self {
            Weights::F32(b) => Weights::F32(&b[4 * start..4 * (start + n)]),
            Weights::Bf16(b) => Weights::Bf16(&b[2 * start..2 * (start + n)]),
        }
    }
}

/// Step 2 and 3's shared part: the fixed tree over the 16 partials.
#[inline]
pub fn tree_sum(mut p: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            p[l] += p[l + width];
        }
        width /= 2;
    }
    p[0]
}

#[inline]
fn relu(v: f32) -> f32 {
    if v > 0.0 {
        v
    } else {
        0.0
    }
}

/// The reduction order in plain scalar code: `w · x` for `w`, `x` of equal length.
pub fn dot(w: Weights, x: &[f32]) -> f32 {
    let mut p = [0f32; LANES];
    let padded = x.len().div_ceil(LANES) * LANES;
    for i in 0..padded {
        let (wi, xi) = if i < x.len() { (w.get(i), x[i]) } else { (0.0, 0.0) };
        p[i % LANES] = wi.mul_add(xi, p[i % LANES]);
    }
    tree_sum(p)
}

/// The logit of one probe for one hidden state, in plain scalar code: the model every
/// kernel path must reproduce bit for bit.
pub fn reference_logit(probe: &ProbeRef, dtype: DType, x: &[f32]) -> f32 {
    let t = |i: usize| weights(dtype, &probe.bytes[probe.ranges[i].clone()]);
    let (b1, w1, b2, w2, b3, w3) = (t(B1), t(W1), t(B2), t(W2), t(B3), t(W3));
    let d = x.len();
    let a1: Vec<f32> = (0..HIDDEN1).map(|r| relu(dot(w1.slice(r * d, d), x) + b1.get(r))).collect();
    let a2: Vec<f32> = (0..HIDDEN2).map(|r| relu(dot(w2.slice(r * HIDDEN1, HIDDEN1), &a1) + b2.get(r))).collect();
    dot(w3, &a2) + b3.get(0)
}

fn weights(dtype: DType, bytes: &[u8]) -> Weights<'_> {
    match dtype {
        DType::F32 => Weights::F32(bytes),
        DType::Bf16 => Weights::Bf16(bytes),
    }
}

/// Scores probes on the CPU. Holds its thread pool; cheap to call.
pub struct Kernel {
    isa: Isa,
    dtype: DType,
    hidden_dim: usize,
    pool: Option<rayon::ThreadPool>,
}

impl Kernel {
    /// A kernel for probes of `layout` on `threads` threads (1: the caller's thread only),
    /// using path `isa` (refused when the CPU lacks it).
    pub fn new(layout: &ProbeLayout, isa: Isa, threads: usize) -> Result<Self, KernelError> {
        if !isa.supported() {
            return Err(KernelError::Unsupported(isa));
        }
        let threads = threads.max(1);
        // rayon: a well-kept scoped pool (borrowed probe bytes cross into its threads safely),
        // whose idle workers sleep after a short spin instead of holding cores.
        let pool = if threads > 1 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("kernel-{i}"))
                .build()
                .map_err(|e| KernelError::Threads { threads, reason: e.to_string() })?;
            Some(pool)
        } else {
            None
        };
        Ok(Self { isa, dtype: layout.dtype, hidden_dim: layout.hidden_dim, pool })
    }

    /// Logits of every probe for every hidden state: `out[p * B + b]` for probe `p` and
    /// hidden state `b`, B = `hidden.len()`.
    pub fn score(&self, probes: &[ProbeRef], hidden: &[&[f32]], out: &mut [f32]) -> Result<(), KernelError> {
        let all: Vec<usize> = (0..hidden.len()).collect();
        let sets = vec![&all[..]; probes.len()];
        self.score_sets(probes, &sets, hidden, out)
    }

    /// Probe `i` scored for the hidden states `sets[i]` only (indices into `hidden`; 1 to
    /// [`MAX_BATCH`] of them): its logits go to `out` in that order, probe after probe, so
    /// `out` holds the sum of the sets' lengths. Sessions use it for a step that scores the
    /// union of their probes, each against the hidden states of the sessions that need it:
    /// each weight is read once per step, and no logit is computed for a session that did
    /// not ask for it. By the invariant, a logit's bits do not depend on the sets.
    pub fn score_sets(
        &self,
        probes: &[ProbeRef],
        sets: &[&[usize]],
        hidden: &[&[f32]],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let batch = hidden.len();
        if batch == 0 || batch > MAX_BATCH {
            return Err(KernelError::Batch(batch));
        }
        let d = self.hidden_dim;
        if let Some((index, x)) = hidden.iter().enumerate().find(|(_, x)| x.len() != d) {
            return Err(KernelError::Width { index, got: x.len(), want: d });
        }
        if sets.len() != probes.len() {
            return Err(KernelError::Sets { sets: sets.len(), probes: probes.len() });
        }
        if let Some((probe, set)) = sets
            .iter()
            .enumerate()
            .find(|(_, set)| set.is_empty() || set.len() > MAX_BATCH || set.iter().any(|&b| b >= batch))
        {
            return Err(KernelError::Set { probe, set: set.to_vec(), batch });
        }
        let total: usize = sets.iter().map(|s| s.len()).sum();
        if out.len() != total {
            return Err(KernelError::Output { got: out.len(), want: total });
        }
        let elt = self.dtype.size();
        let numel = [HIDDEN1, HIDDEN1 * d, HIDDEN2, HIDDEN2 * HIDDEN1, 1, HIDDEN2];
        for (index, p) in probes.iter().enumerate() {
            for (tensor, (range, n)) in p.ranges.iter().zip(numel).enumerate() {
                if range.len() != n * elt || range.end > p.bytes.len() {
                    return Err(KernelError::Bytes { index, tensor, range: range.clone(), len: p.bytes.len() });
                }
            }
        }
        // The hidden states, zero-padded to whole 16-lane chunks once for all probes.
        let padded = d.div_ceil(LANES) * LANES;
        let mut xs = vec![0f32; padded * batch];
        for (row, x) in xs.chunks_exact_mut(padded).zip(hidden) {
            row[..d].copy_from_slice(x);
        }
        let job = Job { isa: self.isa, dtype: self.dtype, d, xs: xs.chunks_exact(padded).collect() };
        // Each probe's share of `out`.
        let mut outs = Vec::with_capacity(probes.len());
        let mut rest = out;
        for set in sets {
            let (mine, tail) = rest.split_at_mut(set.len());
            outs.push(mine);
            rest = tail;
        }
        let run = |(p, set, o): (&ProbeRef, &&[usize], &mut &mut [f32])| {
            let xs: [&[f32]; MAX_BATCH] = std::array::from_fn(|i| set.get(i).map_or(&[][..], |&b| job.xs[b]));
            job.probe(p, &xs[..set.len()], o)
        };
        match &self.pool {
            None => probes.iter().zip(sets).zip(outs.iter_mut()).map(|((p, s), o)| (p, s, o)).for_each(run),
            Some(pool) => {
                use rayon::prelude::*;
                pool.install(|| {
                    probes.par_iter().zip(sets).zip(outs.par_iter_mut()).map(|((p, s), o)| (p, s, o)).for_each(run)
                })
            }
        }
        Ok(())
    }
}

/// One call's shared, read-only inputs.
struct Job<'a> {
    isa: Isa,
    dtype: DType,
    d: usize,
    /// The padded hidden states, one slice each (B = `xs.len()`).
    xs: Vec<&'a [f32]>,
}

impl Job<'_> {
    /// Scores one probe for each of `xs` (some of the call's padded hidden states; lengths were
    /// checked by `score_sets`).
    fn probe(&self, p: &ProbeRef, xs: &[&[f32]], out: &mut [f32]) {
        let t = |i: usize| weights(self.dtype, &p.bytes[p.ranges[i].clone()]);
        let (b1, w1, b2, w2, b3, w3) = (t(B1), t(W1), t(B2), t(W2), t(B3), t(W3));
        let (d, batch) = (self.d, xs.len());
        // Layer 1: each weight row is read from memory once for all B hidden states.
        let mut a1 = [[0f32; HIDDEN1]; MAX_BATCH];
        self.layer(HIDDEN1, |r| w1.slice(r * d, d), xs, |r, b, sum| a1[b][r] = relu(sum + b1.get(r)));
        // Layer 2 (128 wide, whole chunks). Slices on the stack: no allocation per probe.
        let mut a2 = [[0f32; HIDDEN2]; MAX_BATCH];
        let a1s: [&[f32]; MAX_BATCH] = std::array::from_fn(|b| &a1[b][..]);
        let a2_row = |r: usize| w2.slice(r * HIDDEN1, HIDDEN1);
        self.layer(HIDDEN2, a2_row, &a1s[..batch], |r, b, sum| a2[b][r] = relu(sum + b2.get(r)));
        // Layer 3 (one row, 64 wide).
        let a2s: [&[f32]; MAX_BATCH] = std::array::from_fn(|b| &a2[b][..]);
        self.layer(1, |_| w3, &a2s[..batch], |_, b, sum| out[b] = sum + b3.get(0));
    }

    /// For each of `rows` rows (`row(r)`) and hidden state `b`, the reduced dot product
    /// `sum`, handed to `done(r, b, sum)`. Rows go to the SIMD paths in blocks of 4.
    fn layer<'w>(
        &self,
        rows: usize,
        row: impl Fn(usize) -> Weights<'w>,
        xs: &[&[f32]],
        mut done: impl FnMut(usize, usize, f32),
    ) {
        let block = if rows.is_multiple_of(x86::MAX_ROWS) { x86::MAX_ROWS } else { 1 };
        let mut partials = [[0f32; LANES]; x86::MAX_ROWS * MAX_BATCH];
        for first in (0..rows).step_by(block) {
            let ws: [Weights; x86::MAX_ROWS] = std::array::from_fn(|i| row(first + i.min(block - 1)));
            let got = &mut partials[..block * xs.len()];
            match self.isa {
                Isa::Scalar => scalar_lanes(&ws[..block], xs, got),
                Isa::Avx2 | Isa::Avx512 => x86::lanes(self.isa, &ws[..block], xs, got),
            }
            for (i, p) in got.iter().enumerate() {
                done(first + i / xs.len(), i % xs.len(), tree_sum(*p));
            }
        }
    }
}

/// Step 1 in scalar code: `out[r * xs.len() + g]` for row `r` and hidden state `g`.
fn scalar_lanes(rows: &[Weights], xs: &[&[f32]], out: &mut [[f32; LANES]]) {
    for (r, w) in rows.iter().enumerate() {
        for (g, x) in xs.iter().enumerate() {
            let p = &mut out[r * xs.len() + g];
            *p = [0.0; LANES];
            let padded = w.len().div_ceil(LANES) * LANES;
            for i in 0..padded {
                let wi = if i < w.len() { w.get(i) } else { 0.0 };
                p[i % LANES] = wi.mul_add(x[i], p[i % LANES]);
            }
        }
    }
}

#[cfg(test)]
mod tests;
