//! The HatCat layout: per-layer hierarchy JSON files, an optional authoritative
//! `hierarchy.json`, and one `torch.save` state_dict per probe.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::torch_file::{StoredDType, StoredTensor};
use super::ImportError;
use crate::engine::layer_norm_f64;
use crate::pack::layout::{ProbeWeights, HIDDEN1, HIDDEN2};

/// A concept as the layer files describe it (links still by name).
#[derive(Debug, Clone)]
pub struct Concept {
    pub name: String,
    pub layer: u16,
    /// `category_children`: names of children.
    pub children: Vec<String>,
    /// `parent_concepts`: names of parents.
    pub parents: Vec<String>,
    /// The layer file it came from.
    pub file: PathBuf,
}

/// Everything read from the hierarchy directory.
#[derive(Debug, Default)]
pub struct HierarchyFiles {
    /// In file order, layer by layer; one entry per (name, layer).
    pub concepts: Vec<Concept>,
    /// Concepts listed again under a (name, layer) already seen (their links were merged).
    pub duplicates: usize,
    /// Which schema each layer file used.
    pub schemas: BTreeMap<String, &'static str>,
    /// `parent -> child` pairs from hierarchy.json, by "Name:L" keys.
    pub hierarchy_json: Option<Vec<(String, String)>>,
}

fn malformed(path: &Path, reason: impl Into<String>) -> ImportError {
    ImportError::Hierarchy { path: path.into(), reason: reason.into() }
}

/// Reads `layer{N}.json` files (both schemas) and `hierarchy.json` if present.
pub fn read_hierarchy(dir: &Path) -> Result<HierarchyFiles, ImportError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ImportError::Io { path: dir.into(), source })?;
    let mut layer_files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ImportError::Io { path: dir.into(), source })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("layer").and_then(|s| s.strip_suffix(".json")) {
            if let Ok(n) = n.parse::<u16>() {
                layer_files.push((n, entry.path()));
            }
        }
    }
    if layer_files.is_empty() {
        return Err(malformed(dir, "no layer{N}.json files"));
    }
    layer_files.sort();
    let mut out = HierarchyFiles::default();
    let mut seen: HashMap<(String, u16), usize> = HashMap::new();
    for (n, path) in &layer_files {
        let (schema, concepts) = read_layer_file(path, *n)?;
        out.schemas.insert(path.file_name().unwrap_or_default().to_string_lossy().into_owned(), schema);
        for c in concepts {
            match seen.get(&(c.name.clone(), c.layer)) {
                Some(&i) => {
                    out.duplicates += 1;
                    let kept = &mut out.concepts[i];
                    kept.children.extend(c.children);
                    kept.parents.extend(c.parents);
                }
                None => {
                    seen.insert((c.name.clone(), c.layer), out.concepts.len());
                    out.concepts.push(c);
                }
            }
        }
    }
    let hierarchy_json = dir.join("hierarchy.json");
    if hierarchy_json.exists() {
        out.hierarchy_json = Some(read_hierarchy_json(&hierarchy_json)?);
    }
    Ok(out)
}

fn read_json(path: &Path) -> Result<Json, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Io { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|e| malformed(path, format!("not valid JSON: {e}")))
}

fn read_layer_file(path: &Path, n: u16) -> Result<(&'static str, Vec<Concept>), ImportError> {
    let doc = read_json(path)?;
    let Json::Object(top) = &doc else { return Err(malformed(path, "top level is not an object")) };
    let schema = if top.contains_key("layer") {
        if top["layer"].as_u64() != Some(n as u64) {
            return Err(malformed(path, format!("\"layer\" is {} but the file name says {n}", top["layer"])));
        }
        "layer"
    } else if top.contains_key("metadata") {
        "metadata"
    } else {
        return Err(malformed(path, "neither {\"layer\", \"concepts\"} nor {\"metadata\", \"concepts\"}"));
    };
    let Some(list) = top.get("concepts").and_then(Json::as_array) else {
        return Err(malformed(path, "\"concepts\" is missing or not a list"));
    };
    let mut concepts = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        let at = |reason: String| malformed(path, format!("concept {i}: {reason}"));
        let Some(name) = c.get("sumo_term").and_then(Json::as_str) else {
            return Err(at("\"sumo_term\" is missing or not a string".into()));
        };
        if name.is_empty() || name.contains('\n') {
            return Err(at(format!("\"sumo_term\" {name:?} is not a one-line name")));
        }
        let Some(layer) = c.get("layer").and_then(Json::as_u64).and_then(|l| u16::try_from(l).ok()) else {
            return Err(at(format!("{name}: \"layer\" is missing or not a small non-negative integer")));
        };
        let names = |field: &str| -> Result<Vec<String>, ImportError> {
            match c.get(field) {
                None | Some(Json::Null) => Ok(Vec::new()),
                Some(Json::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| at(format!("{name}: \"{field}\" holds {v}, not a name")))
                    })
                    .collect(),
                Some(other) => Err(at(format!("{name}: \"{field}\" is {other}, not a list of names"))),
            }
        };
        concepts.push(Concept {
            name: name.to_string(),
            layer,
            children: names("category_children")?,
            parents: names("parent_concepts")?,
            file: path.into(),
        });
    }
    Ok((schema, concepts))
}

