//! Imports probe packs trained elsewhere. Today: HatCat's layout (per-layer hierarchy JSON and
//! one `torch.save` state_dict per probe), read without Python.
//!
//! Two passes over the probe files: the first reads, validates and checks every probe (so that
//! bad ones are known before concept ids are given out), the second reads them again and
//! streams them into the pack. Only one probe is in memory at a time.

pub mod hatcat;
pub mod headspace;
pub mod pickle;
pub mod stored_zip;
pub mod torch_file;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::engine::layer_norm_f64;
use crate::pack::layout::{DType, ProbeLayout, ProbeWeights};
use crate::pack::manifest::InputNormalization;
use crate::pack::writer::{write_pack, ConceptDef, PackSpec};
use crate::pack::{Hierarchy, Pack, PackError};
use hatcat::{find_probe_file, resolve_links, trained_probe, LinkReport, TrainedProbe};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Hierarchy { path: PathBuf, reason: String },
    #[error("{path}: probe for {concept}: {reason}")]
    Probe { path: PathBuf, concept: String, reason: String },
    #[error("nothing to import: {0}")]
    Nothing(String),
    #[error("{0}: already holds a pack; import into a new directory")]
    OutputExists(PathBuf),
    /// A bad `probe_calibration.json` or `pack_info.json` of a headspace pack.
    #[error("{path}: {reason}")]
    Metadata { path: PathBuf, reason: String },
    #[error(transparent)]
    Pack(#[from] PackError),
}

#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Storage dtype of the pack (f32 keeps every source exactly).
    pub dtype: DType,
    /// Import the good probes and list the bad ones, instead of stopping at the first.
    pub skip_bad: bool,
    pub probes_per_shard: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, skip_bad: false, probes_per_shard: 256 }
    }
}

/// Progress callbacks: which pass, done, total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Checking,
    Writing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub concept: String,
    pub file: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerCount {
    pub listed: usize,
    pub imported: usize,
}

/// What an import did, for the user.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub out: PathBuf,
    pub hidden_dim: usize,
    pub dtype: DType,
    pub input_normalization: InputNormalization,
    pub per_layer: BTreeMap<u16, LayerCount>,
    pub imported: usize,
    /// Concepts with no probe file under any of the looked-up names.
    pub no_probe_file: Vec<String>,
    /// Probe files refused (only with `skip_bad`; otherwise the first is an error).
    pub bad: Vec<Skipped>,
    /// (name, layer) pairs listed more than once in the layer files.
    pub duplicates: usize,
    pub layer_norms_folded: usize,
    pub key_styles: BTreeMap<String, usize>,
    pub source_dtypes: BTreeMap<String, usize>,
    /// Layer file name -> "layer" or "metadata" schema.
    pub schemas: BTreeMap<String, &'static str>,
    pub links: LinkReport,
    /// Links dropped because one end was not imported.
    pub links_to_skipped: usize,
    /// Worst difference between imported and original logits, as a share of the logit's scale.
    pub worst_logit_error: f64,
    pub tolerance: f64,
}

/// Random inputs each probe is scored on, before and after import.
const CHECK_INPUTS: usize = 4;

/// Largest accepted logit difference, as a share of the logit's scale (|b3| + Σ|w3·a2|):
/// f32 only rounds the LayerNorm fold; bf16 rounds every weight to 8 significant bits.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::Bf16 => 2e-2,
    }
}

