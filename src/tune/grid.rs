//! The grid: `key=v1,v2;key2=w1,w2`, config keys by their dotted paths, values as TOML values
//! (a bare word is a string). Points are every combination, except that the kinds of one
//! policy (`cascade.expansion.threshold.*`, `cascade.expansion.decompose.*`, or a kind named
//! outright as `cascade.expansion=exhaustive`) are alternatives, not factors: a point has one
//! expansion and one pruning policy.

use super::TuneError;
use crate::config::{from_json, Config};

/// More points than this is a mistake, not a sweep.
pub const MAX_POINTS: usize = 4096;

/// Tables that hold one of several policy kinds (serde's externally tagged enums).
const POLICIES: [&str; 2] = ["cascade.expansion", "cascade.pruning"];

#[derive(Debug, Clone, PartialEq)]
pub struct GridKey {
    pub key: String,
    pub values: Vec<toml::Value>,
}

/// One key's value at one point.
pub type Setting = (String, toml::Value);

fn value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

pub fn parse_grid(spec: &str) -> Result<Vec<GridKey>, TuneError> {
    let mut keys: Vec<GridKey> = Vec::new();
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, values) =
            part.split_once('=').ok_or_else(|| TuneError::Grid(format!("`{part}` is not `key=value,value,…`")))?;
        let key = key.trim().to_string();
        let bad = |message: String| TuneError::Key { key: key.clone(), message };
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(bad("is not a dotted config key like cascade.max_loaded".into()));
        }
        if keys.iter().any(|k| k.key == key) {
            return Err(bad("appears twice".into()));
        }
        let values: Vec<toml::Value> = values.split(',').map(str::trim).filter(|v| !v.is_empty()).map(value).collect();
        if values.is_empty() {
            return Err(bad("has no values".into()));
        }
        keys.push(GridKey { key, values });
    }
    if keys.is_empty() {
        return Err(TuneError::Grid("names no key (expected `key=value,value,…;key=…`)".into()));
    }
    Ok(keys)
}

/// The policy table and kind a key sets, if it sets one: `cascade.expansion.decompose.top_k`
/// → (`cascade.expansion`, `decompose`); `cascade.expansion` itself → kind `*` (its values
/// name kinds).
fn policy_of(key: &str) -> Option<(&'static str, String)> {
    POLICIES.iter().find_map(|&p| {
        if key == p {
            return Some((p, "*".to_string()));
        }
        let rest = key.strip_prefix(p)?.strip_prefix('.')?;
        Some((p, rest.split('.').next()?.to_string()))
    })
}

