//! The cascade's decisions as pure functions over plain data: which children to load, which
//! probes to drop, what to report. No I/O, no tensors; see docs/cascade-semantics.md.

mod expansion;
pub mod lens;
mod pruning;
mod report;
pub mod simplex;
mod token;
mod watch;

use std::cmp::Ordering;

pub use expansion::{decompose_round, exhaustive_expansion, threshold_expansion, ExpansionPlan};
pub use pruning::prune;
pub use report::report;
pub use token::TokenCascade;
pub use watch::{default_alert_threshold, AlertHit, Watch, CALIBRATED_ALERT_THRESHOLD, RAW_ALERT_THRESHOLD};

use crate::config::{CascadeConfig, ConfigError};
use crate::pack::{ConceptId, DenseId, Hierarchy, Pack, ProbeId};

/// One concept's (lens's) score on the current token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub id: ConceptId,
    /// The lens score ([`lens::combine`]): what thresholds compare and reports show. For a
    /// concept of one uncalibrated probe, `sigmoid(logit)`.
    pub prob: f32,
    /// The largest logit among the lens's probes (its one probe's, in a v1 pack).
    pub logit: f32,
}

impl Scored {
    /// A concept of one uncalibrated probe (every concept of a v1 pack).
    pub fn raw(id: ConceptId, logit: f32) -> Self {
        Scored { id, prob: sigmoid(logit), logit }
    }
}

/// The one sigmoid every engine uses, so that threshold decisions agree bit for bit.
pub fn sigmoid(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit).exp())
}

/// Best first: higher score, then higher logit, then ascending concept id. For concepts of one
/// uncalibrated probe the score is a monotone function of the logit, so this is the order of
/// logits, which do not saturate to equal values at 1.0 as probabilities do.
pub fn rank(a: &Scored, b: &Scored) -> Ordering {
    b.prob.total_cmp(&a.prob).then(b.logit.total_cmp(&a.logit)).then(a.id.cmp(&b.id))
}

/// The ids of a token's scores, ascending, and their logits and scores in the same order.
pub fn scored_by_id(scored: &[Scored]) -> (Vec<ConceptId>, Vec<f32>, Vec<f32>) {
    let mut v = scored.to_vec();
    v.sort_unstable_by_key(|s| s.id);
    let ids = v.iter().map(|s| s.id).collect();
    let logits = v.iter().map(|s| s.logit).collect();
    (ids, logits, v.into_iter().map(|s| s.prob).collect())
}

/// The probes loaded for a stream's whole life: the base lenses' (`base`, from [`base_set`]),
/// then every simplex pole's. The one list every engine pins.
pub fn pinned_probes<'a>(pack: &'a Pack, base: &'a ConceptSet) -> impl Iterator<Item = ProbeId> + 'a {
    base.iter().flat_map(|c| pack.probes_of(c)).chain(pack.pole_probes())
}

/// The always-active probes: every concept of `config.base_layers`. Errors (naming the config
/// key) when the layers select nothing or hold more probes than `max_loaded`.
pub fn base_set(hierarchy: &Hierarchy, config: &CascadeConfig) -> Result<ConceptSet, ConfigError> {
    let bad = |key, message| Err(ConfigError::AgainstPack { key, message });
    let mut base = ConceptSet::with_capacity(hierarchy.len());
    for &layer in &config.base_layers {
        hierarchy.layer_members(layer).iter().for_each(|&c| {
            base.insert(ConceptId(c));
        });
    }
    if base.is_empty() {
        let layers = hierarchy.layer_count();
        return bad(
            "cascade.base_layers",
            format!("cascade.base_layers = {:?} selects no concept of the pack ({layers} layers)", config.base_layers),
        );
    }
    if config.expansion == crate::config::Expansion::Exhaustive && config.max_loaded < hierarchy.len() {
        return bad(
            "cascade.max_loaded",
            format!(
                "cascade.expansion = \"exhaustive\" scores all {} probes of the pack, but cascade.max_loaded = {} \
                 caps the active set below that",
                hierarchy.len(),
                config.max_loaded
            ),
        );
    }
    if base.len() > config.max_loaded {
        return bad(
            "cascade.max_loaded",
            format!(
                "cascade.max_loaded = {} is smaller than the base layers' {} probes",
                config.max_loaded,
                base.len()
            ),
        );
    }
    Ok(base)
}

/// A set of dense ids (concepts or probes) as a bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdSet<I> {
    bits: Vec<u64>,
    len: usize,
    _id: std::marker::PhantomData<I>,
}

