//! A lens's score from its probes' logits: the one definition every engine uses
//! (docs/cascade-semantics.md, "Lens scores"). Pure arithmetic over plain data, so the
//! reference, the oracle and the runtime cannot disagree on it.
//!
//! A probe's raw score is `sigmoid(logit)` (f32, [`super::sigmoid`]). With quantiles `q`
//! (its raw scores on background text at levels `0, 1/(n-1), ..., 1`) its calibrated score is
//! the share of that background it exceeds, by linear interpolation ([`calibrate`]). A lens
//! whose probes all have quantiles scores the max of their calibrated scores; any other lens
//! scores the mean of its raw scores. A lens of one uncalibrated probe therefore scores exactly
//! `sigmoid(logit)`, as a v1 concept does.
//!
//! A concept-calibrated pack (headspace's older `calibration.json`) also maps each lens score
//! to the score *reported* ([`normalize`], [`reported`]): reports and alerts use it, while
//! expansion and pruning keep deciding on lens scores, as in headspace.

use std::borrow::Cow;

use super::{sigmoid, Scored};
use crate::pack::{ConceptCalibration, ConceptId, Pack};

/// The calibrated score of raw score `p` against non-decreasing quantiles `q` (at least two):
/// 0 at or below `q[0]`, 1 at or above `q[n-1]`, else `(i + (p - q[i]) / (q[i+1] - q[i])) /
/// (n - 1)` with `i` the last index such that `q[i] <= p`. Computed in f64.
pub fn calibrate(p: f32, q: &[f64]) -> f64 {
    let p = p as f64;
    let n = q.len();
    if n < 2 || p <= q[0] {
        return 0.0;
    }
    if p >= q[n - 1] {
        return 1.0;
    }
    // q[0] < p < q[n-1]: the last i with q[i] <= p is below n - 1, and q[i+1] > p >= q[i].
    let i = q.partition_point(|&v| v <= p) - 1;
    (i as f64 + (p - q[i]) / (q[i + 1] - q[i])) / (n - 1) as f64
}

/// A lens's score from its probes' logits and quantiles, in the pack's order: the
/// [`Scored::prob`] as defined above, and as [`Scored::logit`] the largest probe logit.
pub fn combine<'q>(id: ConceptId, probes: impl Iterator<Item = (f32, Option<&'q [f64]>)> + Clone) -> Scored {
    let logit = probes.clone().map(|(l, _)| l).fold(f32::NEG_INFINITY, f32::max);
    let calibrated = probes.clone().all(|(_, q)| q.is_some());
    let prob = if calibrated {
        probes.map(|(l, q)| calibrate(sigmoid(l), q.unwrap_or_default()) as f32).fold(0.0f32, f32::max)
    } else {
        let (sum, n) = probes.fold((0.0f64, 0usize), |(s, n), (l, _)| (s + sigmoid(l) as f64, n + 1));
        (sum / n.max(1) as f64) as f32
    };
    Scored { id, logit, prob }
}

/// Concept `id`'s score in `pack` from its probes' logits (in [`Pack::probes_of`] order).
pub fn score_lens(pack: &Pack, id: ConceptId, logits: &[f32]) -> Scored {
    combine(id, pack.probes_of(id).zip(logits).map(|(p, &l)| (l, pack.quantiles(p))))
}

/// The scores of lenses `ids` from all their probes' logits, back to back in `ids`' order.
/// In a v2 pack each lens's probe logits are also kept in `keep`, for the token's report.
pub fn score_lenses(
    pack: &Pack,
    ids: &[ConceptId],
    logits: &[f32],
    keep: &mut std::collections::HashMap<ConceptId, Vec<f32>>,
) -> Vec<Scored> {
    let versioned = pack.format_version() > 1;
    let mut at = 0;
    ids.iter()
        .map(|&c| {
            let n = pack.probes_of(c).len();
            at += n;
            let mine = &logits[at - n..at];
            if versioned {
                keep.insert(c, mine.to_vec());
            }
            score_lens(pack, c, mine)
        })
        .collect()
}

