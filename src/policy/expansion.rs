//! Step 2: which children to activate.

use super::{rank, ConceptSet, Scored};
use crate::pack::{ConceptId, Hierarchy};

/// What one expansion round asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpansionPlan {
    /// Parents expanded this round, best first.
    pub decomposed: Vec<ConceptId>,
    /// Distinct inactive children the round wants (before the cap).
    pub requested: usize,
    /// Children to activate and score, children of higher-scoring parents first.
    pub activate: Vec<ConceptId>,
    /// Children left out because the active set would pass max_loaded.
    pub skipped_by_cap: usize,
}

/// The seed's expansion: every probe scored with p > load_threshold (strictly) activates its
/// inactive children. `room` is how many more probes the active set can take.
pub fn threshold_expansion(
    h: &Hierarchy,
    scored: &[Scored],
    active: &ConceptSet,
    load_threshold: f32,
    room: usize,
) -> ExpansionPlan {
    let mut parents: Vec<Scored> = scored.iter().copied().filter(|s| s.prob > load_threshold).collect();
    parents.sort_by(rank);
    let parents: Vec<ConceptId> = parents.into_iter().map(|s| s.id).filter(|&id| !h.children(id).is_empty()).collect();
    plan_children(h, parents, active, room)
}

/// One round of the decompose variant: the `top_k` best concepts scored this token that are
/// not yet decomposed; those with children are decomposed. `None` when none of them has
/// children (or nothing is left): the rounds stop.
pub fn decompose_round(
    h: &Hierarchy,
    scored: &[Scored],
    decomposed: &ConceptSet,
    active: &ConceptSet,
    top_k: usize,
    room: usize,
) -> Option<ExpansionPlan> {
    let mut candidates: Vec<Scored> = scored.iter().copied().filter(|s| !decomposed.contains(s.id)).collect();
    candidates.sort_by(rank);
    candidates.truncate(top_k);
    let parents: Vec<ConceptId> =
        candidates.into_iter().map(|s| s.id).filter(|&id| !h.children(id).is_empty()).collect();
    if parents.is_empty() {
        return None;
    }
    Some(plan_children(h, parents, active, room))
}

/// The exhaustive mode: every inactive concept of the pack, in id order (no parent is
/// decomposed, so none is hidden from the report).
pub fn exhaustive_expansion(h: &Hierarchy, active: &ConceptSet, room: usize) -> ExpansionPlan {
    let mut wanted: Vec<ConceptId> = (0..h.len() as u32).map(ConceptId).filter(|&c| !active.contains(c)).collect();
    let requested = wanted.len();
    wanted.truncate(room);
    ExpansionPlan { decomposed: Vec::new(), requested, skipped_by_cap: requested - wanted.len(), activate: wanted }
}

