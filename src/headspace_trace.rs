//! headspace's JSON trace format, written from our reports, so that headspace's viewer opens
//! our runs (docs/headspace.md).
//!
//! Why here, once: `run --trace-json` and Python's `probe_cascade.trace` write the same
//! document from the same reports; one writer keeps them from drifting apart.
//!
//! The document, as headspace's `trace.record` makes it: `{created, model, pack, total_lenses,
//! calibrated, fields, concepts, runs}`. `fields` are the pack's top-level (layer 0) concepts,
//! by name; each token carries its text `t`, `ms`, `loaded`, the score of every field (0 when
//! it was not scored) and its `top` detections as `[concept, score, {model_layer: score}]`.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::pack::{ConceptId, Pack};
use crate::policy::sigmoid;
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

/// The `concepts` table: by name, a label, the level, the first parent and a description.
///
/// headspace keys it by name and its viewer walks `parent` links by name up to a root. A name
/// on several layers keeps its lowest layer's entry, and a parent is kept only if it sits on a
/// lower level, so every walk ends (headspace's own packs have one concept per name; a pack
/// with repeated names could otherwise link two names to each other, and its viewer would
/// never return).
fn concepts(pack: &Pack) -> Map<String, Value> {
    let h = pack.hierarchy();
    let mut level: BTreeMap<&str, u16> = BTreeMap::new();
    for c in h.ids() {
        let l = level.entry(h.name(c)).or_insert(h.layer(c));
        *l = (*l).min(h.layer(c));
    }
    let mut by_name: BTreeMap<String, Value> = BTreeMap::new();
    for c in h.ids() {
        let (name, layer) = (h.name(c), h.layer(c));
        if level[name] != layer || by_name.contains_key(name) {
            continue;
        }
        let parent = h.parents(c).first().map(|&p| h.name(ConceptId(p))).filter(|p| level[p] < layer);
        by_name.insert(name.to_string(), json!({"label": name, "level": layer, "parent": parent, "description": ""}));
    }
    by_name.into_iter().collect()
}

/// The token's entry: fields from everything scored, the report's best `top`.
fn token(fields: &[(String, ConceptId)], t: &TraceToken, top: usize) -> Value {
    let r = t.report;
    let field_scores: Vec<f64> = fields
        .iter()
        .map(|(_, id)| match r.scored_ids.binary_search(id) {
            Ok(i) => round3(sigmoid(r.scored_logits[i]) as f64),
            Err(_) => 0.0,
        })
        .collect();
    // Single-probe lenses: no per-layer scores (headspace leaves the dict empty for those).
    let top: Vec<Value> = r.top.iter().take(top).map(|e| json!([e.name, round3(e.prob as f64), Map::new()])).collect();
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
        "calibrated": false,
        "fields": fields.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "concepts": concepts(pack),
        "runs": runs,
    })
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
