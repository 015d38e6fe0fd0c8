//! Imports a headspace lens pack (github p0ss/headspace-ambient-transducer, its
//! `docs/lens-packs.md`) as it is on disk into a v2 pack, without Python:
//!
//! ```text
//! <pack>/pack_info.json            model_layer: what plain <Concept>.pt files read
//! <pack>/probe_calibration.json    {"probes": {"layer<N>/<Concept>@L<m>": {"quantiles": [...]}}}
//! <pack>/hierarchy/layer<N>.json   the bundled hierarchy (HatCat's schema), hierarchy.json
//! <pack>/layer<N>/<Concept>@L<m>.pt   one probe per model layer m, or
//! <pack>/layer<N>/<Concept>.pt        one probe reading pack_info's model_layer
//! ```
//!
//! Every probe file is a `torch.save` state dict read by [`super::torch_file`], checked as
//! HatCat imports are (shapes, finiteness, the logit check), with one difference: headspace
//! layer-normalizes every hidden state before any probe, so the pack's input normalization is
//! always `layer_norm` and the check scores the original on `LayerNorm(x)`. A plain
//! `<Concept>.pt` is never calibrated (its key has no `@L`), as in headspace.
//!
//! The older per-concept `calibration.json` (`{"calibration": {"<Concept>_L<N>": {self_mean,
//! cross_mean, cross_fire_rate, gen_fire_rate, noise_fire_rate, ...}}}`, keyed by name and
//! ontology layer N) makes the pack concept-calibrated: its reported scores go through each
//! concept's statistics, and lenses without an entry report the neutral default, as in
//! headspace (docs/cascade-semantics.md, "Reported scores").
//!
//! `simplex/` holds always-on simplex lenses. A tripole, `simplex/<Name>/<pole>/<Name>_<pole>_
//! classifier.pt` for each of `positive`, `neutral` and `negative`, is imported as a simplex of
//! three poles reading pack_info's model layer (as headspace scores them, on the state its
//! single-probe lenses read). As in headspace, a tripole missing a pole file is left out, and
//! a legacy `simplex/<Name>_tripole.pt` (which headspace loads but never scores) is not
//! imported; the summary names both.
//!
//! The first bad probe file or calibration entry stops the import.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use super::hatcat::{read_hierarchy, resolve_links};
use super::{
    check_inputs, check_logits, concept_defs, read_probe, tolerance, zero_weights, ImportError, ImportOptions, Phase,
};
use crate::pack::layout::{DType, ProbeLayout};
use crate::pack::manifest::{InputNormalization, MANIFEST_FILE};
use crate::pack::writer::{write_pack, LensSpec, PackSpec, ProbeDef, SimplexDef};
use crate::pack::{check_quantiles, ConceptCalibration, Pack};

pub const PACK_INFO: &str = "pack_info.json";
pub const PROBE_CALIBRATION: &str = "probe_calibration.json";
pub const CONCEPT_CALIBRATION: &str = "calibration.json";

/// One probe file of a lens.
#[derive(Debug, Clone)]
struct ProbeFile {
    path: PathBuf,
    model_layer: u32,
    /// `layer<N>/<Concept>@L<m>`, the calibration key; `None` for a plain `<Concept>.pt`.
    key: Option<String>,
}

/// headspace's tripole poles, in the order it loads them.
pub const TRIPOLE: [&str; 3] = ["positive", "neutral", "negative"];

/// A simplex found in `simplex/`: its name and its poles' files.
#[derive(Debug, Clone)]
struct SimplexFiles {
    name: String,
    poles: Vec<(String, PathBuf)>,
}