fn plan_children(h: &Hierarchy, parents: Vec<ConceptId>, active: &ConceptSet, room: usize) -> ExpansionPlan {
    let mut seen = ConceptSet::with_capacity(h.len());
    let mut wanted = Vec::new();
    for &p in &parents {
        for &c in h.children(p) {
            let c = ConceptId(c);
            if !active.contains(c) && seen.insert(c) {
                wanted.push(c);
            }
        }
    }
    let requested = wanted.len();
    wanted.truncate(room);
    ExpansionPlan { decomposed: parents, requested, skipped_by_cap: requested - wanted.len(), activate: wanted }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{hierarchy, ids, s};
    use super::*;

    fn active(list: &[u32]) -> ConceptSet {
        let mut set = ConceptSet::with_capacity(7);
        list.iter().for_each(|&i| {
            set.insert(ConceptId(i));
        });
        set
    }

    // p > 0.3 ⇔ logit > ln(0.3/0.7) ≈ −0.847.
    #[test]
    fn threshold_fires_strictly_above_and_dedups() {
        let h = hierarchy();
        // A fires (p≈0.73), B does not (p≈0.12).
        let plan = threshold_expansion(&h, &[s(0, 1.0), s(1, -2.0)], &active(&[0, 1]), 0.3, 100);
        assert_eq!(ids(&plan.activate), vec![2, 3]);
        assert_eq!(plan.requested, 2);
        assert_eq!(ids(&plan.decomposed), vec![0]);
        // Exactly at the threshold does not fire.
        let at = (0.3f32 / 0.7).ln();
        let plan = threshold_expansion(&h, &[s(0, at)], &active(&[0, 1]), super::super::sigmoid(at), 100);
        assert!(plan.activate.is_empty());
        // X has two firing parents (A1, B1) but is requested once; active children are skipped.
        let plan = threshold_expansion(&h, &[s(2, 3.0), s(4, 2.0)], &active(&[0, 1, 2, 4, 5]), 0.3, 100);
        assert_eq!(ids(&plan.activate), vec![6]);
        assert_eq!(plan.requested, 1);
    }

    #[test]
    fn threshold_cap_serves_the_best_parents_first() {
        let h = hierarchy();
        // B1 outscores A1: B1's child X comes first, then A1's A1x; room for one.
        let plan = threshold_expansion(&h, &[s(2, 1.0), s(4, 2.0)], &active(&[0, 1, 2, 4]), 0.3, 1);
        assert_eq!(ids(&plan.activate), vec![6]);
        assert_eq!(plan.requested, 2);
        assert_eq!(plan.skipped_by_cap, 1);
        // Ties between parents go to the lower id: A1 (2) before B1 (4).
        let plan = threshold_expansion(&h, &[s(4, 1.0), s(2, 1.0)], &active(&[0, 1, 2, 4]), 0.3, 1);
        assert_eq!(ids(&plan.activate), vec![5]);
        let plan = threshold_expansion(&h, &[s(2, 1.0)], &active(&[0, 1, 2]), 0.3, 0);
        assert!(plan.activate.is_empty());
        assert_eq!(plan.skipped_by_cap, 2);
    }

    #[test]
    fn decompose_takes_the_top_k_undecomposed() {
        let h = hierarchy();
        let scored = [s(0, 0.5), s(1, 2.0)];
        let none = ConceptSet::with_capacity(7);
        // top_k = 1: only B (the best) is decomposed.
        let plan = decompose_round(&h, &scored, &none, &active(&[0, 1]), 1, 100).unwrap();
        assert_eq!(ids(&plan.decomposed), vec![1]);
        assert_eq!(ids(&plan.activate), vec![4]);
        // Once B is decomposed, the next round takes A, even with low scores (no threshold).
        let plan = decompose_round(&h, &[s(0, -5.0), s(1, 2.0)], &active(&[1]), &active(&[0, 1, 4]), 1, 100).unwrap();
        assert_eq!(ids(&plan.decomposed), vec![0]);
        assert_eq!(ids(&plan.activate), vec![2, 3]);
    }

    #[test]
    fn decompose_stops_when_the_top_k_are_leaves() {
        let h = hierarchy();
        let none = ConceptSet::with_capacity(7);
        // The best two are leaves (A2, A1x): with top_k = 2 nothing is decomposed: stop.
        let scored = [s(3, 4.0), s(5, 3.0), s(0, 1.0)];
        assert_eq!(decompose_round(&h, &scored, &none, &active(&[0, 3, 5]), 2, 100), None);
        // With top_k = 3 the parent A is among them; leaves in the top_k are not decomposed.
        let plan = decompose_round(&h, &scored, &none, &active(&[0, 3, 5]), 3, 100).unwrap();
        assert_eq!(ids(&plan.decomposed), vec![0]);
        assert_eq!(ids(&plan.activate), vec![2]);
        // Nothing left to consider: stop.
        assert_eq!(decompose_round(&h, &[], &none, &active(&[]), 3, 100), None);
    }

    #[test]
    fn exhaustive_asks_for_every_inactive_concept_within_room() {
        let h = hierarchy();
        let plan = exhaustive_expansion(&h, &active(&[0, 1, 5]), 100);
        assert_eq!(ids(&plan.activate), vec![2, 3, 4, 6]);
        assert_eq!((plan.requested, plan.skipped_by_cap), (4, 0));
        assert!(plan.decomposed.is_empty());
        let plan = exhaustive_expansion(&h, &active(&[0, 1]), 2);
        assert_eq!(ids(&plan.activate), vec![2, 3]);
        assert_eq!((plan.requested, plan.skipped_by_cap), (5, 3));
    }

    #[test]
    fn decompose_marks_parents_even_when_their_children_are_active() {
        let h = hierarchy();
        let none = ConceptSet::with_capacity(7);
        let plan = decompose_round(&h, &[s(1, 1.0)], &none, &active(&[1, 4]), 1, 100).unwrap();
        assert_eq!(ids(&plan.decomposed), vec![1]);
        assert!(plan.activate.is_empty());
        assert_eq!(plan.requested, 0);
    }
}
