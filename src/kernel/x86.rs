//! Step 1 of the reduction (16 partial sums by FMA) with AVX2+FMA or AVX-512F, chosen at run
//! time. Both compute exactly what `scalar_lanes` does: lane `l` of the partials takes the
//! elements `i ≡ l (mod 16)` in increasing order, one fused multiply-add each, and a short
//! last chunk is zero-padded. Rows come in blocks of 4 against groups of hidden states (1 with
//! AVX2, up to 4 with AVX-512, what the registers hold): weights are read from memory once,
//! and later groups find them in L1.

use super::{Isa, Weights, LANES};

#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn has_avx2_fma() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn has_avx512f() -> bool {
    false
}

/// The partials of each of `rows` (equal lengths) against each of `xs` (zero-padded to whole
/// chunks, at least as long as a row rounded up to 16) into `out[r * xs.len() + g]`. `isa`
/// must be supported (checked when the kernel was made). Rows come in blocks of up to 4, so
/// that 4 independent FMA chains per hidden state hide the FMA latency and each chunk of x is
/// loaded once for 4 rows; neither changes any lane's order.
#[cfg(target_arch = "x86_64")]
pub(super) fn lanes(isa: Isa, rows: &[Weights], xs: &[&[f32]], out: &mut [[f32; LANES]]) {
    let n = rows[0].len();
    let full = n / LANES;
    assert!(rows.len() <= MAX_ROWS && rows.iter().all(|w| w.len() == n), "a block of equal rows");
    assert!(xs.iter().all(|x| x.len() >= n.div_ceil(LANES) * LANES), "kernel inputs are padded");
    assert_eq!(out.len(), rows.len() * xs.len());
    // A short last chunk: its weights widened and zero-padded here (reading past the row
    // would read the next row, or past the buffer).
    let mut tails = [[0f32; LANES]; MAX_ROWS];
    for (w, t) in rows.iter().zip(tails.iter_mut()) {
        for (i, v) in t.iter_mut().enumerate().take(n - full * LANES) {
            *v = w.get(full * LANES + i);
        }
    }
    let tails = (!n.is_multiple_of(LANES)).then_some(&tails);
    let bf16 = matches!(rows[0], Weights::Bf16(_));
    let ptrs: [*const u8; MAX_ROWS] = std::array::from_fn(|r| match rows.get(r) {
        Some(Weights::F32(b)) | Some(Weights::Bf16(b)) => b.as_ptr(),
        None => std::ptr::null(),
    });
    // Register blocking: AVX-512 (32 registers) takes all rows against 4 hidden states;
    // AVX2 (16 registers) takes 4 rows against 1 when B = 1, else 2 rows against up to 3,
    // so each widened weight vector serves several hidden states. 2×3 measured best of the
    // shapes tried for B = 8 (2×2, 1×4, 4×1, 2×4; docs/benchmarks.md), though its 12
    // accumulators, 4 weight and 2 x vectors are 18, and one accumulator spills.
    let (sub, group) = match isa {
        Isa::Avx512 => (rows.len(), 4),
        _ if xs.len() > 1 => (rows.len().min(2), 3),
        _ => (rows.len(), 1),
    };
    let batch = xs.len();
    let mut partials = [[0f32; LANES]; MAX_ROWS * 4];
    let elt = if bf16 { 2 } else { 4 };
    for first in (0..rows.len()).step_by(sub) {
        let block_rows = &ptrs[first..first + sub];
        let block_tails = tails.map(|t| &t[first..first + sub]);
        // The next sub-block's rows, prefetched while this one computes (rows of one tensor
        // are contiguous; past the last one this points at whatever follows, which a
        // prefetch may touch harmlessly). Without it each block's first pass waits on DRAM
        // at the loop's pace: measured +18-32% tokens/s in `bench --sessions` (1 and 8
        // sessions, steady state), kernel reads 9.7 → 13.1 GB/s.
        let next: [*const u8; MAX_ROWS] =
            std::array::from_fn(
                |r| if r < sub { ptrs[first + r].wrapping_add(sub * n * elt) } else { std::ptr::null() },
            );
        for (i, xs) in xs.chunks(group).enumerate() {
            let block = Block { rows: block_rows, full, tails: block_tails, xs, next: &next[..sub] };
            let got = &mut partials[..sub * xs.len()];
            // SAFETY: the CPU has the path's features (`Kernel::new` checked `isa.supported()`);
            // each row pointer holds `full` whole chunks of its dtype (a row is n ≥ 16·full
            // elements), and each x holds 16·(full + 1) floats when there is a tail, else 16·full.
            unsafe {
                match (isa, bf16) {
                    (Isa::Avx512, false) => avx512::block::<false>(&block, got),
                    (Isa::Avx512, true) => avx512::block::<true>(&block, got),
                    (_, false) => avx2::block::<false>(&block, got),
                    (_, true) => avx2::block::<true>(&block, got),
                }
            }
            for r in 0..sub {
                for g in 0..xs.len() {
                    out[(first + r) * batch + i * group + g] = got[r * xs.len() + g];
                }
            }
        }
    }
}

