//! How much a cascade misses: its reports against the exhaustive oracle's scores of every
//! probe on the same tokens. Pure functions over plain data.
//!
//! Per token, with the oracle's ranking of all concepts (best first, ties to the lower id, as
//! every engine ranks):
//! - **top-10 recall**: the share of the oracle's 10 best concepts that the cascade reported;
//! - **top-10 scored recall**: the share of them the cascade scored at all (it differs from the
//!   first when the report hides decomposed parents, or is shorter than 10);
//! - **fired recall**: of the concepts with p > 0.5 anywhere in the pack, the share the cascade
//!   scored (summed over tokens before dividing, so tokens where many fire weigh more; tokens
//!   where none fires count for nothing);
//! - **rank displacement**: for each reported concept, |its rank in the oracle − its place in
//!   the report|, averaged over every reported entry (0: the report is the oracle's prefix).

use crate::pack::ConceptId;
use crate::policy::{rank, Scored};

/// The oracle's top list that recall is measured against.
pub const RECALL_AT: usize = 10;
/// A concept "fires" above this probability.
pub const FIRE_PROB: f32 = 0.5;

/// One token of the oracle: every concept's rank and whether it fires.
pub struct OracleToken {
    /// Concept ids, best first.
    order: Vec<ConceptId>,
    /// `rank_of[c]`: concept c's place in `order`.
    rank_of: Vec<u32>,
    fired: Vec<ConceptId>,
}

impl OracleToken {
    /// From every concept's score, by id (what [`OracleEngine::score_all`] gives).
    ///
    /// [`OracleEngine::score_all`]: crate::engine::oracle::OracleEngine::score_all
    pub fn new(scored: &[Scored]) -> Self {
        let mut scored = scored.to_vec();
        scored.sort_by(rank);
        let mut rank_of = vec![0u32; scored.len()];
        for (r, s) in scored.iter().enumerate() {
            rank_of[s.id.index()] = r as u32;
        }
        let fired = scored.iter().take_while(|s| s.prob > FIRE_PROB).map(|s| s.id).collect();
        Self { order: scored.into_iter().map(|s| s.id).collect(), rank_of, fired }
    }

    /// From every concept's logit, by id, on a pack of one uncalibrated probe per concept.
    pub fn from_logits(logits: &[f32]) -> Self {
        let scored: Vec<Scored> =
            logits.iter().enumerate().map(|(i, &logit)| Scored::raw(ConceptId(i as u32), logit)).collect();
        Self::new(&scored)
    }

    /// The oracle's best `k`.
    pub fn top(&self, k: usize) -> &[ConceptId] {
        &self.order[..k.min(self.order.len())]
    }

    /// Concepts with p > [`FIRE_PROB`], best first.
    pub fn fired(&self) -> &[ConceptId] {
        &self.fired
    }

    pub fn rank(&self, id: ConceptId) -> usize {
        self.rank_of[id.index()] as usize
    }
}

/// Sums over tokens; [`FidelityTotals::summary`] turns them into the figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FidelityTotals {
    pub tokens: usize,
    /// Oracle top-10 concepts the cascade reported, all tokens.
    pub top_found: usize,
    /// Oracle top-10 slots, all tokens (10 per token on a pack of 10 or more).
    pub top_slots: usize,
    /// Oracle top-10 concepts the cascade scored, all tokens.
    pub top_scored: usize,
    pub fired_found: usize,
    pub fired_total: usize,
    pub displacement_sum: f64,
    pub reported: usize,
}

/// The figures, as tune.json and `run --oracle` print them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Fidelity {
    pub tokens: usize,
    pub recall_top10: f64,
    pub recall_top10_scored: f64,
    /// `None` when nothing fired on any token.
    pub recall_fired: Option<f64>,
    pub fired_per_token: f64,
    pub rank_displacement: f64,
}

impl FidelityTotals {
    /// Adds one token: what the cascade reported (best first) and what it scored.
    pub fn add(&mut self, oracle: &OracleToken, reported: &[ConceptId], scored: &[ConceptId]) {
        self.tokens += 1;
        let top = oracle.top(RECALL_AT);
        self.top_slots += top.len();
        self.top_found += top.iter().filter(|c| reported.contains(c)).count();
        // `scored` is ascending (TokenReport::scored_ids).
        let was_scored = |c: &&ConceptId| scored.binary_search(c).is_ok();
        self.top_scored += top.iter().filter(was_scored).count();
        self.fired_total += oracle.fired().len();
        self.fired_found += oracle.fired().iter().filter(was_scored).count();
        for (place, &c) in reported.iter().enumerate() {
            self.displacement_sum += oracle.rank(c).abs_diff(place) as f64;
        }
        self.reported += reported.len();
    }