/// `parent -> child` pairs from both maps of hierarchy.json, as "Name:L" strings.
fn read_hierarchy_json(path: &Path) -> Result<Vec<(String, String)>, ImportError> {
    let doc = read_json(path)?;
    let mut pairs = Vec::new();
    for (field, parent_is_key) in [("parent_to_children", true), ("child_to_parent", false)] {
        let map = match doc.get(field) {
            None | Some(Json::Null) => continue,
            Some(Json::Object(map)) => map,
            Some(_) => return Err(malformed(path, format!("\"{field}\" is not an object"))),
        };
        for (key, targets) in map {
            // child_to_parent values are a list in HatCat's files; accept a single name too.
            let targets: Vec<&Json> = match targets {
                Json::Array(items) => items.iter().collect(),
                one @ Json::String(_) => vec![one],
                other => return Err(malformed(path, format!("\"{field}\".\"{key}\" is {other}, not a list"))),
            };
            for t in targets {
                let Some(t) = t.as_str() else {
                    return Err(malformed(path, format!("\"{field}\".\"{key}\" holds {t}, not a \"Name:L\" key")));
                };
                let (p, c) = if parent_is_key { (key.clone(), t.to_string()) } else { (t.to_string(), key.clone()) };
                pairs.push((p, c));
            }
        }
    }
    Ok(pairs)
}

/// Splits "Name:L"; the name may itself contain ':'.
pub fn parse_key(key: &str) -> Option<(&str, u16)> {
    let (name, layer) = key.rsplit_once(':')?;
    Some((name, layer.parse().ok()?))
}

/// How the parent-child links were decided, for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkReport {
    /// "hierarchy.json" or "layer files".
    pub source: &'static str,
    pub links: usize,
    /// Links both sources state.
    pub agreed: usize,
    /// With hierarchy.json: links it has that the layer files lack (kept).
    pub only_in_hierarchy_json: usize,
    /// With hierarchy.json: links only the layer files state (dropped).
    pub dropped_from_layer_files: usize,
    /// Without hierarchy.json: links only a parent's `category_children` states (kept).
    pub only_in_category_children: usize,
    /// Without hierarchy.json: links only a child's `parent_concepts` states (kept).
    pub only_in_parent_concepts: usize,
    /// Names or keys that match no concept, as "where: what".
    pub unresolved: Vec<String>,
}

