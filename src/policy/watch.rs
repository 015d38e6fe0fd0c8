//! Watch profiles, compiled against a pack, and the alerts they raise on a token.
//!
//! Why here: an alert is a decision over a token's scores, like the report, so it is a pure
//! function every engine shares. It reads *everything scored* this token (pruned probes and
//! decomposed parents included), never the report, so raising an alert cannot depend on
//! `report_top_k`.

use super::{rank, Scored};
use crate::config::{ConfigError, WatchProfile};
use crate::pack::{ConceptId, Hierarchy};

/// The alert threshold of a profile that sets none, on a pack of raw probes: the probe's
/// probability, as headspace uses on uncalibrated packs.
pub const RAW_ALERT_THRESHOLD: f32 = 0.5;
/// The same on a calibrated pack: the lens exceeds 99% of its background, as in headspace.
pub const CALIBRATED_ALERT_THRESHOLD: f32 = 0.99;

/// The alert threshold of a profile that sets none, for `pack`.
pub fn default_alert_threshold(pack: &crate::pack::Pack) -> f32 {
    if pack.calibrated() {
        CALIBRATED_ALERT_THRESHOLD
    } else {
        RAW_ALERT_THRESHOLD
    }
}

/// Marks a concept no watched concept covers.
const UNWATCHED: u32 = u32::MAX;

/// One profile, ready to test a concept in O(1).
#[derive(Debug, Clone)]
struct Compiled {
    name: String,
    threshold: f32,
    /// Per concept: the watched concept that covers it (itself, or its nearest watched
    /// ancestor), or `UNWATCHED`.
    covered_by: Vec<u32>,
}

/// A cascade's watch profiles, compiled against its pack.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    profiles: Vec<Compiled>,
}

/// One alert on a token, before names are attached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlertHit {
    /// Index of the profile in the config's list.
    pub profile: usize,
    pub scored: Scored,
    /// The watched concept whose subtree holds `scored.id`.
    pub watched: ConceptId,
}

impl Watch {
    /// Compiles `profiles` against `hierarchy`. A name no concept has is an error naming the
    /// profile and the name (`cascade.watch`), as is a profile file that cannot be read.
    ///
    /// Coverage: a concept is covered by the watched concepts at or above it along any parent
    /// link. Its *watched* concept is the nearest (fewest links up), ties to the lower id.
    /// A profile without a threshold takes `default_threshold` ([`default_alert_threshold`]).
    pub fn compile(
        hierarchy: &Hierarchy,
        profiles: &[WatchProfile],
        default_threshold: f32,
    ) -> Result<Self, ConfigError> {
        let mut out = Vec::with_capacity(profiles.len());
        for p in profiles {
            let mut roots: Vec<u32> = Vec::new();
            for name in p.all_concepts()? {
                let before = roots.len();
                roots.extend(hierarchy.named(&name).map(|c| c.0));
                if roots.len() == before {
                    return Err(ConfigError::AgainstPack {
                        key: "cascade.watch",
                        message: format!(
                            "cascade.watch: profile {:?} watches {name:?}, which is no concept of the pack",
                            p.name
                        ),
                    });
                }
            }
            roots.sort_unstable();
            roots.dedup();
            out.push(Compiled {
                name: p.name.clone(),
                threshold: p.threshold.unwrap_or(default_threshold),
                covered_by: cover(hierarchy, &roots),
            });
        }
        Ok(Self { profiles: out })
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// The name of profile `profile` (an `AlertHit::profile`), in config order.
    pub fn name(&self, profile: usize) -> &str {
        &self.profiles[profile].name
    }

    /// Every alert of a token: each profile's covered concepts among `scored` whose
    /// probability is at or above its threshold. Profiles in config order; within one, best
    /// score first (ties by id).
    pub fn alerts(&self, scored: &[Scored]) -> Vec<AlertHit> {
        let mut out = Vec::new();
        for (i, p) in self.profiles.iter().enumerate() {
            let start = out.len();
            for s in scored {
                let by = p.covered_by.get(s.id.index()).copied().unwrap_or(UNWATCHED);
                if by != UNWATCHED && s.prob >= p.threshold {
                    out.push(AlertHit { profile: i, scored: *s, watched: ConceptId(by) });
                }
            }
            out[start..].sort_by(|a, b| rank(&a.scored, &b.scored));
        }
        out
    }
}

/// Breadth-first from the watched concepts down every child link: each concept is claimed by
/// the first (nearest) watched concept to reach it; roots are visited by ascending id, so
/// equal distances go to the lower id.
fn cover(hierarchy: &Hierarchy, roots: &[u32]) -> Vec<u32> {
    let mut by = vec![UNWATCHED; hierarchy.len()];
    let mut frontier: Vec<u32> = Vec::new();
    for &r in roots {
        by[r as usize] = r;
        frontier.push(r);
    }
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for &c in &frontier {
            for &child in hierarchy.children(ConceptId(c)) {
                if by[child as usize] == UNWATCHED {
                    by[child as usize] = by[c as usize];
                    next.push(child);
                }
            }
        }
        frontier = next;
    }
    by
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{hierarchy, s};
    use super::*;