/// Below this share of firings on both other concepts' prompts and generation, a concept's
/// statistics are too thin to trust, and its score is pulled toward 0.5 in proportion.
const MIN_OBSERVATION_RATE: f64 = 0.05;
/// A gap of this much between `self_mean` and `cross_mean` earns full confidence.
const FULL_CONFIDENCE_GAP: f64 = 0.2;

/// The reported score of lens score `p` under concept calibration `c`, in f64: HatCat's
/// three-stage normalization, as headspace applies it (docs/cascade-semantics.md, "Reported
/// scores"). (1) Map `[0, cross_mean]` to `[0, 0.5]` and `[cross_mean, self_mean]` to
/// `[0.5, 1]`; (2) pull toward 0.5 by the confidence `(1 - cross_fire_rate)(1 - gen_fire_rate)
/// (1 - noise_fire_rate) min(1, gap / 0.2)`; (3) compress with `1 / (1 + exp(-6 (x - 0.5)))`.
/// Thin statistics (both fire rates under 0.05) skip (1) and take as confidence the larger
/// rate over 0.05; statistics without a usable range (`cross_mean <= 0` or `self_mean <=
/// cross_mean`) skip (1) and the gap term. Degenerate statistics whose arithmetic yields no
/// number (a gap so small that the range map overflows while the confidence underflows) report
/// 0.5, as a lens without confidence does.
pub fn normalize(c: &ConceptCalibration, p: f64) -> f64 {
    let compress = |x: f64| {
        let v = 1.0 / (1.0 + (-6.0 * (x - 0.5)).exp());
        if v.is_nan() {
            0.5
        } else {
            v
        }
    };
    if c.cross_fire_rate < MIN_OBSERVATION_RATE && c.gen_fire_rate < MIN_OBSERVATION_RATE {
        let confidence = c.cross_fire_rate.max(c.gen_fire_rate) / MIN_OBSERVATION_RATE;
        return compress(0.5 + (p - 0.5) * confidence);
    }
    let noise = (1.0 - c.cross_fire_rate) * (1.0 - c.gen_fire_rate) * (1.0 - c.noise_fire_rate);
    if c.cross_mean <= 0.0 || c.self_mean <= c.cross_mean {
        return compress(0.5 + (p - 0.5) * noise);
    }
    let gap = c.self_mean - c.cross_mean;
    let confidence = (1.0 - c.cross_fire_rate)
        * (1.0 - c.gen_fire_rate)
        * (gap / FULL_CONFIDENCE_GAP).min(1.0)
        * (1.0 - c.noise_fire_rate);
    let ranged = if p >= c.cross_mean { 0.5 + 0.5 * (p - c.cross_mean) / gap } else { 0.5 * p / c.cross_mean };
    compress(0.5 + (ranged - 0.5) * confidence)
}