/// Resolves links to `(parent index, child index)` pairs into `concepts`.
///
/// - `category_children` of P@l names C: the concept C at the lowest layer ≥ l (not P itself).
/// - `parent_concepts` of C@l names P: the concept P at the highest layer ≤ l (not C itself),
///   the nearest such parent.
/// - hierarchy.json, where present, is authoritative: its links are the pack's; the layer
///   files' links are only compared against it.
pub fn resolve_links(files: &HierarchyFiles) -> (BTreeSet<(usize, usize)>, LinkReport) {
    let concepts = &files.concepts;
    let mut by_name: HashMap<&str, Vec<(u16, usize)>> = HashMap::new();
    for (i, c) in concepts.iter().enumerate() {
        by_name.entry(&c.name).or_default().push((c.layer, i));
    }
    for layers in by_name.values_mut() {
        layers.sort();
    }
    let mut unresolved = Vec::new();
    let mut from_children = BTreeSet::new();
    let mut from_parents = BTreeSet::new();
    for (i, c) in concepts.iter().enumerate() {
        let label = format!("{}@{}", c.name, c.layer);
        for child in &c.children {
            let found = by_name.get(child.as_str()).and_then(|ls| ls.iter().find(|&&(l, j)| l >= c.layer && j != i));
            match found {
                Some(&(_, j)) => drop(from_children.insert((i, j))),
                None => unresolved.push(format!("{label} category_children: {child}")),
            }
        }
        for parent in &c.parents {
            let found =
                by_name.get(parent.as_str()).and_then(|ls| ls.iter().rev().find(|&&(l, j)| l <= c.layer && j != i));
            match found {
                Some(&(_, j)) => drop(from_parents.insert((j, i))),
                None => unresolved.push(format!("{label} parent_concepts: {parent}")),
            }
        }
    }
    let layer_files: BTreeSet<_> = from_children.union(&from_parents).copied().collect();
    let Some(pairs) = &files.hierarchy_json else {
        let report = LinkReport {
            source: "layer files",
            links: layer_files.len(),
            agreed: from_children.intersection(&from_parents).count(),
            only_in_category_children: from_children.difference(&from_parents).count(),
            only_in_parent_concepts: from_parents.difference(&from_children).count(),
            unresolved,
            ..Default::default()
        };
        return (layer_files, report);
    };
    let by_key: HashMap<(&str, u16), usize> =
        concepts.iter().enumerate().map(|(i, c)| ((c.name.as_str(), c.layer), i)).collect();
    let find = |key: &str| parse_key(key).and_then(|k| by_key.get(&k).copied());
    let mut links = BTreeSet::new();
    for (p, c) in pairs {
        match (find(p), find(c)) {
            (Some(p), Some(c)) if p != c => drop(links.insert((p, c))),
            (Some(_), Some(_)) => unresolved.push(format!("hierarchy.json: {p} -> {c} links a concept to itself")),
            (None, _) => unresolved.push(format!("hierarchy.json: {p}")),
            (_, None) => unresolved.push(format!("hierarchy.json: {c}")),
        }
    }
    let report = LinkReport {
        source: "hierarchy.json",
        links: links.len(),
        agreed: links.intersection(&layer_files).count(),
        only_in_hierarchy_json: links.difference(&layer_files).count(),
        dropped_from_layer_files: layer_files.difference(&links).count(),
        unresolved,
        ..Default::default()
    };
    (links, report)
}