/// A set of concept ids.
pub type ConceptSet = IdSet<ConceptId>;
/// A set of probe ids.
pub type ProbeSet = IdSet<ProbeId>;

impl<I> Default for IdSet<I> {
    fn default() -> Self {
        Self { bits: Vec::new(), len: 0, _id: std::marker::PhantomData }
    }
}

impl<I: DenseId> IdSet<I> {
    pub fn with_capacity(ids: usize) -> Self {
        Self { bits: vec![0; ids.div_ceil(64)], len: 0, _id: std::marker::PhantomData }
    }
    pub fn contains(&self, id: I) -> bool {
        self.bits.get(id.index() / 64).is_some_and(|w| w & (1 << (id.index() % 64)) != 0)
    }
    /// Returns whether the id was newly added.
    pub fn insert(&mut self, id: I) -> bool {
        let (w, b) = (id.index() / 64, id.index() % 64);
        if w >= self.bits.len() {
            self.bits.resize(w + 1, 0);
        }
        let fresh = self.bits[w] & (1 << b) == 0;
        self.bits[w] |= 1 << b;
        self.len += fresh as usize;
        fresh
    }
    pub fn remove(&mut self, id: I) -> bool {
        let (w, b) = (id.index() / 64, id.index() % 64);
        let present = self.contains(id);
        if present {
            self.bits[w] &= !(1 << b);
            self.len -= 1;
        }
        present
    }
    pub fn len(&self) -> usize {
        self.len
    }
    /// Members of either set.
    pub fn union(&self, other: &Self) -> Self {
        let n = self.bits.len().max(other.bits.len());
        let word = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
        let bits: Vec<u64> = (0..n).map(|i| word(&self.bits, i) | word(&other.bits, i)).collect();
        let len = bits.iter().map(|w| w.count_ones() as usize).sum();
        Self { bits, len, _id: std::marker::PhantomData }
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn clear(&mut self) {
        self.bits.iter_mut().for_each(|w| *w = 0);
        self.len = 0;
    }
    /// Ids in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = I> + '_ {
        self.bits.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64).filter(move |b| bits & (1 << b) != 0).map(move |b| I::from_index(w * 64 + b))
        })
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use crate::pack::{ConceptDef, ConceptId, Hierarchy};

    use super::Scored;

    /// ```text
    /// layer 0:  A(0)            B(1)
    /// layer 1:  A1(2)  A2(3)    B1(4)
    /// layer 2:  A1x(5)  X(6) [parents A1 and B1]
    /// ```
    pub fn hierarchy() -> Hierarchy {
        let d = |name: &str, layer: u16, parents: &[u32]| ConceptDef {
            name: name.into(),
            layer,
            parents: parents.to_vec(),
        };
        Hierarchy::from_defs(&[
            d("A", 0, &[]),
            d("B", 0, &[]),
            d("A1", 1, &[0]),
            d("A2", 1, &[0]),
            d("B1", 1, &[1]),
            d("A1x", 2, &[2]),
            d("X", 2, &[2, 4]),
        ])
        .unwrap()
    }

    pub fn s(id: u32, logit: f32) -> Scored {
        Scored::raw(ConceptId(id), logit)
    }

    pub fn ids(v: &[ConceptId]) -> Vec<u32> {
        v.iter().map(|c| c.0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::s;
    use super::*;

    #[test]
    fn rank_orders_by_score_then_id() {
        let mut v = [s(3, 1.0), s(1, 2.0), s(2, 1.0), s(0, -1.0)];
        v.sort_by(rank);
        assert_eq!(v.iter().map(|x| x.id.0).collect::<Vec<_>>(), vec![1, 2, 3, 0]);
    }

    #[test]
    fn sigmoid_is_symmetric_and_bounded() {
        assert_eq!(sigmoid(0.0), 0.5);
        assert!((sigmoid(2.0) + sigmoid(-2.0) - 1.0).abs() < 1e-6);
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
    }

    #[test]
    fn concept_set_tracks_membership() {
        let mut set = ConceptSet::with_capacity(10);
        assert!(set.insert(ConceptId(3)));
        assert!(!set.insert(ConceptId(3)));
        assert!(set.insert(ConceptId(130)));
        assert_eq!(set.len(), 2);
        assert_eq!(set.iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 130]);
        assert!(set.remove(ConceptId(3)));
        assert!(!set.remove(ConceptId(3)));
        assert_eq!(set.len(), 1);
    }
}