/// The complete tripoles under `dir/simplex`, by name, and what was left out (and why).
fn find_simplexes(dir: &Path) -> Result<(Vec<SimplexFiles>, Vec<String>), ImportError> {
    let root = dir.join("simplex");
    let Ok(entries) = std::fs::read_dir(&root) else { return Ok((Vec::new(), Vec::new())) };
    let mut paths = Vec::new();
    for entry in entries {
        paths.push(entry.map_err(|source| ImportError::Io { path: root.clone(), source })?.path());
    }
    paths.sort();
    let (mut found, mut left_out) = (Vec::new(), Vec::new());
    for path in paths {
        let file = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if path.is_dir() {
            let poles: Vec<(String, PathBuf)> = TRIPOLE
                .iter()
                .map(|pole| (pole.to_string(), path.join(pole).join(format!("{file}_{pole}_classifier.pt"))))
                .collect();
            let missing: Vec<String> =
                poles.iter().filter(|(_, p)| !p.is_file()).map(|(_, p)| p.display().to_string()).collect();
            if missing.is_empty() {
                found.push(SimplexFiles { name: file, poles });
            } else {
                left_out.push(format!(
                    "simplex {file}: no {} (headspace leaves out an incomplete tripole)",
                    missing.join(", ")
                ));
            }
        } else if file.ends_with("_tripole.pt") {
            left_out.push(format!(
                "{}: a legacy single-file simplex, which headspace loads but never scores on its own",
                path.display()
            ));
        }
    }
    Ok((found, left_out))
}

/// What an import of a headspace pack did.
#[derive(Debug, Clone)]
pub struct HeadspaceSummary {
    pub out: PathBuf,
    pub hidden_dim: usize,
    pub dtype: DType,
    pub lenses: usize,
    pub probes: usize,
    pub model_layers: Vec<u32>,
    /// Lenses of more than one probe.
    pub multi_probe_lenses: usize,
    pub calibrated_probes: usize,
    /// With a `calibration.json`: how many lenses it calibrates (the rest report 0.5).
    pub concept_calibrated: Option<usize>,
    /// Simplex lenses imported (each a tripole), by name.
    pub simplexes: Vec<String>,
    /// Simplex files left out, and why.
    pub simplexes_left_out: Vec<String>,
    /// Listed concepts with no probe file.
    pub no_probe_file: Vec<String>,
    pub links: usize,
    pub links_to_skipped: usize,
    pub worst_logit_error: f64,
    pub tolerance: f64,
}