/// Where a concept's probe file is, in HatCat's lookup order.
pub fn find_probe_file(lenses: &Path, name: &str, layer: u16) -> Option<PathBuf> {
    // A name that is not a plain file name cannot have a file (and must not escape `lenses`).
    if name.contains(['/', '\\']) || name == "." || name == ".." {
        return None;
    }
    let dir = lenses.join(format!("layer{layer}"));
    [
        dir.join(format!("{name}.pt")),
        dir.join(format!("{name}_classifier.pt")),
        lenses.join(format!("{name}_classifier.pt")),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The key style a probe file used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyStyle {
    /// `0.weight`, `3.weight`, `6.weight` (a bare `nn.Sequential`).
    Bare,
    /// `net.0.weight`, ... (a module holding the Sequential as `net`).
    Net,
}

/// A probe as trained: the three Linears and, in the LayerNorm variant, the input
/// LayerNorm's scale and shift.
#[derive(Debug, Clone)]
pub struct TrainedProbe {
    pub hidden_dim: usize,
    pub linears: ProbeWeights,
    pub layer_norm: Option<(Vec<f32>, Vec<f32>)>,
    pub style: KeyStyle,
    pub dtype: StoredDType,
}

/// Maps a state_dict onto the probe architecture; `Err` says what does not fit.
pub fn trained_probe(tensors: Vec<(String, StoredTensor)>) -> Result<TrainedProbe, String> {
    if tensors.iter().any(|(k, _)| k == "linear.weight") {
        return Err("a linear probe (linear.weight), not the D→128→64→1 MLP this runtime scores".into());
    }
    let style = if tensors.iter().all(|(k, _)| k.starts_with("net.")) { KeyStyle::Net } else { KeyStyle::Bare };
    let prefix = if style == KeyStyle::Net { "net." } else { "" };
    let mut by_key: BTreeMap<String, StoredTensor> = BTreeMap::new();
    for (key, t) in tensors {
        let Some(short) = key.strip_prefix(prefix) else {
            return Err(format!("key {key:?} mixes key styles (some keys have the net. prefix, some not)"));
        };
        by_key.insert(short.to_string(), t);
    }
    let dtype = by_key.values().map(|t| t.dtype).max().unwrap_or(StoredDType::F32);
    // The LayerNorm variant puts a 1-D weight at index 0 and shifts the Linears by one.
    let layer_norm = by_key.get("0.weight").is_some_and(|t| t.shape.len() == 1);
    let [l1, l2, l3] = if layer_norm { [1, 4, 7] } else { [0, 3, 6] };
    let mut take = |name: String, shape: &[Option<usize>]| -> Result<StoredTensor, String> {
        let t = by_key.remove(&name).ok_or_else(|| format!("missing key {prefix}{name}"))?;
        let fits = t.shape.len() == shape.len() && t.shape.iter().zip(shape).all(|(&a, b)| b.is_none_or(|b| a == b));
        if !fits {
            let want: Vec<String> = shape.iter().map(|d| d.map_or("D".into(), |d| d.to_string())).collect();
            return Err(format!("{prefix}{name} has shape {:?}, expected [{}]", t.shape, want.join(", ")));
        }
        if let Some(i) = t.values.iter().position(|v| !v.is_finite()) {
            return Err(format!("{prefix}{name}[{i}] is {}, not finite", t.values[i]));
        }
        Ok(t)
    };
    let w1 = take(format!("{l1}.weight"), &[Some(HIDDEN1), None])?;
    let d = w1.shape[1];
    if d == 0 {
        return Err(format!("{prefix}{l1}.weight has no input features"));
    }
    let b1 = take(format!("{l1}.bias"), &[Some(HIDDEN1)])?;
    let w2 = take(format!("{l2}.weight"), &[Some(HIDDEN2), Some(HIDDEN1)])?;
    let b2 = take(format!("{l2}.bias"), &[Some(HIDDEN2)])?;
    let w3 = take(format!("{l3}.weight"), &[Some(1), Some(HIDDEN2)])?;
    let b3 = take(format!("{l3}.bias"), &[Some(1)])?;
    let layer_norm = if layer_norm {
        let gamma = take("0.weight".into(), &[Some(d)])?;
        let beta = take("0.bias".into(), &[Some(d)])?;
        Some((gamma.values, beta.values))
    } else {
        None
    };
    if let Some(extra) = by_key.keys().next() {
        return Err(format!("unexpected key {prefix}{extra} (not a D→128→64→1 probe)"));
    }
    let linears =
        ProbeWeights { w1: w1.values, b1: b1.values, w2: w2.values, b2: b2.values, w3: w3.values, b3: b3.values };
    Ok(TrainedProbe { hidden_dim: d, linears, layer_norm, style, dtype })
}

impl TrainedProbe {
    /// The Linears to store. A LayerNorm folds into the first Linear, to run after a shared
    /// no-affine normalization: `W1' = W1·diag(γ)`, `b1' = b1 + W1·β`.
    pub fn folded(&self) -> ProbeWeights {
        let Some((gamma, beta)) = &self.layer_norm else { return self.linears.clone() };
        let d = self.hidden_dim;
        let mut w = self.linears.clone();
        for k in 0..HIDDEN1 {
            let row = &self.linears.w1[k * d..(k + 1) * d];
            let shift: f64 = row.iter().zip(beta).map(|(&w, &b)| w as f64 * b as f64).sum();
            w.b1[k] = (self.linears.b1[k] as f64 + shift) as f32;
            for (out, (&wi, &g)) in w.w1[k * d..(k + 1) * d].iter_mut().zip(row.iter().zip(gamma)) {
                *out = wi * g;
            }
        }
        w
    }

    /// The original model's logit, in f64: LayerNorm with its affine (if any), then the MLP.
    pub fn logit(&self, x: &[f32]) -> (f64, f64) {
        match &self.layer_norm {
            None => self.linears.logit_f64(&x.iter().map(|&v| v as f64).collect::<Vec<_>>()),
            Some((gamma, beta)) => {
                let n = layer_norm_f64(x);
                let y: Vec<f64> =
                    n.iter().zip(gamma.iter().zip(beta)).map(|(v, (&g, &b))| v * g as f64 + b as f64).collect();
                self.linears.logit_f64(&y)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: &[usize], f: impl Fn(usize) -> f32) -> StoredTensor {
        let n = shape.iter().product();
        StoredTensor { shape: shape.to_vec(), dtype: StoredDType::F32, values: (0..n).map(f).collect() }
    }

    fn state_dict(prefix: &str, d: usize, layer_norm: bool) -> Vec<(String, StoredTensor)> {
        let wave = |seed: f32| move |i: usize| ((i as f32 * 0.61 + seed).sin()) * 0.4;
        let [a, b, c] = if layer_norm { [1, 4, 7] } else { [0, 3, 6] };
        let mut sd = vec![
            (format!("{prefix}{a}.weight"), tensor(&[HIDDEN1, d], wave(0.1))),
            (format!("{prefix}{a}.bias"), tensor(&[HIDDEN1], wave(0.2))),
            (format!("{prefix}{b}.weight"), tensor(&[HIDDEN2, HIDDEN1], wave(0.3))),
            (format!("{prefix}{b}.bias"), tensor(&[HIDDEN2], wave(0.4))),
            (format!("{prefix}{c}.weight"), tensor(&[1, HIDDEN2], wave(0.5))),
            (format!("{prefix}{c}.bias"), tensor(&[1], wave(0.6))),
        ];
        if layer_norm {
            sd.push((format!("{prefix}0.weight"), tensor(&[d], |i| 0.5 + i as f32 * 0.1)));
            sd.push((format!("{prefix}0.bias"), tensor(&[d], |i| (i as f32 - 3.0) * 0.05)));
        }
        sd
    }

    #[test]
    fn both_key_styles_map_to_the_same_probe() {
        let bare = trained_probe(state_dict("", 8, false)).unwrap();
        let net = trained_probe(state_dict("net.", 8, false)).unwrap();
        assert_eq!((bare.style, net.style), (KeyStyle::Bare, KeyStyle::Net));
        assert_eq!(bare.linears, net.linears);
        assert_eq!(bare.hidden_dim, 8);
    }

    #[test]
    fn a_folded_layer_norm_scores_like_the_original() {
        let p = trained_probe(state_dict("net.", 8, true)).unwrap();
        assert!(p.layer_norm.is_some());
        let folded = p.folded();
        let mut moved = 0;
        for s in 0..5 {
            let x: Vec<f32> = (0..8).map(|i| ((i * 7 + s * 3) as f32 * 0.9).cos() * 3.0).collect();
            let (want, scale) = p.logit(&x);
            let (got, _) = folded.logit_f64(&layer_norm_f64(&x));
            assert!((want - got).abs() <= 1e-6 * scale, "{want} vs {got}");
            // And the fold matters: ignoring γ and β moves the logit.
            let (ignored, _) = p.linears.logit_f64(&layer_norm_f64(&x));
            moved += ((want - ignored).abs() > 1e-3 * scale) as usize;
        }
        assert!(moved >= 3, "the LayerNorm's affine changed only {moved} of 5 logits");
    }

    #[test]
    fn shape_and_key_defects_are_named() {
        let mut sd = state_dict("", 8, false);
        sd.retain(|(k, _)| k != "6.bias");
        assert_eq!(trained_probe(sd).unwrap_err(), "missing key 6.bias");
        let mut sd = state_dict("net.", 8, false);
        sd[2].1 = tensor(&[HIDDEN2, 32], |_| 0.0);
        assert!(trained_probe(sd).unwrap_err().contains("net.3.weight has shape [64, 32], expected [64, 128]"));
        let mut sd = state_dict("", 8, false);
        sd.push(("9.weight".into(), tensor(&[1], |_| 0.0)));
        assert!(trained_probe(sd).unwrap_err().contains("unexpected key 9.weight"));
        let mut sd = state_dict("", 8, false);
        sd[1].1.values[3] = f32::INFINITY;
        assert_eq!(trained_probe(sd).unwrap_err(), "0.bias[3] is inf, not finite");
        let mut sd = state_dict("net.", 8, true);
        sd.last_mut().unwrap().1 = tensor(&[9], |_| 0.0);
        assert!(trained_probe(sd).unwrap_err().contains("net.0.bias has shape [9], expected [8]"));
    }

    fn concept(name: &str, layer: u16, children: &[&str], parents: &[&str]) -> Concept {
        Concept {
            name: name.into(),
            layer,
            children: children.iter().map(|s| s.to_string()).collect(),
            parents: parents.iter().map(|s| s.to_string()).collect(),
            file: PathBuf::new(),
        }
    }

    #[test]
    fn links_resolve_to_the_nearest_layer_and_report_disagreement() {
        let files = HierarchyFiles {
            concepts: vec![
                concept("A", 0, &["B", "X"], &[]),
                concept("B", 1, &[], &["A"]),
                concept("B", 3, &[], &["B"]),
                concept("C", 2, &[], &["A", "Nope"]),
            ],
            ..Default::default()
        };
        let (links, report) = resolve_links(&files);
        // A lists B: lowest layer ≥ 0 is B@1. B@3 names parent B: highest layer ≤ 3 but not
        // itself is B@1. C names A only from its side.
        assert_eq!(links, BTreeSet::from([(0, 1), (1, 2), (0, 3)]));
        assert_eq!(report.agreed, 1);
        assert_eq!(report.only_in_parent_concepts, 2);
        assert_eq!(report.only_in_category_children, 0);
        assert_eq!(report.unresolved, vec!["A@0 category_children: X", "C@2 parent_concepts: Nope"]);
    }
}