    pub fn summary(&self) -> Fidelity {
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Fidelity {
            tokens: self.tokens,
            recall_top10: ratio(self.top_found, self.top_slots),
            recall_top10_scored: ratio(self.top_scored, self.top_slots),
            recall_fired: (self.fired_total > 0).then(|| ratio(self.fired_found, self.fired_total)),
            fired_per_token: ratio(self.fired_total, self.tokens),
            rank_displacement: if self.reported == 0 { 0.0 } else { self.displacement_sum / self.reported as f64 },
        }
    }
}

/// The share of `want`'s entries that `got` also has (1 for an empty `want`): how far a
/// pipelined report agrees with the exact one for the same token.
pub fn overlap(want: &[ConceptId], got: &[ConceptId]) -> f64 {
    if want.is_empty() {
        return 1.0;
    }
    want.iter().filter(|c| got.contains(c)).count() as f64 / want.len() as f64
}

/// The oracle's view of trace rows `0..rows` (every probe on each, batched on the kernel).
pub fn oracle_rows(
    oracle: &crate::engine::oracle::OracleEngine,
    trace: &crate::npy::Matrix,
    rows: usize,
) -> Result<Vec<OracleToken>, crate::engine::EngineError> {
    let rows = rows.min(trace.rows);
    let hidden: Vec<&[f32]> = (0..rows).map(|r| trace.row(r)).collect();
    Ok(oracle.score_all(0, &hidden)?.iter().map(|l| OracleToken::new(l)).collect())
}

/// The figures of reports made on a trace replayed from its start: report `t` (its `index`)
/// saw row `t % oracle.len()`.
pub fn of_reports(oracle: &[OracleToken], reports: &[crate::engine::TokenReport]) -> Fidelity {
    let mut totals = FidelityTotals::default();
    if oracle.is_empty() {
        return totals.summary();
    }
    for r in reports {
        let reported: Vec<ConceptId> = r.top.iter().map(|e| e.id).collect();
        totals.add(&oracle[r.index % oracle.len()], &reported, &r.scored_ids);
    }
    totals.summary()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u32]) -> Vec<ConceptId> {
        v.iter().map(|&i| ConceptId(i)).collect()
    }

    #[test]
    fn the_oracle_ranks_best_first_with_ties_to_the_lower_id() {
        let o = OracleToken::from_logits(&[0.5, 2.0, -1.0, 2.0, 0.1]);
        assert_eq!(o.top(3), &ids(&[1, 3, 0])[..]);
        assert_eq!(o.rank(ConceptId(2)), 4);
        // p > 0.5 ⇔ logit > 0.
        assert_eq!(o.fired(), &ids(&[1, 3, 0, 4])[..]);
        assert_eq!(o.top(99).len(), 5);
    }

    #[test]
    fn a_perfect_cascade_scores_one_and_zero_displacement() {
        let logits: Vec<f32> = (0..30).map(|i| 3.0 - i as f32 * 0.25).collect();
        let o = OracleToken::from_logits(&logits);
        let mut t = FidelityTotals::default();
        let all: Vec<ConceptId> = ids(&(0..30).collect::<Vec<_>>());
        t.add(&o, o.top(10), &all);
        let f = t.summary();
        assert_eq!((f.recall_top10, f.recall_fired, f.rank_displacement), (1.0, Some(1.0), 0.0));
        assert_eq!(f.fired_per_token, 12.0); // logits 3.0 down to 0.25 are > 0
    }

    #[test]
    fn misses_lower_recall_and_shift_ranks() {
        // Oracle order: 0, 1, 2, 3, 4 … (descending logits); 0..=3 fire.
        let o = OracleToken::from_logits(&[4.0, 3.0, 2.0, 1.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0]);
        let mut t = FidelityTotals::default();
        // The cascade missed 1 and 2: it reported 0, 3, 4 (and scored 0, 3, 4, 5).
        t.add(&o, &ids(&[0, 3, 4]), &ids(&[0, 3, 4, 5]));
        let f = t.summary();
        assert_eq!(f.recall_top10, 3.0 / 10.0);
        assert_eq!(f.recall_top10_scored, 4.0 / 10.0);
        assert_eq!(f.recall_fired, Some(2.0 / 4.0));
        // |0−0| + |3−1| + |4−2| over 3 entries.
        assert!((f.rank_displacement - 4.0 / 3.0).abs() < 1e-12);
        // A second token where nothing fires adds slots but no fired concepts.
        let cold = OracleToken::from_logits(&[-1.0; 12]);
        t.add(&cold, &ids(&[0]), &ids(&[0]));
        let f = t.summary();
        assert_eq!(f.recall_fired, Some(0.5));
        assert_eq!(f.recall_top10, 4.0 / 20.0);
        assert_eq!(FidelityTotals::default().summary().recall_fired, None);
    }

    #[test]
    fn overlap_is_the_share_of_the_first_list_found_in_the_second() {
        assert_eq!(overlap(&ids(&[1, 2, 3, 4]), &ids(&[4, 2, 9])), 0.5);
        assert_eq!(overlap(&[], &ids(&[1])), 1.0);
    }
}
