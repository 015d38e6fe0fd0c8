//! The kernel's guarantees, on whatever CPU runs the tests: every path this CPU supports is
//! forced in turn, and each must give the scalar model's bits, in any composition.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::*;
use crate::pack::layout::ProbeWeights;

/// A random probe's bytes: weights ~ N(0, 1/fan_in), some exact zeros and negative zeros, and
/// biases that leave some units of each layer active and some dead.
fn probe_bytes(rng: &mut ChaCha8Rng, layout: &ProbeLayout) -> Vec<u8> {
    let mut n = |len: usize, scale: f32| -> Vec<f32> {
        (0..len)
            .map(|_| match rng.random_range(0..50) {
                0 => 0.0,
                1 => -0.0,
                _ => Distribution::<f32>::sample(&StandardNormal, &mut *rng) * scale,
            })
            .collect()
    };
    let d = layout.hidden_dim;
    let w = ProbeWeights {
        w1: n(HIDDEN1 * d, 1.0 / (d as f32).sqrt()),
        b1: n(HIDDEN1, 0.3),
        w2: n(HIDDEN2 * HIDDEN1, 1.0 / (HIDDEN1 as f32).sqrt()),
        b2: n(HIDDEN2, 0.3),
        w3: n(HIDDEN2, 3.0 / (HIDDEN2 as f32).sqrt()),
        b3: n(1, 0.5),
    };
    let mut out = Vec::new();
    w.encode_into(layout, &mut out);
    out
}

fn hidden_states(rng: &mut ChaCha8Rng, d: usize, n: usize) -> Vec<Vec<f32>> {
    (0..n).map(|_| (0..d).map(|_| Distribution::<f32>::sample(&StandardNormal, &mut *rng) * 2.0).collect()).collect()
}

struct Fixture {
    layout: ProbeLayout,
    ranges: [Range<usize>; 6],
    probes: Vec<Vec<u8>>,
    hidden: Vec<Vec<f32>>,
}

impl Fixture {
    fn new(seed: u64, d: usize, dtype: DType, probes: usize, hidden: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let layout = ProbeLayout::new(d, dtype);
        let ranges = layout.ranges(&layout.canonical_offsets());
        let probes = (0..probes).map(|_| probe_bytes(&mut rng, &layout)).collect();
        Self { layout, ranges, hidden: hidden_states(&mut rng, d, hidden), probes }
    }