/// Prefetches one cache line at byte `at` of each of `rows` into L1. A hint: it changes no
/// result, and it cannot fault, whatever the address.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(rows: &[*const u8], at: usize) {
    for &p in rows {
        // SAFETY: `_mm_prefetch` only hints the cache; it never dereferences for the program.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(at) as *const i8)
        };
    }
}

/// Most rows in one block.
pub(super) const MAX_ROWS: usize = 4;

/// A block of rows against a group of hidden states.
#[cfg(target_arch = "x86_64")]
struct Block<'a> {
    rows: &'a [*const u8],
    full: usize,
    tails: Option<&'a [[f32; LANES]]>,
    xs: &'a [&'a [f32]],
    /// Rows to prefetch while this block computes (the next block's).
    next: &'a [*const u8],
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn lanes(_: Isa, rows: &[Weights], xs: &[&[f32]], out: &mut [[f32; LANES]]) {
    super::scalar_lanes(rows, xs, out)
}

/// Expands `$body` with `$r` and `$g` as constants for the block's row count (1..=4) and
/// group size (1..=4): the accumulators are then fixed-size arrays kept in registers.
macro_rules! by_shape {
    ($rows:expr, $group:expr, |$r:ident, $g:ident| $body:expr) => {
        match ($rows, $group) {
            (1, 1) => {
                const $r: usize = 1;
                const $g: usize = 1;
                $body
            }
            (1, 2) => {
                const $r: usize = 1;
                const $g: usize = 2;
                $body
            }
            (1, 3) => {
                const $r: usize = 1;
                const $g: usize = 3;
                $body
            }
            (1, 4) => {
                const $r: usize = 1;
                const $g: usize = 4;
                $body
            }
            (2, 1) => {
                const $r: usize = 2;
                const $g: usize = 1;
                $body
            }
            (2, 2) => {
                const $r: usize = 2;
                const $g: usize = 2;
                $body
            }
            (2, 3) => {
                const $r: usize = 2;
                const $g: usize = 3;
                $body
            }
            (4, 1) => {
                const $r: usize = 4;
                const $g: usize = 1;
                $body
            }
            (4, 2) => {
                const $r: usize = 4;
                const $g: usize = 2;
                $body
            }
            (4, 3) => {
                const $r: usize = 4;
                const $g: usize = 3;
                $body
            }
            (4, 4) => {
                const $r: usize = 4;
                const $g: usize = 4;
                $body
            }
            (r, g) => unreachable!("a block of {r} rows and {g} hidden states"),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// 8 bf16 values widened to f32 exactly: the bits moved to the top half.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn widen(v: __m128i) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
    }

    /// 16 weights from `p` (elements, not bytes, counted by `at`) as two 8-lane vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load<const BF16: bool>(p: *const u8, at: usize) -> (__m256, __m256) {
        if BF16 {
            let q = p.add(2 * at) as *const __m128i;
            (widen(_mm_loadu_si128(q)), widen(_mm_loadu_si128(q.add(1))))
        } else {
            let q = p.add(4 * at) as *const f32;
            (_mm256_loadu_ps(q), _mm256_loadu_ps(q.add(8)))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block<const BF16: bool>(b: &super::Block, out: &mut [[f32; LANES]]) {
        by_shape!(b.rows.len(), b.xs.len(), |R, G| {
            let w: [*const u8; R] = std::array::from_fn(|r| b.rows[r]);
            let x: [*const f32; G] = std::array::from_fn(|g| b.xs[g].as_ptr());
            let mut lo = [[_mm256_setzero_ps(); G]; R];
            let mut hi = [[_mm256_setzero_ps(); G]; R];
            let elt = if BF16 { 2 } else { 4 };
            for c in 0..b.full {
                if (c * LANES * elt).is_multiple_of(64) {
                    super::prefetch(b.next, c * LANES * elt);
                }
                // Each row's 16 weights loaded (and widened) once for all G hidden states.
                let wv: [(__m256, __m256); R] = std::array::from_fn(|r| load::<BF16>(w[r], c * LANES));
                for g in 0..G {
                    let xp = x[g].add(c * LANES);
                    let (xl, xh) = (_mm256_loadu_ps(xp), _mm256_loadu_ps(xp.add(8)));
                    for r in 0..R {
                        lo[r][g] = _mm256_fmadd_ps(wv[r].0, xl, lo[r][g]);
                        hi[r][g] = _mm256_fmadd_ps(wv[r].1, xh, hi[r][g]);
                    }
                }
            }
            if let Some(t) = b.tails {
                for g in 0..G {
                    let xp = x[g].add(b.full * LANES);
                    let (xl, xh) = (_mm256_loadu_ps(xp), _mm256_loadu_ps(xp.add(8)));
                    for r in 0..R {
                        let (wl, wh) = (_mm256_loadu_ps(t[r].as_ptr()), _mm256_loadu_ps(t[r].as_ptr().add(8)));
                        lo[r][g] = _mm256_fmadd_ps(wl, xl, lo[r][g]);
                        hi[r][g] = _mm256_fmadd_ps(wh, xh, hi[r][g]);
                    }
                }
            }
            for r in 0..R {
                for g in 0..G {
                    _mm256_storeu_ps(out[r * G + g].as_mut_ptr(), lo[r][g]);
                    _mm256_storeu_ps(out[r * G + g].as_mut_ptr().add(8), hi[r][g]);
                }
            }
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// 16 weights from `p` (elements, not bytes, counted by `at`) as one vector.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load<const BF16: bool>(p: *const u8, at: usize) -> __m512 {
        if BF16 {
            let v = _mm256_loadu_si256(p.add(2 * at) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
        } else {
            _mm512_loadu_ps(p.add(4 * at) as *const f32)
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block<const BF16: bool>(b: &super::Block, out: &mut [[f32; LANES]]) {
        by_shape!(b.rows.len(), b.xs.len(), |R, G| {
            let w: [*const u8; R] = std::array::from_fn(|r| b.rows[r]);
            let x: [*const f32; G] = std::array::from_fn(|g| b.xs[g].as_ptr());
            let mut acc = [[_mm512_setzero_ps(); G]; R];
            let elt = if BF16 { 2 } else { 4 };
            for c in 0..b.full {
                if (c * LANES * elt).is_multiple_of(64) {
                    super::prefetch(b.next, c * LANES * elt);
                }
                let wv: [__m512; R] = std::array::from_fn(|r| load::<BF16>(w[r], c * LANES));
                for g in 0..G {
                    let xv = _mm512_loadu_ps(x[g].add(c * LANES));
                    for r in 0..R {
                        acc[r][g] = _mm512_fmadd_ps(wv[r], xv, acc[r][g]);
                    }
                }
            }
            if let Some(t) = b.tails {
                for g in 0..G {
                    let xv = _mm512_loadu_ps(x[g].add(b.full * LANES));
                    for r in 0..R {
                        acc[r][g] = _mm512_fmadd_ps(_mm512_loadu_ps(t[r].as_ptr()), xv, acc[r][g]);
                    }
                }
            }
            for r in 0..R {
                for g in 0..G {
                    _mm512_storeu_ps(out[r * G + g].as_mut_ptr(), acc[r][g]);
                }
            }
        })
    }
}