/// Every combination of each key's values, with a policy's kinds as alternatives. Points
/// are in the spec's order, the last key varying fastest.
pub fn points(keys: &[GridKey]) -> Result<Vec<Vec<Setting>>, TuneError> {
    // Factors: each a list of alternatives, each alternative a list of settings.
    let mut factors: Vec<(Option<&'static str>, Vec<Vec<Setting>>)> = Vec::new();
    let mut kinds: Vec<(&'static str, String, Vec<Vec<Setting>>)> = Vec::new();
    for k in keys {
        let singles = || k.values.iter().map(|v| vec![(k.key.clone(), v.clone())]).collect::<Vec<_>>();
        match policy_of(&k.key) {
            None => factors.push((None, singles())),
            Some((policy, kind)) => {
                if !factors.iter().any(|(p, _)| *p == Some(policy)) {
                    factors.push((Some(policy), Vec::new()));
                }
                match kinds.iter_mut().find(|(p, kd, _)| *p == policy && *kd == kind && kind != "*") {
                    Some((_, _, alts)) => *alts = product(alts, &singles()),
                    None => kinds.push((policy, kind, singles())),
                }
            }
        }
    }
    for (policy, _, alts) in kinds {
        let factor = factors.iter_mut().find(|(p, _)| *p == Some(policy)).expect("pushed above");
        factor.1.extend(alts);
    }
    let mut out: Vec<Vec<Setting>> = vec![Vec::new()];
    for (_, alts) in &factors {
        out = product(&out, alts);
        if out.len() > MAX_POINTS {
            return Err(TuneError::Grid(format!("has more than {MAX_POINTS} points")));
        }
    }
    Ok(out)
}

fn product(a: &[Vec<Setting>], b: &[Vec<Setting>]) -> Vec<Vec<Setting>> {
    a.iter().flat_map(|x| b.iter().map(move |y| x.iter().chain(y).cloned().collect())).collect()
}

/// `base` (a whole config document) with `settings` applied, checked: an unknown key, a
/// wrong type or an out-of-range value is an error naming the grid key.
pub fn apply(base: &toml::Table, settings: &[Setting]) -> Result<(Config, toml::Table), TuneError> {
    let mut doc = base.clone();
    for (key, value) in settings {
        set(&mut doc, key, value.clone());
    }
    let json = serde_json::to_value(&doc).map_err(|e| TuneError::Grid(e.to_string()))?;
    let config: Config = from_json(&json, "").map_err(|e| blame(settings, &e.key, e.to_string()))?;
    config.validate(std::path::Path::new("the grid point")).map_err(|e| {
        let key = match &e {
            crate::config::ConfigError::Invalid { key, .. } => key.to_string(),
            _ => String::new(),
        };
        blame(settings, &key, e.to_string())
    })?;
    Ok((config, doc))
}

/// The grid key behind an error about config key `key` (the one it is in, or that is in it);
/// all of the point's keys when none is.
fn blame(settings: &[Setting], key: &str, message: String) -> TuneError {
    let hit = settings.iter().find(|(k, _)| !key.is_empty() && (k.starts_with(key) || key.starts_with(k.as_str())));
    let key = match hit {
        Some((k, _)) => k.clone(),
        None => settings.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", "),
    };
    TuneError::Key { key, message }
}

fn set(doc: &mut toml::Table, key: &str, value: toml::Value) {
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = doc;
    let mut path = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            table.insert(part.to_string(), value);
            return;
        }
        path = if path.is_empty() { part.to_string() } else { format!("{path}.{part}") };
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        if !entry.is_table() {
            *entry = toml::Value::Table(Default::default());
        }
        let next = entry.as_table_mut().expect("made a table above");
        // Entering a policy's kind: the other kinds go (a policy table holds one).
        if POLICIES.contains(&path.as_str()) {
            next.retain(|k, _| k == parts[i + 1]);
        }
        table = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Expansion, Pruning};

    fn base() -> toml::Table {
        toml::from_str(include_str!("../../config/realtime.toml")).unwrap()
    }

    #[test]
    fn a_product_of_keys_with_typed_values() {
        let keys =
            parse_grid("cascade.expansion.threshold.load_threshold=0.1,0.3; cascade.pruning.top_k.keep_top_k=20,30,50")
                .unwrap();
        assert_eq!(keys[1].values, vec![toml::Value::Integer(20), 30.into(), 50.into()]);
        let pts = points(&keys).unwrap();
        assert_eq!(pts.len(), 6);
        let (c, _) = apply(&base(), &pts[5]).unwrap();
        assert_eq!(c.cascade.expansion, Expansion::Threshold { load_threshold: 0.3 });
        assert_eq!(c.cascade.pruning, Pruning::TopK { keep_top_k: 50 });
    }

    #[test]
    fn policy_kinds_are_alternatives() {
        let keys = parse_grid(
            "cascade.expansion.threshold.load_threshold=0.2,0.4;cascade.expansion.decompose.top_k=5;\
             cascade.expansion=exhaustive;cascade.pruning=none;cascade.pruning.global_top_k.keep=10",
        )
        .unwrap();
        let pts = points(&keys).unwrap();
        // (2 threshold + 1 decompose + exhaustive) × (none + global_top_k)
        assert_eq!(pts.len(), 8);
        let configs: Vec<Config> = pts.iter().map(|p| apply(&base(), p).unwrap().0).collect();
        assert_eq!(configs[0].cascade.expansion, Expansion::Threshold { load_threshold: 0.2 });
        assert_eq!(configs[0].cascade.pruning, Pruning::None);
        assert_eq!(configs[5].cascade.expansion, Expansion::Decompose { top_k: 5, max_depth: 5 });
        assert_eq!(configs[5].cascade.pruning, Pruning::GlobalTopK { keep: 10 });
        assert_eq!(configs[6].cascade.expansion, Expansion::Exhaustive);
    }

    #[test]
    fn bad_keys_and_values_name_the_key() {
        let err = |spec: &str| {
            let keys = parse_grid(spec)?;
            let pts = points(&keys)?;
            apply(&base(), &pts[0]).map(|_| ())
        };
        let e = err("cascade.pruning.top_k.keep_topk=3").unwrap_err().to_string();
        assert!(e.contains("cascade.pruning.top_k.keep_topk") && e.contains("keep_topk"), "{e}");
        let e = err("cascade.max_lodaed=3").unwrap_err().to_string();
        assert!(e.contains("`cascade.max_lodaed`"), "{e}");
        let e = err("cascade.expansion.threshold.load_threshold=1.5").unwrap_err().to_string();
        assert!(e.contains("cascade.expansion.threshold.load_threshold") && e.contains("1.5"), "{e}");
        let e = err("cascade.report_top_k=many").unwrap_err().to_string();
        assert!(e.contains("cascade.report_top_k"), "{e}");
        assert!(err("cascade.max_loaded").unwrap_err().to_string().contains("key=value"));
        assert!(err("cascade.max_loaded=").unwrap_err().to_string().contains("no values"));
        assert!(err("a=1;a=2").unwrap_err().to_string().contains("twice"));
        assert!(err("").is_err());
        let big = format!("cascade.max_loaded={}", (1..=5000).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        assert!(err(&big).unwrap_err().to_string().contains("4096"));
    }
}