/// Imports a HatCat layout into a new pack at `out`.
pub fn import_hatcat(
    hierarchy_dir: &Path,
    lenses_dir: &Path,
    out: &Path,
    options: &ImportOptions,
    mut progress: impl FnMut(Phase, usize, usize),
) -> Result<ImportSummary, ImportError> {
    if out.join(crate::pack::manifest::MANIFEST_FILE).exists() {
        return Err(ImportError::OutputExists(out.into()));
    }
    if !lenses_dir.is_dir() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "lens directory not found");
        return Err(ImportError::Io { path: lenses_dir.into(), source });
    }
    let files = hatcat::read_hierarchy(hierarchy_dir)?;
    let (links, link_report) = resolve_links(&files);
    let concepts = &files.concepts;
    let label = |i: usize| format!("{}@{}", concepts[i].name, concepts[i].layer);

    let mut no_probe_file = Vec::new();
    let mut with_file = Vec::new();
    for (i, c) in concepts.iter().enumerate() {
        match find_probe_file(lenses_dir, &c.name, c.layer) {
            Some(path) => with_file.push((i, path)),
            None => no_probe_file.push(label(i)),
        }
    }

    // Pass 1: read and check every probe.
    let tol = tolerance(options.dtype);
    let mut bad = Vec::new();
    let mut good: Vec<(usize, PathBuf, Checked)> = Vec::new();
    let mut hidden_dim: Option<(usize, PathBuf)> = None;
    let mut worst = 0f64;
    let total = with_file.len();
    for (done, (i, path)) in with_file.into_iter().enumerate() {
        let checked = read_probe(&path).and_then(|p| {
            if let Some((d, first)) = &hidden_dim {
                if p.hidden_dim != *d {
                    let first = first.display();
                    return Err(format!(
                        "input width D={} but D={d} was set by the first probe, {first}",
                        p.hidden_dim
                    ));
                }
            }
            let err = check_logits(&p, options.dtype, &check_inputs(p.hidden_dim), false)?;
            if err > tol {
                return Err(format!(
                    "imported logits differ from the original by {err:.2e} of the logit's scale (tolerance {tol:.0e})"
                ));
            }
            Ok((p, err))
        });
        match checked {
            Ok((p, err)) => {
                worst = worst.max(err);
                hidden_dim.get_or_insert_with(|| (p.hidden_dim, path.clone()));
                // Keep only what the summary needs: the weights are read again when writing.
                let checked = Checked { layer_norm: p.layer_norm.is_some(), style: p.style, dtype: p.dtype };
                good.push((i, path, checked));
            }
            Err(reason) if options.skip_bad => bad.push(Skipped { concept: label(i), file: path, reason }),
            Err(reason) => return Err(ImportError::Probe { path, concept: label(i), reason }),
        }
        progress(Phase::Checking, done + 1, total);
    }

    // A pack shares one input normalization: LayerNorm probes and plain ones cannot mix.
    let with_ln = good.iter().filter(|(_, _, p)| p.layer_norm).count();
    let uses_ln = with_ln * 2 > good.len();
    if with_ln > 0 && with_ln < good.len() {
        let (odd, rest) = if uses_ln { ("has no", "with") } else { ("has an", "without") };
        let majority = if uses_ln { with_ln } else { good.len() - with_ln };
        let mut kept = Vec::with_capacity(good.len());
        for (i, path, p) in good {
            if p.layer_norm == uses_ln {
                kept.push((i, path, p));
                continue;
            }
            let reason = format!(
                "{odd} input LayerNorm, unlike the {majority} probes {rest} one (a pack shares one input normalization)"
            );
            if !options.skip_bad {
                return Err(ImportError::Probe { path, concept: label(i), reason });
            }
            bad.push(Skipped { concept: label(i), file: path, reason });
        }
        good = kept;
    }
    let Some((hidden_dim, _)) = hidden_dim.filter(|_| !good.is_empty()) else {
        let reason =
            format!("{} concepts, {} without a probe file, {} bad", concepts.len(), no_probe_file.len(), bad.len());
        return Err(ImportError::Nothing(reason));
    };

    // Concept ids: layer by layer, in the files' order within a layer.
    good.sort_by_key(|(i, _, _)| (concepts[*i].layer, *i));
    let kept: Vec<usize> = good.iter().map(|(i, _, _)| *i).collect();
    let (defs, links_to_skipped) = concept_defs(concepts, &kept, &links, hierarchy_dir)?;

    let mut summary = ImportSummary {
        out: out.into(),
        hidden_dim,
        dtype: options.dtype,
        input_normalization: if uses_ln { InputNormalization::LayerNorm } else { InputNormalization::None },
        per_layer: BTreeMap::new(),
        imported: good.len(),
        no_probe_file,
        bad,
        duplicates: files.duplicates,
        layer_norms_folded: if uses_ln { good.len() } else { 0 },
        key_styles: BTreeMap::new(),
        source_dtypes: BTreeMap::new(),
        schemas: files.schemas.clone(),
        links: link_report,
        links_to_skipped,
        worst_logit_error: worst,
        tolerance: tol,
    };
    for c in concepts {
        summary.per_layer.entry(c.layer).or_default().listed += 1;
    }
    for (i, _, p) in &good {
        summary.per_layer.entry(concepts[*i].layer).or_default().imported += 1;
        *summary.key_styles.entry(format!("{:?}", p.style).to_lowercase()).or_default() += 1;
        *summary.source_dtypes.entry(p.dtype.name().to_string()).or_default() += 1;
    }

    // Pass 2: stream the probes into the pack.
    let spec = PackSpec {
        hidden_dim,
        dtype: options.dtype,
        input_normalization: summary.input_normalization,
        probes_per_shard: options.probes_per_shard,
        concepts: defs,
        lenses: None,
    };
    // write_pack's source is infallible; a file that changed since pass 1 stops the write
    // through an io error, and the real reason is returned instead.
    let mut failure: Option<ImportError> = None;
    let n = good.len();
    let written = write_pack(
        out,
        &spec,
        |id| {
            let (i, path, _) = &good[id as usize];
            match read_probe(path) {
                Ok(p) if p.hidden_dim == hidden_dim => p.folded(),
                result => {
                    let reason = result.err().unwrap_or_else(|| "changed while importing".into());
                    failure.get_or_insert(ImportError::Probe { path: path.clone(), concept: label(*i), reason });
                    zero_weights(&ProbeLayout::new(hidden_dim, options.dtype))
                }
            }
        },
        |done| progress(Phase::Writing, done, n),
    );
    if let Some(e) = failure {
        let _ = std::fs::remove_file(out.join(crate::pack::manifest::MANIFEST_FILE));
        return Err(e);
    }
    written?;
    // The pack must open (and every probe decode) like any other.
    Pack::open(out)?;
    Ok(summary)
}