/// Imports the headspace pack at `dir` into a new v2 pack at `out`.
pub fn import_headspace(
    dir: &Path,
    out: &Path,
    options: &ImportOptions,
    mut progress: impl FnMut(Phase, usize, usize),
) -> Result<HeadspaceSummary, ImportError> {
    if out.join(MANIFEST_FILE).exists() {
        return Err(ImportError::OutputExists(out.into()));
    }
    let info_path = dir.join(PACK_INFO);
    let default_layer = read_model_layer(&info_path)?;
    let files = read_hierarchy(&dir.join("hierarchy"))?;
    let (links, _) = resolve_links(&files);
    let concepts = &files.concepts;
    let label = |i: usize| format!("{}@{}", concepts[i].name, concepts[i].layer);

    // Probe files, by (ontology layer, concept name), from one listing per layer directory.
    let mut found: BTreeMap<(u16, String), Vec<ProbeFile>> = BTreeMap::new();
    let layers: BTreeSet<u16> = concepts.iter().map(|c| c.layer).collect();
    for &layer in &layers {
        let layer_dir = dir.join(format!("layer{layer}"));
        let Ok(entries) = std::fs::read_dir(&layer_dir) else { continue };
        for entry in entries {
            let entry = entry.map_err(|source| ImportError::Io { path: layer_dir.clone(), source })?;
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = file.strip_suffix(".pt") else { continue };
            let (name, model_layer, key) = match stem.rsplit_once("@L").map(|(n, m)| (n, m.parse::<u32>())) {
                Some((name, Ok(m))) => (name, Some(m), Some(format!("layer{layer}/{stem}"))),
                _ => (stem, None, None),
            };
            let model_layer = match (model_layer, default_layer) {
                (Some(m), _) | (None, Some(m)) => m,
                (None, None) => {
                    return Err(ImportError::Metadata {
                        path: info_path.clone(),
                        reason: format!(
                            "{} reads no model layer of its own (no @L<m> in its name), and pack_info.json gives no \
                             model_layer",
                            entry.path().display()
                        ),
                    })
                }
            };
            found.entry((layer, name.to_string())).or_default().push(ProbeFile {
                path: entry.path(),
                model_layer,
                key,
            });
        }
    }
    let calibration = read_calibration(&dir.join(PROBE_CALIBRATION))?;
    let (simplex_files, simplexes_left_out) = find_simplexes(dir)?;
    let simplex_layer = match (simplex_files.is_empty(), default_layer) {
        (true, _) => None,
        (false, Some(m)) => Some(m),
        (false, None) => {
            return Err(ImportError::Metadata {
                path: info_path.clone(),
                reason: format!(
                    "simplex lenses read the model layer of pack_info.json's model_layer, which it does not give \
                     ({} simplexes under {})",
                    simplex_files.len(),
                    dir.join("simplex").display()
                ),
            })
        }
    };

    // Each listed concept's probe files.
    let tol = tolerance(options.dtype);
    let mut lenses: Vec<(usize, Vec<ProbeFile>)> = Vec::new();
    let mut no_probe_file = Vec::new();
    for (i, c) in concepts.iter().enumerate() {
        match found.remove(&(c.layer, c.name.clone())) {
            Some(mut list) => {
                list.sort_by_key(|p| p.model_layer);
                if let Some(w) = list.windows(2).find(|w| w[0].model_layer == w[1].model_layer) {
                    let reason =
                        format!("two probe files read model layer {}: {}", w[0].model_layer, w[1].path.display());
                    return Err(ImportError::Probe { path: w[0].path.clone(), concept: label(i), reason });
                }
                lenses.push((i, list));
            }
            None => no_probe_file.push(label(i)),
        }
    }
    let total: usize = lenses.iter().map(|(_, l)| l.len()).sum();
    let pole_total: usize = simplex_files.iter().map(|s| s.poles.len()).sum();
    let known_keys: BTreeSet<String> =
        lenses.iter().flat_map(|(_, l)| l.iter().filter_map(|f| f.key.clone())).collect();
    // Concept ids: layer by layer, in the files' order within a layer.
    lenses.sort_by_key(|(i, _)| (concepts[*i].layer, *i));
    // Every probe file in probe id order (the lenses', then the simplex poles'), with what its
    // errors name.
    let flat: Vec<(String, PathBuf)> =
        lenses
            .iter()
            .flat_map(|(i, l)| l.iter().map(move |f| (label(*i), f.path.clone())))
            .chain(simplex_files.iter().flat_map(|s| {
                s.poles.iter().map(move |(pole, path)| (format!("simplex {}/{pole}", s.name), path.clone()))
            }))
            .collect();

    // Pass 1: read and check every probe file; every calibration key must name one of them.
    let mut hidden_dim: Option<(usize, PathBuf)> = None;
    let mut worst = 0f64;
    for (done, (concept, path)) in flat.iter().enumerate() {
        let bad = |reason: String| ImportError::Probe { path: path.clone(), concept: concept.clone(), reason };
        let p = read_probe(path).map_err(bad)?;
        if let Some((d, first)) = &hidden_dim {
            if p.hidden_dim != *d {
                let first = first.display();
                return Err(bad(format!("input width D={} but D={d} was set by {first}", p.hidden_dim)));
            }
        }
        let err = check_logits(&p, options.dtype, &check_inputs(p.hidden_dim), true).map_err(bad)?;
        if err > tol {
            return Err(bad(format!(
                "imported logits differ from the original by {err:.2e} of the logit's scale (tolerance {tol:.0e})"
            )));
        }
        worst = worst.max(err);
        hidden_dim.get_or_insert_with(|| (p.hidden_dim, path.clone()));
        progress(Phase::Checking, done + 1, total + pole_total);
    }
    let calibration_path = dir.join(PROBE_CALIBRATION);
    if let Some(unknown) = calibration.keys().find(|k| !known_keys.contains(*k)) {
        return Err(ImportError::Metadata {
            path: calibration_path,
            reason: format!("calibrates probe {unknown:?}, which is no probe file of the pack"),
        });
    }
    let Some((hidden_dim, _)) = hidden_dim else {
        return Err(ImportError::Nothing(format!("{} concepts listed, none with a probe file", concepts.len())));
    };

    let kept: Vec<usize> = lenses.iter().map(|(i, _)| *i).collect();
    let (defs, links_to_skipped) = concept_defs(concepts, &kept, &links, &dir.join("hierarchy"))?;
    let links_kept = links.len() - links_to_skipped;
    let model_layers: Vec<u32> = lenses
        .iter()
        .flat_map(|(_, l)| l.iter().map(|f| f.model_layer))
        .chain(simplex_layer)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let simplexes: Vec<SimplexDef> = simplex_files
        .iter()
        .map(|s| SimplexDef {
            name: s.name.clone(),
            poles: s.poles.iter().map(|(p, _)| p.clone()).collect(),
            model_layer: simplex_layer.unwrap_or_default(),
        })
        .collect();
    let probes: Vec<Vec<ProbeDef>> = lenses
        .iter()
        .map(|(_, list)| {
            list.iter()
                .map(|f| ProbeDef {
                    model_layer: f.model_layer,
                    quantiles: f.key.as_ref().and_then(|k| calibration.get(k).cloned()),
                })
                .collect()
        })
        .collect();
    let calibrated_probes = probes.iter().flatten().filter(|p| p.quantiles.is_some()).count();
    let concept_path = dir.join(CONCEPT_CALIBRATION);
    let concept_calibration = match read_concept_calibration(&concept_path)? {
        None => None,
        Some(mut by_key) => {
            let stats: Vec<Option<ConceptCalibration>> = lenses
                .iter()
                .map(|(i, _)| by_key.remove(&format!("{}_L{}", concepts[*i].name, concepts[*i].layer)))
                .collect();
            if let Some(unknown) = by_key.keys().next() {
                return Err(ImportError::Metadata {
                    path: concept_path,
                    reason: format!(
                        "calibrates {unknown:?}, which names no lens of the pack with a probe file (keys are \
                         <Concept>_L<ontology layer>)"
                    ),
                });
            }
            Some(stats)
        }
    };
    let concept_calibrated = concept_calibration.as_ref().map(|c| c.iter().flatten().count());

    // Pass 2: stream the probes into the pack, in probe id order.
    let spec = PackSpec {
        hidden_dim,
        dtype: options.dtype,
        input_normalization: InputNormalization::LayerNorm,
        probes_per_shard: options.probes_per_shard,
        concepts: defs,
        lenses: Some(LensSpec {
            model_layers: model_layers.clone(),
            probes,
            calibration: concept_calibration,
            simplexes,
        }),
    };
    let mut failure: Option<ImportError> = None;
    let written = write_pack(
        out,
        &spec,
        |id| {
            let (concept, path) = &flat[id as usize];
            match read_probe(path) {
                Ok(p) if p.hidden_dim == hidden_dim => p.folded(),
                result => {
                    let reason = result.err().unwrap_or_else(|| "changed while importing".into());
                    let (path, concept) = (path.clone(), concept.clone());
                    failure.get_or_insert(ImportError::Probe { path, concept, reason });
                    zero_weights(&ProbeLayout::new(hidden_dim, options.dtype))
                }
            }
        },
        |done| progress(Phase::Writing, done, total + pole_total),
    );
    if let Some(e) = failure {
        let _ = std::fs::remove_file(out.join(MANIFEST_FILE));
        return Err(e);
    }
    written?;
    Pack::open(out)?;
    Ok(HeadspaceSummary {
        out: out.into(),
        hidden_dim,
        dtype: options.dtype,
        lenses: lenses.len(),
        probes: total,
        multi_probe_lenses: lenses.iter().filter(|(_, l)| l.len() > 1).count(),
        model_layers,
        calibrated_probes,
        concept_calibrated,
        simplexes: simplex_files.into_iter().map(|s| s.name).collect(),
        simplexes_left_out,
        no_probe_file,
        links: links_kept,
        links_to_skipped,
        worst_logit_error: worst,
        tolerance: tol,
    })
}