    fn probe(&self, i: usize) -> ProbeRef<'_> {
        ProbeRef { bytes: &self.probes[i], ranges: &self.ranges }
    }

    /// Scores `probes` (indices, repeats allowed) for `hidden` (indices) with `kernel`.
    fn score(&self, kernel: &Kernel, probes: &[usize], hidden: &[usize]) -> Vec<f32> {
        let refs: Vec<ProbeRef> = probes.iter().map(|&p| self.probe(p)).collect();
        let xs: Vec<&[f32]> = hidden.iter().map(|&h| &self.hidden[h][..]).collect();
        let mut out = vec![f32::NAN; refs.len() * xs.len()];
        kernel.score(&refs, &xs, &mut out).unwrap();
        out
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_path_matches_the_scalar_model_bit_for_bit() {
    eprintln!("kernel tests on: {}", CpuInfo::detect());
    for dtype in [DType::F32, DType::Bf16] {
        // Widths with and without a short last chunk, the sizes the project meets.
        for (seed, d) in [(1, 1), (2, 7), (3, 16), (4, 17), (5, 100), (6, 576), (7, 2560)] {
            let f = Fixture::new(seed, d, dtype, 3, 9);
            let want: Vec<u32> = (0..3)
                .flat_map(|p| (0..9).map(move |h| (p, h)))
                .map(|(p, h)| reference_logit(&f.probe(p), dtype, &f.hidden[h]).to_bits())
                .collect();
            for isa in Isa::available() {
                let kernel = Kernel::new(&f.layout, isa, 1).unwrap();
                let got = f.score(&kernel, &[0, 1, 2], &(0..9).collect::<Vec<_>>());
                assert_eq!(bits(&got), want, "{isa} {dtype} D={d}");
            }
        }
    }
}

#[test]
fn randomized_compositions_give_each_logit_the_bits_it_has_alone() {
    let paths = Isa::available();
    eprintln!("kernel paths forced: {paths:?} on {}", CpuInfo::detect().model);
    let mut kernels: HashMap<(DType, usize, Isa, usize), Kernel> = HashMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(20261201);
    for (dtype, d) in [(DType::F32, 97), (DType::Bf16, 97), (DType::F32, 256), (DType::Bf16, 576)] {
        let f = Fixture::new(d as u64, d, dtype, 12, 40);
        // Each probe scored alone, one hidden state, one thread, the scalar path.
        let solo_kernel = Kernel::new(&f.layout, Isa::Scalar, 1).unwrap();
        let solo: Vec<Vec<u32>> =
            (0..12).map(|p| (0..40).map(|h| f.score(&solo_kernel, &[p], &[h])[0].to_bits()).collect()).collect();
        for trial in 0..60 {
            let isa = paths[rng.random_range(0..paths.len())];
            let threads = rng.random_range(1..=4);
            let kernel = kernels
                .entry((dtype, d, isa, threads))
                .or_insert_with(|| Kernel::new(&f.layout, isa, threads).unwrap());
            // Any subset, order and count of probes (repeats too), any B from 1 to 32.
            let count = rng.random_range(1..=24);
            let probes: Vec<usize> = (0..count).map(|_| rng.random_range(0..12)).collect();
            let batch = rng.random_range(1..=MAX_BATCH);
            let hidden: Vec<usize> = (0..batch).map(|_| rng.random_range(0..40)).collect();
            let got = f.score(kernel, &probes, &hidden);
            for (i, &p) in probes.iter().enumerate() {
                for (b, &h) in hidden.iter().enumerate() {
                    assert_eq!(
                        got[i * batch + b].to_bits(),
                        solo[p][h],
                        "trial {trial}: {isa}, {threads} threads, {dtype} D={d}, probe {p} at {i} of {count}, \
                         hidden state {h} at {b} of {batch}"
                    );
                }
            }
        }
    }
}

#[test]
fn per_probe_sets_of_hidden_states_give_each_logit_the_bits_it_has_alone() {
    // A sessions step: each probe against the hidden states of the sessions that need it.
    let mut rng = ChaCha8Rng::seed_from_u64(20261202);
    for (dtype, d) in [(DType::F32, 97), (DType::Bf16, 576)] {
        let f = Fixture::new(d as u64 + 1, d, dtype, 10, 32);
        let solo_kernel = Kernel::new(&f.layout, Isa::Scalar, 1).unwrap();
        let solo: Vec<Vec<u32>> =
            (0..10).map(|p| (0..32).map(|h| f.score(&solo_kernel, &[p], &[h])[0].to_bits()).collect()).collect();
        for trial in 0..40 {
            let paths = Isa::available();
            let isa = paths[rng.random_range(0..paths.len())];
            let kernel = Kernel::new(&f.layout, isa, rng.random_range(1..=3)).unwrap();
            let batch = rng.random_range(1..=MAX_BATCH);
            let hidden: Vec<usize> = (0..batch).map(|_| rng.random_range(0..32)).collect();
            let xs: Vec<&[f32]> = hidden.iter().map(|&h| &f.hidden[h][..]).collect();
            let probes: Vec<usize> = (0..rng.random_range(1..=16)).map(|_| rng.random_range(0..10)).collect();
            let sets: Vec<Vec<usize>> = probes
                .iter()
                .map(|_| {
                    let n = rng.random_range(1..=batch);
                    (0..n).map(|_| rng.random_range(0..batch)).collect()
                })
                .collect();
            let refs: Vec<ProbeRef> = probes.iter().map(|&p| f.probe(p)).collect();
            let set_refs: Vec<&[usize]> = sets.iter().map(|s| &s[..]).collect();
            let mut out = vec![f32::NAN; sets.iter().map(Vec::len).sum()];
            kernel.score_sets(&refs, &set_refs, &xs, &mut out).unwrap();
            let mut at = 0;
            for (&p, set) in probes.iter().zip(&sets) {
                for &b in set {
                    assert_eq!(
                        out[at].to_bits(),
                        solo[p][hidden[b]],
                        "trial {trial}: {isa} {dtype} probe {p}, state {b}"
                    );
                    at += 1;
                }
            }
        }
    }
}

#[test]
fn logits_are_the_mlp_within_f32_rounding() {
    for dtype in [DType::F32, DType::Bf16] {
        let f = Fixture::new(9, 300, dtype, 4, 6);
        let kernel = Kernel::new(&f.layout, Isa::best(), 2).unwrap();
        let got = f.score(&kernel, &[0, 1, 2, 3], &[0, 1, 2, 3, 4, 5]);
        let mut active = 0;
        for p in 0..4 {
            let w = ProbeWeights::decode(&f.layout, &f.layout.canonical_offsets(), &f.probes[p]).unwrap();
            for h in 0..6 {
                let x: Vec<f64> = f.hidden[h].iter().map(|&v| v as f64).collect();
                let (exact, scale) = w.logit_f64(&x);
                let diff = (got[p * 6 + h] as f64 - exact).abs();
                assert!(diff <= 1e-5 * scale.max(1.0), "{dtype} probe {p} hidden {h}: {} vs {exact}", got[p * 6 + h]);
                active += (exact != w.b3[0] as f64) as usize;
            }
        }
        assert!(active > 12, "the random probes keep units alive");
    }
}

#[test]
fn bad_calls_are_errors_that_name_the_limit() {
    let f = Fixture::new(3, 32, DType::F32, 2, 2);
    let kernel = Kernel::new(&f.layout, Isa::Scalar, 1).unwrap();
    let p = [f.probe(0), f.probe(1)];
    let x = &f.hidden[0][..];
    let mut out = vec![0.0; 2];
    assert_eq!(kernel.score(&p, &[], &mut out), Err(KernelError::Batch(0)));
    let many = vec![x; MAX_BATCH + 1];
    let mut big = vec![0.0; 2 * (MAX_BATCH + 1)];
    assert_eq!(kernel.score(&p, &many, &mut big), Err(KernelError::Batch(33)));
    assert_eq!(kernel.score(&p, &[&x[..31]], &mut out), Err(KernelError::Width { index: 0, got: 31, want: 32 }));
    assert_eq!(kernel.score(&p, &[x], &mut out[..1]), Err(KernelError::Output { got: 1, want: 2 }));
    let short = ProbeRef { bytes: &f.probes[1][..100], ranges: &f.ranges };
    assert!(matches!(kernel.score(&[p[0], short], &[x], &mut out), Err(KernelError::Bytes { index: 1, .. })));
    assert!(kernel.score(&p, &[x], &mut out).is_ok());
    let (one, none, far): (&[usize], &[usize], &[usize]) = (&[0], &[], &[0, 2]);
    assert_eq!(kernel.score_sets(&p, &[one], &[x], &mut out), Err(KernelError::Sets { sets: 1, probes: 2 }));
    assert_eq!(
        kernel.score_sets(&p, &[one, none], &[x], &mut out),
        Err(KernelError::Set { probe: 1, set: vec![], batch: 1 })
    );
    let err = kernel.score_sets(&p, &[one, far], &[x, x], &mut [0.0; 3]).unwrap_err();
    assert!(err.to_string().contains("probe 1") && err.to_string().contains("[0, 2]"), "{err}");
    for isa in [Isa::Avx2, Isa::Avx512] {
        if !isa.supported() {
            assert!(matches!(Kernel::new(&f.layout, isa, 1), Err(KernelError::Unsupported(_))));
        }
    }
}