/// A token's scores as reported: in a concept-calibrated pack each lens's score through
/// [`normalize`] (logits and ids unchanged); in any other pack, `scored` itself.
pub fn reported<'s>(pack: &Pack, scored: &'s [Scored]) -> Cow<'s, [Scored]> {
    if !pack.concept_calibrated() {
        return Cow::Borrowed(scored);
    }
    Cow::Owned(
        scored
            .iter()
            .map(|s| {
                let c = pack.concept_calibration(s.id).unwrap_or(&ConceptCalibration::NEUTRAL);
                Scored { prob: normalize(c, s.prob as f64) as f32, ..*s }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(self_mean: f64, cross_mean: f64, cross: f64, gen: f64, noise: f64) -> ConceptCalibration {
        ConceptCalibration { self_mean, cross_mean, cross_fire_rate: cross, gen_fire_rate: gen, noise_fire_rate: noise }
    }

    #[test]
    fn a_lens_without_statistics_in_a_calibrated_pack_reports_one_half() {
        for p in [0.0, 0.3, 0.5, 0.99, 1.0] {
            assert_eq!(normalize(&ConceptCalibration::NEUTRAL, p), 0.5);
        }
    }

    #[test]
    fn normalization_maps_the_noise_floor_to_one_half_and_the_own_mean_high() {
        // Full confidence: rates at 0.05 (not thin), no noise, a gap of 0.5.
        let c = stats(0.8, 0.3, 0.05, 0.05, 0.0);
        let conf = 0.95 * 0.95;
        let compress = |x: f64| 1.0 / (1.0 + (-6.0 * (x - 0.5)).exp());
        assert_eq!(normalize(&c, 0.3), compress(0.5));
        assert_eq!(normalize(&c, 0.8), compress(0.5 + 0.5 * conf));
        assert_eq!(normalize(&c, 0.15), compress(0.5 + (0.25 - 0.5) * conf));
        // Monotone in the score.
        let xs: Vec<f64> = (0..=100).map(|i| normalize(&c, i as f64 / 100.0)).collect();
        assert!(xs.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn thin_or_rangeless_statistics_take_the_simpler_branches() {
        let compress = |x: f64| 1.0 / (1.0 + (-6.0 * (x - 0.5)).exp());
        // Both rates under 0.05: confidence 0.02 / 0.05.
        let thin = stats(0.9, 0.2, 0.02, 0.01, 0.5);
        assert_eq!(normalize(&thin, 0.9), compress(0.5 + 0.4 * (0.02 / 0.05)));
        // self_mean below cross_mean: no range map, no gap term.
        let flat = stats(0.2, 0.4, 0.5, 0.0, 0.0);
        assert_eq!(normalize(&flat, 0.9), compress(0.5 + 0.4 * 0.5));
    }

    #[test]
    fn calibration_interpolates_between_quantiles_and_clamps_outside() {
        // Values exact in f32, so the comparisons are exact too.
        let q = [0.125, 0.25, 0.625];
        assert_eq!(calibrate(0.0625, &q), 0.0);
        assert_eq!(calibrate(0.125, &q), 0.0);
        assert_eq!(calibrate(0.75, &q), 1.0);
        assert_eq!(calibrate(0.625, &q), 1.0);
        assert_eq!(calibrate(0.1875, &q), 0.25);
        assert_eq!(calibrate(0.4375, &q), 0.75);
    }

    #[test]
    fn repeated_quantiles_place_a_score_at_the_top_of_the_plateau() {
        let q = [0.0, 0.5, 0.5, 1.0];
        // 0.5 is at or above q[1] and q[2]: i = 2, so 2/3.
        assert_eq!(calibrate(0.5, &q), 2.0 / 3.0);
        assert!(calibrate(0.49999, &q) < 1.0 / 3.0 + 1e-4);
    }

    #[test]
    fn one_uncalibrated_probe_scores_its_sigmoid_exactly() {
        for logit in [-30.0f32, -1.5, 0.0, 0.7, 12.0] {
            let s = combine(ConceptId(3), [(logit, None)].into_iter());
            assert_eq!((s.prob, s.logit), (sigmoid(logit), logit));
        }
    }

    #[test]
    fn a_lens_is_the_max_of_calibrated_probes_only_when_all_are_calibrated() {
        let q: &[f64] = &[0.0, 0.5, 1.0];
        let both = combine(ConceptId(0), [(0.0f32, Some(q)), (2.0, Some(q))].into_iter());
        let want = calibrate(sigmoid(2.0), q) as f32;
        assert_eq!(both.prob, want);
        assert_eq!(both.logit, 2.0);
        let one = combine(ConceptId(0), [(0.0f32, Some(q)), (2.0, None)].into_iter());
        let mean = ((sigmoid(0.0) as f64 + sigmoid(2.0) as f64) / 2.0) as f32;
        assert_eq!(one.prob, mean, "one uncalibrated probe makes the lens a raw mean");
    }
}
