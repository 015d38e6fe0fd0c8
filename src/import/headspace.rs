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
//! Not read yet, and said so in the summary: the older per-concept `calibration.json` and
//! `simplex/` lenses. The first bad probe file or calibration entry stops the import.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use super::hatcat::{read_hierarchy, resolve_links};
use super::{
    check_inputs, check_logits, concept_defs, read_probe, tolerance, zero_weights, ImportError, ImportOptions, Phase,
};
use crate::pack::layout::{DType, ProbeLayout};
use crate::pack::manifest::{InputNormalization, MANIFEST_FILE};
use crate::pack::writer::{write_pack, LensSpec, PackSpec, ProbeDef};
use crate::pack::{check_quantiles, Pack};

pub const PACK_INFO: &str = "pack_info.json";
pub const PROBE_CALIBRATION: &str = "probe_calibration.json";

/// One probe file of a lens.
#[derive(Debug, Clone)]
struct ProbeFile {
    path: PathBuf,
    model_layer: u32,
    /// `layer<N>/<Concept>@L<m>`, the calibration key; `None` for a plain `<Concept>.pt`.
    key: Option<String>,
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
    /// Listed concepts with no probe file.
    pub no_probe_file: Vec<String>,
    pub links: usize,
    pub links_to_skipped: usize,
    pub worst_logit_error: f64,
    pub tolerance: f64,
    /// What the pack holds that this import does not read yet.
    pub not_read: Vec<String>,
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

    // Pass 1: read and check every probe file; every calibration key must name one of them.
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
    let mut known_keys = BTreeSet::new();
    let total: usize = lenses.iter().map(|(_, l)| l.len()).sum();
    let mut hidden_dim: Option<(usize, PathBuf)> = None;
    let mut worst = 0f64;
    let mut done = 0;
    for (i, list) in &lenses {
        for f in list {
            let bad = |reason: String| ImportError::Probe { path: f.path.clone(), concept: label(*i), reason };
            let p = read_probe(&f.path).map_err(bad)?;
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
            hidden_dim.get_or_insert_with(|| (p.hidden_dim, f.path.clone()));
            known_keys.extend(f.key.clone());
            done += 1;
            progress(Phase::Checking, done, total);
        }
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

    // Concept ids: layer by layer, in the files' order within a layer.
    lenses.sort_by_key(|(i, _)| (concepts[*i].layer, *i));
    let kept: Vec<usize> = lenses.iter().map(|(i, _)| *i).collect();
    let (defs, links_to_skipped) = concept_defs(concepts, &kept, &links, &dir.join("hierarchy"))?;
    let links_kept = links.len() - links_to_skipped;
    let model_layers: Vec<u32> =
        lenses.iter().flat_map(|(_, l)| l.iter().map(|f| f.model_layer)).collect::<BTreeSet<_>>().into_iter().collect();
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
    let flat: Vec<(usize, &ProbeFile)> = lenses.iter().flat_map(|(i, l)| l.iter().map(move |f| (*i, f))).collect();

    // Pass 2: stream the probes into the pack, in probe id order.
    let spec = PackSpec {
        hidden_dim,
        dtype: options.dtype,
        input_normalization: InputNormalization::LayerNorm,
        probes_per_shard: options.probes_per_shard,
        concepts: defs,
        lenses: Some(LensSpec { model_layers: model_layers.clone(), probes }),
    };
    let mut failure: Option<ImportError> = None;
    let written = write_pack(
        out,
        &spec,
        |id| {
            let (i, f) = flat[id as usize];
            match read_probe(&f.path) {
                Ok(p) if p.hidden_dim == hidden_dim => p.folded(),
                result => {
                    let reason = result.err().unwrap_or_else(|| "changed while importing".into());
                    failure.get_or_insert(ImportError::Probe { path: f.path.clone(), concept: label(i), reason });
                    zero_weights(&ProbeLayout::new(hidden_dim, options.dtype))
                }
            }
        },
        |done| progress(Phase::Writing, done, total),
    );
    if let Some(e) = failure {
        let _ = std::fs::remove_file(out.join(MANIFEST_FILE));
        return Err(e);
    }
    written?;
    Pack::open(out)?;
    let mut not_read = Vec::new();
    for (what, path) in
        [("per-concept calibration.json (older packs)", "calibration.json"), ("simplex lenses", "simplex")]
    {
        if dir.join(path).exists() {
            not_read.push(format!("{what}: {}", dir.join(path).display()));
        }
    }
    Ok(HeadspaceSummary {
        out: out.into(),
        hidden_dim,
        dtype: options.dtype,
        lenses: lenses.len(),
        probes: total,
        multi_probe_lenses: lenses.iter().filter(|(_, l)| l.len() > 1).count(),
        model_layers,
        calibrated_probes,
        no_probe_file,
        links: links_kept,
        links_to_skipped,
        worst_logit_error: worst,
        tolerance: tol,
        not_read,
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
        writeln!(f, "links: {} (dropped with concepts that have no probe: {})", self.links, self.links_to_skipped)?;
        writeln!(f, "skipped, no probe file: {}", self.no_probe_file.len())?;
        for c in &self.no_probe_file {
            writeln!(f, "  {c}")?;
        }
        for n in &self.not_read {
            writeln!(f, "not read yet: {n}")?;
        }
        write!(
            f,
            "logit check: worst difference {:.2e} of the logit's scale (tolerance {:.0e})",
            self.worst_logit_error, self.tolerance
        )
    }
}