/// The pack's concepts: `kept` (indices into `concepts`, in new-id order) with the `links`
/// (parent, child index pairs) between them; returns them and the number of links dropped
/// because an end was not kept. A cycle is an error naming `hierarchy_dir`, before anything is
/// written.
pub(crate) fn concept_defs(
    concepts: &[hatcat::Concept],
    kept: &[usize],
    links: &BTreeSet<(usize, usize)>,
    hierarchy_dir: &Path,
) -> Result<(Vec<ConceptDef>, usize), ImportError> {
    let new_id: BTreeMap<usize, u32> = kept.iter().enumerate().map(|(id, &i)| (i, id as u32)).collect();
    let mut parents: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); kept.len()];
    let mut dropped = 0;
    for &(p, c) in links {
        match (new_id.get(&p), new_id.get(&c)) {
            (Some(&p), Some(&c)) => drop(parents[c as usize].insert(p)),
            _ => dropped += 1,
        }
    }
    let defs: Vec<ConceptDef> = kept
        .iter()
        .zip(parents)
        .map(|(&i, parents)| ConceptDef {
            name: concepts[i].name.clone(),
            layer: concepts[i].layer,
            parents: parents.into_iter().collect(),
        })
        .collect();
    // A cycle (possible with same-layer links) is reported before anything is written.
    Hierarchy::from_defs(&defs)
        .map_err(|e| ImportError::Hierarchy { path: hierarchy_dir.into(), reason: e.to_string() })?;
    Ok((defs, dropped))
}

pub(crate) fn read_probe(path: &Path) -> Result<TrainedProbe, String> {
    let tensors = torch_file::read_state_dict(path).map_err(|e| strip_path(&e.to_string(), path))?;
    trained_probe(tensors)
}

/// Error texts of the file layer start with the path; the import error adds it already.
fn strip_path(message: &str, path: &Path) -> String {
    let prefix = format!("{}: ", path.display());
    message.strip_prefix(&prefix).unwrap_or(message).to_string()
}

/// What pass 1 keeps of a good probe (its weights are read again in pass 2).
struct Checked {
    layer_norm: bool,
    style: hatcat::KeyStyle,
    dtype: torch_file::StoredDType,
}

/// Filler for a probe that failed in pass 2: the write finishes, then its manifest is removed,
/// so the directory never opens as a pack.
pub(crate) fn zero_weights(layout: &ProbeLayout) -> ProbeWeights {
    let [b1, w1, b2, w2, b3, w3] = layout.tensors().map(|t| vec![0f32; t.numel()]);
    ProbeWeights { w1, b1, w2, b2, w3, b3 }
}

/// The check's inputs: fixed N(0, 2²) vectors of width `d`.
pub(crate) fn check_inputs(d: usize) -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x1e5);
    (0..CHECK_INPUTS)
        .map(|_| (0..d).map(|_| 2.0 * Distribution::<f32>::sample(&StandardNormal, &mut rng)).collect())
        .collect()
}

