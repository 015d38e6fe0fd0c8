//! Simplex lenses' rolling baselines: how far each pole's score is from its own recent past.
//!
//! Why here: a simplex reading is a decision over a token's scores and the stream's history,
//! like an alert, so it is pure code every engine shares. headspace keeps, per pole, its last
//! 100 scores (the current one included) and reports the current score's distance from their
//! mean in standard deviations: nothing with fewer than 10 scores, 0 when they hardly vary.

use std::collections::VecDeque;

/// Scores kept per pole.
pub const BASELINE_WINDOW: usize = 100;
/// Fewer scores than this give no deviation.
pub const BASELINE_MIN: usize = 10;
/// A baseline whose standard deviation is under this gives a deviation of 0.
pub const BASELINE_MIN_STD: f64 = 0.001;

/// One stream's baselines, one per simplex pole, each bounded by [`BASELINE_WINDOW`].
#[derive(Debug, Clone, Default)]
pub struct Baselines {
    poles: Vec<VecDeque<f64>>,
}

impl Baselines {
    /// Empty baselines for every simplex pole of `pack`.
    pub fn for_pack(pack: &crate::pack::Pack) -> Self {
        Self::new(pack.pole_probes().len())
    }

    pub fn new(poles: usize) -> Self {
        Self { poles: (0..poles).map(|_| VecDeque::with_capacity(BASELINE_WINDOW)).collect() }
    }

    /// Adds this token's scores (one per pole, in order) and returns each pole's deviation:
    /// `(score - mean) / std` over its window (population standard deviation, in f64), `None`
    /// while the window holds fewer than [`BASELINE_MIN`] scores.
    pub fn observe(&mut self, scores: &[f32]) -> Vec<Option<f32>> {
        debug_assert_eq!(scores.len(), self.poles.len());
        self.poles
            .iter_mut()
            .zip(scores)
            .map(|(window, &score)| {
                if window.len() == BASELINE_WINDOW {
                    window.pop_front();
                }
                window.push_back(score as f64);
                if window.len() < BASELINE_MIN {
                    return None;
                }
                let n = window.len() as f64;
                let mean = window.iter().sum::<f64>() / n;
                let std = (window.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
                Some(if std < BASELINE_MIN_STD { 0.0 } else { ((score as f64 - mean) / std) as f32 })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deviation_needs_ten_scores_and_measures_the_current_one_against_its_window() {
        let mut b = Baselines::new(1);
        for i in 0..9 {
            assert_eq!(b.observe(&[i as f32]), vec![None], "score {i}");
        }
        // Window 0..=9: mean 4.5, population std sqrt(8.25).
        let d = b.observe(&[9.0])[0].unwrap();
        assert!((d as f64 - 4.5 / 8.25f64.sqrt()).abs() < 1e-6, "{d}");
    }

    #[test]
    fn a_flat_baseline_gives_zero_and_the_window_forgets_after_a_hundred() {
        let mut b = Baselines::new(2);
        for _ in 0..BASELINE_WINDOW {
            b.observe(&[0.25, 0.5]);
        }
        assert_eq!(b.observe(&[0.25, 0.5]), vec![Some(0.0), Some(0.0)]);
        // One outlier, then a hundred flat scores push it out of the window.
        assert!(b.observe(&[0.9, 0.5])[0].unwrap() > 9.0);
        for _ in 0..BASELINE_WINDOW - 1 {
            b.observe(&[0.25, 0.5]);
        }
        assert_eq!(b.observe(&[0.25, 0.5])[0], Some(0.0));
        assert!(b.poles.iter().all(|w| w.len() == BASELINE_WINDOW), "bounded");
    }
}
