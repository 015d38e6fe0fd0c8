//! Step 3: which active probes to deactivate after the token is scored.

use super::{rank, Scored};
use crate::config::Pruning;
use crate::pack::ConceptId;

/// Returns the probes to deactivate, in ascending id order. `active` holds every active probe
/// with its score on this token; `is_base` says which are always on; `skipped_by_cap` is how
/// many children this token's expansion could not activate because of `max_loaded`.
pub fn prune(
    policy: &Pruning,
    active: &[Scored],
    is_base: impl Fn(ConceptId) -> bool,
    max_loaded: usize,
    skipped_by_cap: usize,
) -> Vec<ConceptId> {
    let mut others: Vec<Scored> = active.iter().copied().filter(|s| !is_base(s.id)).collect();
    let base_count = active.len() - others.len();
    let mut dropped: Vec<ConceptId> = match *policy {
        Pruning::TopK { keep_top_k } => {
            if active.len() <= keep_top_k {
                return Vec::new();
            }
            others.sort_by(rank);
            others.into_iter().skip(keep_top_k.saturating_sub(base_count)).map(|s| s.id).collect()
        }
        Pruning::GlobalTopK { keep } => {
            let mut all = active.to_vec();
            all.sort_by(rank);
            all.into_iter().skip(keep).map(|s| s.id).filter(|&id| !is_base(id)).collect()
        }
        Pruning::Cold { unload_threshold } => {
            // The cap keeps the active set itself at max_loaded, so "over" counts the demand:
            // active probes plus the children the cap turned away (the seed loaded those and
            // then pruned). Dropping cold probes makes room for them on the next token.
            let demand = active.len() + skipped_by_cap;
            if demand <= max_loaded {
                return Vec::new();
            }
            let mut cold: Vec<Scored> = others.into_iter().filter(|s| s.prob < unload_threshold).collect();
            cold.sort_by(|a, b| rank(b, a));
            cold.into_iter().take(demand - max_loaded).map(|s| s.id).collect()
        }
        Pruning::None => Vec::new(),
    };
    dropped.sort_unstable();
    dropped
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{ids, s};
    use super::*;

    fn base(id: ConceptId) -> bool {
        id.0 < 2
    }

    #[test]
    fn top_k_keeps_base_plus_the_best_others() {
        let active = [s(0, -9.0), s(1, -9.0), s(2, 1.0), s(3, 3.0), s(4, 2.0), s(5, 2.0)];
        let top_k = |k| Pruning::TopK { keep_top_k: k };
        // keep_top_k counts the base: 4 − 2 base = 2 others: 3 (3.0) and 4 (2.0, beats 5 on id).
        assert_eq!(ids(&prune(&top_k(4), &active, base, 500, 0)), vec![2, 5]);
        // Not over the limit: nothing happens.
        assert!(prune(&top_k(6), &active, base, 500, 0).is_empty());
        // A limit below the base count keeps only the base.
        assert_eq!(ids(&prune(&top_k(1), &active, base, 500, 0)), vec![2, 3, 4, 5]);
    }

    #[test]
    fn global_top_k_keeps_base_plus_the_best_of_all() {
        let active = [s(0, 5.0), s(1, -9.0), s(2, 1.0), s(3, 3.0), s(4, 2.0)];
        // The best 2 overall are 0 (base) and 3: keep base {0,1} + 3.
        assert_eq!(ids(&prune(&Pruning::GlobalTopK { keep: 2 }, &active, base, 500, 0)), vec![2, 4]);
        // Applies even when the set is small.
        assert_eq!(ids(&prune(&Pruning::GlobalTopK { keep: 0 }, &active, base, 500, 0)), vec![2, 3, 4]);
    }

    #[test]
    fn cold_acts_only_over_max_loaded_lowest_first() {
        // p: 2 → 0.12, 3 → 0.05, 4 → 0.73, 5 → 0.12; threshold 0.2.
        let active = [s(0, 0.0), s(1, 0.0), s(2, -2.0), s(3, -3.0), s(4, 1.0), s(5, -2.0)];
        let cold = |t: f32| Pruning::Cold { unload_threshold: t };
        // At the cap with nothing turned away: nothing happens.
        assert!(prune(&cold(0.2), &active, base, 6, 0).is_empty());
        // Two children turned away by the cap: drop the two coldest (3, then 5 before 2 on id).
        assert_eq!(ids(&prune(&cold(0.2), &active, base, 6, 2)), vec![3, 5]);
        // Over the cap by the set itself (a smaller cap): same rule.
        assert_eq!(ids(&prune(&cold(0.2), &active, base, 5, 0)), vec![3]);
        // Warm probes are never dropped even if demand stays over.
        assert!(prune(&cold(0.01), &active, base, 2, 0).is_empty());
    }

    #[test]
    fn none_keeps_everything() {
        let active = [s(0, 0.0), s(2, -2.0)];
        assert!(prune(&Pruning::None, &active, base, 1, 5).is_empty());
    }
}
