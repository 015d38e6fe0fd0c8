//! Step 4: the concepts reported for the token.

use super::{rank, ConceptSet, Scored};

/// The `top_k` best of everything scored this token (pruned probes included), best first;
/// with `hide`, parents decomposed this token are left out.
pub fn report(scored: &[Scored], top_k: usize, hide: Option<&ConceptSet>) -> Vec<Scored> {
    let mut out: Vec<Scored> = scored.iter().copied().filter(|s| !hide.is_some_and(|h| h.contains(s.id))).collect();
    out.sort_by(rank);
    out.truncate(top_k);
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::s;
    use super::*;
    use crate::pack::ConceptId;

    #[test]
    fn best_first_ties_by_id_and_hiding() {
        let scored = [s(4, 1.0), s(2, 1.0), s(0, 3.0), s(1, -1.0)];
        let top: Vec<u32> = report(&scored, 3, None).iter().map(|x| x.id.0).collect();
        assert_eq!(top, vec![0, 2, 4]);
        let mut hide = ConceptSet::with_capacity(5);
        hide.insert(ConceptId(0));
        let top: Vec<u32> = report(&scored, 3, Some(&hide)).iter().map(|x| x.id.0).collect();
        assert_eq!(top, vec![2, 4, 1]);
    }
}
