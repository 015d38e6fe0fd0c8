//! One token's cascade as a pure state machine: the drivers (the synchronous engines and the
//! actor runtime) feed it scores and carry out the loads it asks for; every decision is here.

use super::{prune, rank, report, ConceptSet, Scored};
use crate::config::{CascadeConfig, Expansion};
use crate::pack::{ConceptId, Hierarchy};

pub struct TokenCascade<'a> {
    hierarchy: &'a Hierarchy,
    config: &'a CascadeConfig,
    scored: Vec<Scored>,
    decomposed: ConceptSet,
    rounds_left: usize,
    /// Distinct inactive children asked for, all rounds.
    pub children: usize,
    /// Children left out by max_loaded.
    pub skipped_by_cap: usize,
}

impl<'a> TokenCascade<'a> {
    /// Starts a token from the scores of the active set (step 1).
    pub fn new(hierarchy: &'a Hierarchy, config: &'a CascadeConfig, initial: Vec<Scored>) -> Self {
        let rounds_left = match config.expansion {
            Expansion::Threshold { .. } | Expansion::Exhaustive => 1,
            Expansion::Decompose { max_depth, .. } => max_depth,
        };
        Self {
            hierarchy,
            config,
            scored: initial,
            decomposed: ConceptSet::with_capacity(hierarchy.len()),
            rounds_left,
            children: 0,
            skipped_by_cap: 0,
        }
    }

    /// Step 2: the next children to activate and score, or `None` when expansion is over.
    /// `active` must hold everything activated so far this token.
    pub fn next_expansion(&mut self, active: &ConceptSet) -> Option<Vec<ConceptId>> {
        while self.rounds_left > 0 {
            self.rounds_left -= 1;
            let room = self.config.max_loaded.saturating_sub(active.len());
            let plan = match self.config.expansion {
                Expansion::Threshold { load_threshold } => {
                    Some(super::threshold_expansion(self.hierarchy, &self.scored, active, load_threshold, room))
                }
                Expansion::Decompose { top_k, .. } => {
                    super::decompose_round(self.hierarchy, &self.scored, &self.decomposed, active, top_k, room)
                }
                Expansion::Exhaustive => Some(super::exhaustive_expansion(self.hierarchy, active, room)),
            };
            let Some(plan) = plan else {
                self.rounds_left = 0;
                return None;
            };
            plan.decomposed.iter().for_each(|&p| {
                self.decomposed.insert(p);
            });
            self.children += plan.requested;
            self.skipped_by_cap += plan.skipped_by_cap;
            if !plan.activate.is_empty() {
                return Some(plan.activate);
            }
        }
        None
    }

    pub fn add_scores(&mut self, scored: &[Scored]) {
        self.scored.extend_from_slice(scored);
    }

    /// Everything scored this token.
    pub fn scored(&self) -> &[Scored] {
        &self.scored
    }

    /// Step 3: probes to deactivate. Every active probe has been scored by now.
    pub fn prune(&self, is_base: impl Fn(ConceptId) -> bool) -> Vec<ConceptId> {
        prune(&self.config.pruning, &self.scored, is_base, self.config.max_loaded, self.skipped_by_cap)
    }

    /// Step 4: the report, best first, from `shown`: this token's scores as reported
    /// ([`super::lens::reported`] of [`Self::scored`]).
    pub fn report(&self, shown: &[Scored]) -> Vec<Scored> {
        debug_assert_eq!(shown.len(), self.scored.len());
        let hide = self.config.hide_decomposed_parents.then_some(&self.decomposed);
        report(shown, self.config.report_top_k, hide)
    }

    /// Children worth reading ahead: those of parents that scored just under the load threshold
    /// (within `margin` in probability), best parents first, excluding `skip` (already resident).
    pub fn near_misses(&self, margin: f32, skip: impl Fn(ConceptId) -> bool) -> Vec<ConceptId> {
        let Expansion::Threshold { load_threshold } = self.config.expansion else { return Vec::new() };
        let mut parents: Vec<Scored> = self
            .scored
            .iter()
            .copied()
            .filter(|s| s.prob <= load_threshold && s.prob > load_threshold - margin)
            .collect();
        parents.sort_by(rank);
        let mut seen = ConceptSet::with_capacity(self.hierarchy.len());
        let mut out = Vec::new();
        for p in parents {
            for &c in self.hierarchy.children(p.id) {
                let c = ConceptId(c);
                if !skip(c) && seen.insert(c) {
                    out.push(c);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{hierarchy, ids, s};
    use super::*;
    use crate::config::Pruning;

    #[test]
    fn a_decompose_token_runs_round_by_round() {
        let h = hierarchy();
        let config = CascadeConfig {
            expansion: Expansion::Decompose { top_k: 2, max_depth: 2 },
            pruning: Pruning::GlobalTopK { keep: 2 },
            ..CascadeConfig::default()
        };
        let mut active = ConceptSet::with_capacity(7);
        active.insert(ConceptId(0));
        active.insert(ConceptId(1));
        let mut t = TokenCascade::new(&h, &config, vec![s(0, 1.0), s(1, -1.0)]);
        let first = t.next_expansion(&active).unwrap();
        assert_eq!(ids(&first), vec![2, 3, 4]);
        first.iter().for_each(|&c| {
            active.insert(c);
        });
        t.add_scores(&[s(2, 0.0), s(3, -1.0), s(4, -1.0)]);
        let second = t.next_expansion(&active).unwrap();
        assert_eq!(ids(&second), vec![5, 6]);
        second.iter().for_each(|&c| {
            active.insert(c);
        });
        t.add_scores(&[s(5, -2.0), s(6, -1.0)]);
        assert_eq!(t.next_expansion(&active), None, "max_depth reached");
        assert_eq!(t.children, 5);
        assert_eq!(ids(&t.prune(|c| c.0 < 2)), vec![3, 4, 5, 6]);
    }

    #[test]
    fn near_misses_are_children_of_parents_just_under_the_threshold() {
        let h = hierarchy();
        let config = CascadeConfig::default(); // threshold 0.3
                                               // A: p = 0.27 (just under), B: p = 0.05 (far under).
        let t = TokenCascade::new(&h, &config, vec![s(0, -1.0), s(1, -3.0)]);
        assert_eq!(ids(&t.near_misses(0.1, |_| false)), vec![2, 3]);
        assert_eq!(ids(&t.near_misses(0.1, |c| c.0 == 2)), vec![3]);
        assert!(t.near_misses(0.01, |_| false).is_empty());
    }
}