/// `pack_info.json`'s `model_layer`, where the file and the field exist.
fn read_model_layer(path: &Path) -> Result<Option<u32>, ImportError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ImportError::Io { path: path.into(), source }),
    };
    let bad = |reason: String| ImportError::Metadata { path: path.into(), reason };
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    match value.get("model_layer") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|m| u32::try_from(m).ok())
            .map(Some)
            .ok_or_else(|| bad(format!("model_layer is {v}, not a layer number"))),
    }
}

/// `probe_calibration.json`'s quantiles by probe key, each checked; empty without the file.
pub fn read_calibration(path: &Path) -> Result<BTreeMap<String, Vec<f64>>, ImportError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(ImportError::Io { path: path.into(), source }),
    };
    parse_calibration(&text).map_err(|reason| ImportError::Metadata { path: path.into(), reason })
}

/// The calibration file's text to quantiles by probe key (a fuzz target).
pub fn parse_calibration(text: &[u8]) -> Result<BTreeMap<String, Vec<f64>>, String> {
    let value: serde_json::Value = serde_json::from_slice(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(probes) = value.get("probes").and_then(|p| p.as_object()) else {
        return Err("has no \"probes\" object".into());
    };
    let mut out = BTreeMap::new();
    for (key, entry) in probes {
        let Some(q) = entry.get("quantiles") else {
            return Err(format!("probe {key:?} has no \"quantiles\""));
        };
        let Some(q) = q.as_array().and_then(|a| a.iter().map(|v| v.as_f64()).collect::<Option<Vec<f64>>>()) else {
            return Err(format!("probe {key:?}: \"quantiles\" is not a list of numbers"));
        };
        check_quantiles(&q).map_err(|why| format!("probe {key:?}: {why}"))?;
        out.insert(key.clone(), q);
    }
    Ok(out)
}

/// `calibration.json`'s statistics by key (`<Concept>_L<N>`), each checked; `None` without
/// the file.
pub fn read_concept_calibration(path: &Path) -> Result<Option<BTreeMap<String, ConceptCalibration>>, ImportError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ImportError::Io { path: path.into(), source }),
    };
    parse_concept_calibration(&text).map(Some).map_err(|reason| ImportError::Metadata { path: path.into(), reason })
}

