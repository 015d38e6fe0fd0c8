//! headspace's documents, written from our packs and reports: its JSON trace (so that its
//! viewer opens our runs) and its pack metadata (`GET /v1/pack`). See docs/headspace.md.
//!
//! Why here, once: `run --trace-json` and Python's `probe_cascade.trace` write the same trace,
//! and `serve`'s `/v1/pack`, its `PackInfo` call and Python's `Runtime.pack_info` the same
//! metadata; one writer each keeps the doors from drifting apart.
//!
//! The document, as headspace's `trace.record` makes it: `{created, model, pack, total_lenses,
//! calibrated, fields, concepts, runs}`. `fields` are the pack's top-level (layer 0) concepts,
//! by name; each token carries its text `t`, `ms`, `loaded`, the score of every field (0 when
//! it was not scored) and its `top` detections as `[concept, score, {model_layer: score}]`.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::config::WatchProfile;
use crate::pack::{ConceptId, Pack};
use crate::policy::default_alert_threshold;
use crate::types::TokenReport;

/// Detections per token when the caller sets none (headspace's `top`).
pub const DEFAULT_TOP: usize = 8;

/// One generated token: its text and its report.
pub struct TraceToken<'a> {
    pub text: &'a str,
    pub report: &'a TokenReport,
}

/// One prompt's generation.
pub struct TraceRun<'a> {
    pub prompt: String,
    /// Shown by viewers in place of the prompt.
    pub title: Option<String>,
    pub note: Option<String>,
    /// Seconds the generation took, where known.
    pub seconds: Option<f64>,
    pub tokens: Vec<TraceToken<'a>>,
}

/// headspace rounds every score to three decimals.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The fields: every layer-0 concept's name, sorted (headspace's `top_level`).
pub fn fields(pack: &Pack) -> Vec<(String, ConceptId)> {
    let h = pack.hierarchy();
    let mut out: Vec<(String, ConceptId)> =
        h.layer_members(0).iter().map(|&c| (h.name(ConceptId(c)).to_string(), ConceptId(c))).collect();
    out.sort();
    out
}

/// One concept of headspace's `concepts` table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConceptInfo {
    pub label: String,
    pub level: u16,
    /// The first parent's name, when it sits on a lower level (see [`concepts`]).
    pub parent: Option<String>,
    /// Our packs hold no descriptions: always empty.
    pub description: String,
}

/// The `concepts` table: by name, a label, the level, the first parent and a description.
///
/// headspace keys it by name and its viewer walks `parent` links by name up to a root. A name
/// on several layers keeps its lowest layer's entry, and a parent is kept only if it sits on a
/// lower level, so every walk ends (headspace's own packs have one concept per name; a pack
/// with repeated names could otherwise link two names to each other, and its viewer would
/// never return).
pub fn concepts(pack: &Pack) -> BTreeMap<String, ConceptInfo> {
    let h = pack.hierarchy();
    let mut level: BTreeMap<&str, u16> = BTreeMap::new();
    for c in h.ids() {
        let l = level.entry(h.name(c)).or_insert(h.layer(c));
        *l = (*l).min(h.layer(c));
    }
    let mut by_name = BTreeMap::new();
    for c in h.ids() {
        let (name, layer) = (h.name(c), h.layer(c));
        if level[name] != layer || by_name.contains_key(name) {
            continue;
        }
        let parent = h.parents(c).first().map(|&p| h.name(ConceptId(p))).filter(|p| level[p] < layer);
        let info = ConceptInfo {
            label: name.to_string(),
            level: layer,
            parent: parent.map(str::to_string),
            description: String::new(),
        };
        by_name.insert(name.to_string(), info);
    }
    by_name
}