/// Scores the original and the imported probe (as stored, in `dtype`, behind the pack's
/// normalization) on `inputs`; returns the worst difference as a share of the logit's scale.
/// `pre_norm`: the runtime that trained it layer-normalizes every hidden state before any probe
/// (headspace), so the original sees `LayerNorm(x)` and the pack normalizes whatever the probe.
pub(crate) fn check_logits(
    probe: &TrainedProbe,
    dtype: DType,
    inputs: &[Vec<f32>],
    pre_norm: bool,
) -> Result<f64, String> {
    let layout = ProbeLayout::new(probe.hidden_dim, dtype);
    let mut bytes = Vec::new();
    probe.folded().encode_into(&layout, &mut bytes);
    let stored = ProbeWeights::decode(&layout, &layout.canonical_offsets(), &bytes).expect("encoded by this layout");
    if let Some(v) = stored.in_layout_order().iter().flat_map(|t| t.iter()).find(|v| !v.is_finite()) {
        return Err(format!("a weight becomes {v} when stored as {dtype}"));
    }
    let mut worst = 0f64;
    for x in inputs {
        let seen: Vec<f32> = if pre_norm { crate::engine::layer_norm(x) } else { x.clone() };
        let (want, scale) = probe.logit(&seen);
        let input: Vec<f64> = if probe.layer_norm.is_some() || pre_norm {
            layer_norm_f64(x)
        } else {
            x.iter().map(|&v| v as f64).collect()
        };
        let (got, _) = stored.logit_f64(&input);
        worst = worst.max((want - got).abs() / scale.max(f64::MIN_POSITIVE));
    }
    Ok(worst)
}

impl fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let norm = match self.input_normalization {
            InputNormalization::None => "none",
            InputNormalization::LayerNorm => "layer_norm",
        };
        writeln!(
            f,
            "imported {} probes into {} (D={}, {}, input normalization: {norm})",
            self.imported,
            self.out.display(),
            self.hidden_dim,
            self.dtype
        )?;
        writeln!(f, "concepts per layer (imported / listed):")?;
        for (layer, c) in &self.per_layer {
            writeln!(f, "  layer {layer}: {} / {}", c.imported, c.listed)?;
        }
        let schemas: Vec<String> = self.schemas.iter().map(|(file, s)| format!("{file} ({s})")).collect();
        writeln!(f, "layer files: {}", schemas.join(", "))?;
        let counts =
            |m: &BTreeMap<String, usize>| m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
        writeln!(f, "key styles: {}; source dtypes: {}", counts(&self.key_styles), counts(&self.source_dtypes))?;
        writeln!(f, "LayerNorms folded into the first Linear: {}", self.layer_norms_folded)?;
        if self.duplicates > 0 {
            writeln!(f, "concepts listed twice (links merged): {}", self.duplicates)?;
        }
        writeln!(f, "skipped, no probe file: {}", self.no_probe_file.len())?;
        for c in &self.no_probe_file {
            writeln!(f, "  {c}")?;
        }
        writeln!(f, "skipped, bad probe file: {}", self.bad.len())?;
        for s in &self.bad {
            writeln!(f, "  {} ({}): {}", s.concept, s.file.display(), s.reason)?;
        }
        let l = &self.links;
        write!(f, "links: {} from {}", l.links, l.source)?;
        if l.source == "hierarchy.json" {
            writeln!(
                f,
                " (won where the files disagree): {} agreed with the layer files, {} only in hierarchy.json (kept), \
                 {} only in the layer files (dropped)",
                l.agreed, l.only_in_hierarchy_json, l.dropped_from_layer_files
            )?;
        } else {
            writeln!(
                f,
                " (no hierarchy.json; the union of both fields): {} stated by both sides, {} only by category_children, \
                 {} only by parent_concepts",
                l.agreed, l.only_in_category_children, l.only_in_parent_concepts
            )?;
        }
        if self.links_to_skipped > 0 {
            writeln!(f, "links dropped with skipped concepts: {}", self.links_to_skipped)?;
        }
        if !l.unresolved.is_empty() {
            writeln!(f, "link targets that match no concept: {}", l.unresolved.len())?;
            for u in l.unresolved.iter().take(20) {
                writeln!(f, "  {u}")?;
            }
        }
        write!(
            f,
            "logit check: worst difference {:.2e} of the logit's scale (tolerance {:.0e}) over {CHECK_INPUTS} random inputs per probe",
            self.worst_logit_error, self.tolerance
        )
    }
}