/// The older calibration file's text to statistics by concept key (a fuzz target). A missing
/// statistic takes headspace's default (`self_mean` 0.9, the others 0); fields it does not use
/// (`self_std`, `cross_std`) are allowed and ignored.
pub fn parse_concept_calibration(text: &[u8]) -> Result<BTreeMap<String, ConceptCalibration>, String> {
    let value: serde_json::Value = serde_json::from_slice(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(entries) = value.get("calibration").and_then(|p| p.as_object()) else {
        return Err("has no \"calibration\" object".into());
    };
    let mut out = BTreeMap::new();
    for (key, entry) in entries {
        out.insert(key.clone(), concept_statistics(entry).map_err(|why| format!("concept {key:?}: {why}"))?);
    }
    Ok(out)
}

/// One concept's statistics from a JSON object, checked; a missing statistic takes
/// headspace's default (`self_mean` 0.9, the others 0), and other fields are ignored.
pub fn concept_statistics(entry: &serde_json::Value) -> Result<ConceptCalibration, String> {
    let Some(entry) = entry.as_object() else {
        return Err("its entry is not an object".into());
    };
    let field = |name: &str, default: f64| -> Result<f64, String> {
        match entry.get(name) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| format!("{name} is {v}, not a number")),
        }
    };
    let stats = ConceptCalibration {
        self_mean: field("self_mean", 0.9)?,
        cross_mean: field("cross_mean", 0.0)?,
        cross_fire_rate: field("cross_fire_rate", 0.0)?,
        gen_fire_rate: field("gen_fire_rate", 0.0)?,
        noise_fire_rate: field("noise_fire_rate", 0.0)?,
    };
    stats.check()?;
    Ok(stats)
}

impl fmt::Display for HeadspaceSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "imported {} lenses ({} probes; {} lenses of several probes) into {} (D={}, {}, input normalization: \
             layer_norm)",
            self.lenses,
            self.probes,
            self.multi_probe_lenses,
            self.out.display(),
            self.hidden_dim,
            self.dtype
        )?;
        writeln!(f, "model layers: {:?}", self.model_layers)?;
        writeln!(f, "calibrated probes: {} of {}", self.calibrated_probes, self.probes)?;
        if let Some(n) = self.concept_calibrated {
            writeln!(
                f,
                "concept calibration (calibration.json): {n} of {} lenses; reported scores go through it, and the \
                 others report 0.5, as in headspace",
                self.lenses
            )?;
        }
        writeln!(f, "links: {} (dropped with concepts that have no probe: {})", self.links, self.links_to_skipped)?;
        writeln!(f, "skipped, no probe file: {}", self.no_probe_file.len())?;
        for c in &self.no_probe_file {
            writeln!(f, "  {c}")?;
        }
        if !self.simplexes.is_empty() {
            writeln!(f, "simplex lenses (always on, 3 poles each): {}", self.simplexes.join(", "))?;
        }
        for n in &self.simplexes_left_out {
            writeln!(f, "left out: {n}")?;
        }
        write!(
            f,
            "logit check: worst difference {:.2e} of the logit's scale (tolerance {:.0e})",
            self.worst_logit_error, self.tolerance
        )
    }
}