/// The token's entry: fields from everything scored, the report's best `top`.
fn token(fields: &[(String, ConceptId)], t: &TraceToken, top: usize) -> Value {
    let r = t.report;
    let field_scores: Vec<f64> = fields
        .iter()
        .map(|(_, id)| match r.scored_ids.binary_search(id) {
            Ok(i) => round3(r.scored_probs[i] as f64),
            Err(_) => 0.0,
        })
        .collect();
    // Per model layer, each probe's score (calibrated where it is); v1 packs name no model
    // layer, and their dict stays empty as headspace's is for single-probe lenses.
    let top: Vec<Value> = r
        .top
        .iter()
        .take(top)
        .map(|e| {
            let layers: Map<String, Value> = e
                .probes
                .iter()
                .map(|p| (p.model_layer.to_string(), json!(round3(p.calibrated.unwrap_or(p.prob) as f64))))
                .collect();
            json!([e.name, round3(e.prob as f64), layers])
        })
        .collect();
    json!({
        "t": t.text,
        "ms": (r.elapsed.as_secs_f64() * 1e4).round() / 10.0,
        "loaded": r.active,
        "fields": field_scores,
        "top": top,
    })
}

/// The whole document. `created` is the current UTC time, to the second.
pub fn document(pack: &Pack, pack_name: &str, model: Option<&str>, runs: &[TraceRun], top: usize) -> Value {
    let fields = fields(pack);
    let runs: Vec<Value> = runs
        .iter()
        .map(|run| {
            let mut v = Map::new();
            v.insert("prompt".into(), json!(run.prompt));
            if let Some(t) = &run.title {
                v.insert("title".into(), json!(t));
            }
            if let Some(n) = &run.note {
                v.insert("note".into(), json!(n));
            }
            if let Some(s) = run.seconds {
                v.insert("seconds".into(), json!((s * 10.0).round() / 10.0));
            }
            v.insert("tokens".into(), run.tokens.iter().map(|t| token(&fields, t, top)).collect());
            Value::Object(v)
        })
        .collect();
    json!({
        "created": now_utc(),
        "model": model,
        "pack": pack_name,
        "total_lenses": pack.len(),
        "calibrated": pack.calibrated(),
        "fields": fields.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "concepts": concepts(pack),
        "runs": runs,
    })
}

/// A watch profile as [`PackInfo`] lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WatchInfo {
    pub name: String,
    pub threshold: f32,
}

/// What headspace's `GET /v1/pack` gives: `{model, pack, total_lenses, calibrated,
/// alert_threshold, fields, concepts}`, plus `watch`: the config's profiles (name and
/// threshold), since a cascade here may carry several.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PackInfo {
    pub model: Option<String>,
    pub pack: String,
    pub total_lenses: usize,
    pub calibrated: bool,
    /// The threshold of a profile that sets none.
    pub alert_threshold: f32,
    pub fields: Vec<String>,
    pub concepts: BTreeMap<String, ConceptInfo>,
    pub watch: Vec<WatchInfo>,
}

pub fn pack_info(pack: &Pack, model: Option<&str>, watch: &[WatchProfile]) -> PackInfo {
    PackInfo {
        model: model.map(str::to_string),
        pack: pack_name(pack),
        total_lenses: pack.len(),
        calibrated: pack.calibrated(),
        alert_threshold: default_alert_threshold(pack),
        fields: fields(pack).into_iter().map(|(n, _)| n).collect(),
        concepts: concepts(pack),
        watch: watch
            .iter()
            .map(|w| WatchInfo {
                name: w.name.clone(),
                threshold: w.threshold.unwrap_or(default_alert_threshold(pack)),
            })
            .collect(),
    }
}

/// The name headspace gives a pack: its directory's.
pub fn pack_name(pack: &Pack) -> String {
    let dir = pack.dir().canonicalize().unwrap_or_else(|_| pack.dir().to_path_buf());
    dir.file_name().map_or_else(String::new, |s| s.to_string_lossy().into_owned())
}

/// `YYYY-MM-DDTHH:MM:SS+00:00`, as Python's `isoformat(timespec="seconds")` writes UTC.
fn now_utc() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}+00:00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_round_to_three_decimals_as_headspace_writes_them() {
        assert_eq!(round3(0.12345), 0.123);
        assert_eq!(round3(0.9996), 1.0);
        let created = now_utc();
        assert_eq!(created.len(), 25, "{created}");
        assert!(created.ends_with("+00:00") && created.as_bytes()[10] == b'T', "{created}");
    }
}