    fn profile(name: &str, concepts: &[&str], threshold: Option<f32>) -> WatchProfile {
        WatchProfile {
            name: name.into(),
            concepts: concepts.iter().map(|c| c.to_string()).collect(),
            file: None,
            threshold,
        }
    }

    // The fixture: A, B at layer 0; A1, A2 under A; B1 under B; A1x under A1; X under A1 and B1.

    #[test]
    fn watching_a_concept_watches_its_whole_subtree_through_any_parent() {
        let h = hierarchy();
        let w = Watch::compile(&h, &[profile("b", &["B"], None)], RAW_ALERT_THRESHOLD).unwrap();
        // X's parents are A1 and B1: it is under B through B1.
        let scored = [s(0, 5.0), s(1, 0.0), s(4, 1.0), s(6, 2.0), s(5, 3.0)];
        let hits = w.alerts(&scored);
        let ids: Vec<u32> = hits.iter().map(|a| a.scored.id.0).collect();
        assert_eq!(ids, vec![6, 4, 1], "X, B1, B (p = 0.5 is at the threshold); A and A1x are not under B");
        assert!(hits.iter().all(|a| a.watched == ConceptId(1)));
    }

    #[test]
    fn the_watched_concept_is_the_nearest_and_thresholds_are_per_profile() {
        let h = hierarchy();
        let w = Watch::compile(
            &h,
            &[profile("wide", &["A", "A1"], Some(0.9)), profile("all", &["B"], Some(0.0))],
            RAW_ALERT_THRESHOLD,
        )
        .unwrap();
        let scored = [s(5, 3.0), s(2, 1.0), s(6, -4.0)];
        let hits = w.alerts(&scored);
        // Profile 0: A1x (p = 0.95) under A1, the nearer; A1 itself has p = 0.73 < 0.9.
        assert_eq!(hits[0], AlertHit { profile: 0, scored: s(5, 3.0), watched: ConceptId(2) });
        // Profile 1 alerts at any score, on X only (under B through B1).
        assert_eq!(hits[1..], [AlertHit { profile: 1, scored: s(6, -4.0), watched: ConceptId(1) }]);
        assert_eq!([w.name(0), w.name(1)], ["wide", "all"]);
    }

    #[test]
    fn an_unknown_concept_is_an_error_naming_the_profile_and_the_name() {
        let e = Watch::compile(&hierarchy(), &[profile("risk", &["A", "Deception"], None)], RAW_ALERT_THRESHOLD)
            .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("cascade.watch") && m.contains("\"risk\"") && m.contains("\"Deception\""), "{m}");
    }

    #[test]
    fn a_profile_file_in_headspace_format_adds_its_concepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.txt");
        std::fs::write(&path, "# a comment\n\n  B1  \nA1x\n").unwrap();
        let mut p = profile("f", &[], Some(0.0));
        p.file = Some(path.clone());
        let w = Watch::compile(&hierarchy(), &[p.clone()], RAW_ALERT_THRESHOLD).unwrap();
        let ids: Vec<u32> = w.alerts(&[s(4, 0.0), s(5, 0.0), s(2, 0.0)]).iter().map(|a| a.scored.id.0).collect();
        assert_eq!(ids, vec![4, 5]);
        p.file = Some(dir.path().join("missing.txt"));
        let m = Watch::compile(&hierarchy(), &[p], RAW_ALERT_THRESHOLD).unwrap_err().to_string();
        assert!(m.contains("missing.txt"), "{m}");
    }
}
