//! Probe packs: a directory with `manifest.json` and safetensors shards (formats v1 and v2,
//! docs/pack-format.md). Opening reads metadata only: the manifest and each shard's header.
//!
//! Two kinds of index: a [`ConceptId`] is a node of the hierarchy (a *lens*, in headspace's
//! words), which the cascade ranks, expands and prunes; a [`ProbeId`] is one MLP, the unit
//! that is stored, read, cached and scored. In a v1 pack each concept has one probe with the
//! same index; in v2 a concept lists its probes (one per model layer it reads).

mod error;
pub mod hierarchy;
pub mod layout;
pub mod manifest;
pub mod shard;
pub mod writer;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

pub use error::PackError;
pub use hierarchy::{ConceptId, Hierarchy};
pub use layout::{DType, ProbeLayout, ProbeWeights, TensorOffsets};
pub use manifest::{ConceptCalibration, InputNormalization, Manifest, LENS_SCORE_RULE, MANIFEST_FILE};

pub use writer::{write_pack, write_sparse_pack, ConceptDef, LensSpec, PackSpec, ProbeDef, SimplexDef};

use manifest::{Architecture, ProbeEntry, WeightsRef, CONCEPT_CALIBRATION_RULE, FORMAT_NAME, FORMAT_VERSION};
use shard::ShardHeader;

/// Where one probe's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeLocation {
    pub shard: u32,
    pub offset: u64,
    pub length: u64,
    pub crc32: u32,
}

/// Dense probe index: probes are numbered in concept order, then in the order each concept
/// lists them. In a v1 pack `ProbeId(i)` is concept `i`'s one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeId(pub u32);

impl ProbeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The probe of a concept in a pack of one probe per concept (see
    /// [`Pack::one_probe_per_concept`]), where the two indices coincide.
    pub fn sole(concept: ConceptId) -> ProbeId {
        ProbeId(concept.0)
    }
}

/// A dense index (concepts, probes): what id sets are keyed by.
pub trait DenseId: Copy {
    fn index(self) -> usize;
    fn from_index(i: usize) -> Self;
}

impl DenseId for ConceptId {
    fn index(self) -> usize {
        self.0 as usize
    }
    fn from_index(i: usize) -> Self {
        ConceptId(i as u32)
    }
}

impl DenseId for ProbeId {
    fn index(self) -> usize {
        self.0 as usize
    }
    fn from_index(i: usize) -> Self {
        ProbeId(i as u32)
    }
}

/// What the pack says of one probe.
#[derive(Debug, Clone, Copy)]
pub struct ProbeInfo {
    /// The lens it belongs to; [`NO_CONCEPT`] for a simplex pole's probe.
    pub concept: ConceptId,
    /// The model layer it reads (0 in v1 packs, which name none).
    pub model_layer: u32,
    /// Position of `model_layer` in [`Pack::model_layers`]: which of the observation's hidden
    /// states it reads (0 in v1 packs).
    pub state: u16,
    pub location: ProbeLocation,
    quantiles: (u32, u32),
}

/// The `concept` of a simplex pole's probe, which belongs to no lens.
pub const NO_CONCEPT: ConceptId = ConceptId(u32::MAX);

/// One always-on simplex lens: its name and its poles' names and probes.
#[derive(Debug, Clone, PartialEq)]
pub struct SimplexInfo {
    pub name: String,
    pub poles: Vec<(String, ProbeId)>,
}

#[derive(Debug, Clone)]
pub struct ShardFile {
    pub path: PathBuf,
    pub size: u64,
}

/// An open, validated pack.
#[derive(Debug)]
pub struct Pack {
    dir: PathBuf,
    layout: ProbeLayout,
    input_normalization: InputNormalization,
    hierarchy: Hierarchy,
    format_version: u32,
    /// v2's model layers, ascending (empty in v1: the observation is one unnamed state).
    model_layers: Vec<u32>,
    probes: Vec<ProbeInfo>,
    /// `probe_starts[c]..probe_starts[c + 1]` are concept c's probes.
    probe_starts: Vec<u32>,
    /// Every probe's quantiles, back to back (`ProbeInfo::quantiles` is a start and a length).
    quantiles: Vec<f64>,
    /// A concept-calibrated pack's statistics, per concept (the neutral default where the
    /// manifest gives none); `None` in packs without `concept_calibration`.
    concept_calibration: Option<Vec<ConceptCalibration>>,
    /// Simplex lenses; their poles' probes are the last of `probes`.
    simplexes: Vec<SimplexInfo>,
    tensor_offsets: Vec<TensorOffsets>,
    shards: Vec<ShardFile>,
}

impl Pack {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, PackError> {
        let dir = dir.as_ref().to_path_buf();
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read(&manifest_path).map_err(|e| PackError::io(&manifest_path, e))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|source| PackError::ManifestSyntax { path: manifest_path.clone(), source })?;
        drop(text);
        let unsupported = |reason: String| PackError::Unsupported { path: manifest_path.clone(), reason };
        if manifest.format != FORMAT_NAME {
            return Err(unsupported(format!("format is `{}`, expected `{FORMAT_NAME}`", manifest.format)));
        }
        if !(1..=FORMAT_VERSION).contains(&manifest.format_version) {
            return Err(unsupported(format!(
                "format_version {} is not supported (this build reads 1 to {FORMAT_VERSION})",
                manifest.format_version
            )));
        }
        if manifest.architecture != Architecture::v1() {
            return Err(unsupported(format!(
                "architecture {:?} is not supported (v1 is {:?})",
                manifest.architecture,
                Architecture::v1()
            )));
        }
        if manifest.hidden_dim == 0 || manifest.hidden_dim > 1 << 20 {
            return Err(unsupported(format!("hidden_dim {} is out of range 1..=1048576", manifest.hidden_dim)));
        }
        for s in &manifest.shards {
            let p = Path::new(s);
            if s.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(unsupported(format!("shard path `{s}` must be relative, inside the pack")));
            }
        }
        let hierarchy = Hierarchy::build(&manifest.concepts, &manifest_path)?;
        let layout = ProbeLayout::new(manifest.hidden_dim, manifest.dtype);

        let probes = probe_table(&manifest, &hierarchy, &manifest_path)?;
        let mut by_shard: Vec<Vec<u32>> = vec![Vec::new(); manifest.shards.len()];
        for (i, p) in probes.probes.iter().enumerate() {
            let Some(list) = by_shard.get_mut(p.location.shard as usize) else {
                return Err(PackError::BadConcept {
                    path: manifest_path.clone(),
                    concept: probe_label(&hierarchy, &probes.simplexes, probes.versioned, ProbeId(i as u32), p),
                    reason: format!("shard {} does not exist ({} shards)", p.location.shard, manifest.shards.len()),
                });
            };
            list.push(i as u32);
        }
        let ProbeTable { probes, probe_starts, quantiles, model_layers, simplexes, .. } = probes;
        let concept_calibration = concept_calibration(&manifest, &hierarchy, &manifest_path)?;
        let mut tensor_offsets = vec![layout.canonical_offsets(); probes.len()];
        let mut shards = Vec::with_capacity(manifest.shards.len());
        for (name, ids) in manifest.shards.iter().zip(&by_shard) {
            let path = dir.join(name);
            let mut file = File::open(&path).map_err(|e| PackError::io(&path, e))?;
            let size = file.metadata().map_err(|e| PackError::io(&path, e))?.len();
            let header = ShardHeader::read(&path, &mut file)?;
            for &id in ids {
                let loc = probes[id as usize].location;
                let label = || {
                    let p = &probes[id as usize];
                    probe_label(&hierarchy, &simplexes, manifest.format_version > 1, ProbeId(id), p)
                };
                tensor_offsets[id as usize] = header.check_probe(&path, &label, id, &layout, loc.offset, loc.length)?;
                let end = loc.offset + loc.length;
                if end > size {
                    return Err(PackError::Truncated { path, concept: label(), start: loc.offset, end, size });
                }
            }
            shards.push(ShardFile { path, size });
        }
        Ok(Pack {
            dir,
            layout,
            input_normalization: manifest.input_normalization,
            hierarchy,
            format_version: manifest.format_version,
            model_layers,
            probes,
            probe_starts,
            quantiles,
            concept_calibration,
            simplexes,
            tensor_offsets,
            shards,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn layout(&self) -> ProbeLayout {
        self.layout
    }
    pub fn hidden_dim(&self) -> usize {
        self.layout.hidden_dim
    }
    pub fn dtype(&self) -> DType {
        self.layout.dtype
    }
    pub fn input_normalization(&self) -> InputNormalization {
        self.input_normalization
    }
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }
    pub fn len(&self) -> usize {
        self.hierarchy.len()
    }
    pub fn is_empty(&self) -> bool {
        self.hierarchy.is_empty()
    }
    pub fn format_version(&self) -> u32 {
        self.format_version
    }
    /// The model layers the probes read, ascending: an observation gives one hidden state for
    /// each, in this order. Empty for a v1 pack, whose observation is one unnamed state.
    pub fn model_layers(&self) -> &[u32] {
        &self.model_layers
    }
    /// How many hidden states an observation must give: one per model layer, at least one.
    pub fn hidden_states(&self) -> usize {
        self.model_layers.len().max(1)
    }
    /// Every probe: the lenses', then the simplex poles'.
    pub fn probe_count(&self) -> usize {
        self.probes.len()
    }
    /// The lenses' probes (ids `0..lens_probe_count()`).
    pub fn lens_probe_count(&self) -> usize {
        *self.probe_starts.last().unwrap_or(&0) as usize
    }
    /// The always-on simplex lenses, in the manifest's order.
    pub fn simplexes(&self) -> &[SimplexInfo] {
        &self.simplexes
    }
    /// Every simplex pole's probe, simplex by simplex, pole by pole (ascending ids).
    pub fn pole_probes(&self) -> impl ExactSizeIterator<Item = ProbeId> + Clone {
        (self.lens_probe_count() as u32..self.probes.len() as u32).map(ProbeId)
    }
    /// Concept `id`'s probes.
    pub fn probes_of(&self, id: ConceptId) -> impl ExactSizeIterator<Item = ProbeId> + Clone {
        (self.probe_starts[id.index()]..self.probe_starts[id.index() + 1]).map(ProbeId)
    }
    pub fn probe(&self, id: ProbeId) -> &ProbeInfo {
        &self.probes[id.index()]
    }
    /// The probe's calibration quantiles, where the pack has them.
    pub fn quantiles(&self, id: ProbeId) -> Option<&[f64]> {
        let (start, len) = self.probes[id.index()].quantiles;
        (len > 0).then(|| &self.quantiles[start as usize..(start + len) as usize])
    }
    /// Whether any probe carries calibration quantiles (headspace's `calibrated`).
    pub fn calibrated(&self) -> bool {
        !self.quantiles.is_empty()
    }
    /// Concept `id`'s calibration statistics in a concept-calibrated pack (the neutral default
    /// for a lens the pack gives none); `None` in other packs.
    pub fn concept_calibration(&self, id: ConceptId) -> Option<&ConceptCalibration> {
        self.concept_calibration.as_ref().map(|c| &c[id.index()])
    }
    /// Whether reported scores go through per-concept calibration (headspace's older
    /// `calibration.json`; docs/cascade-semantics.md, "Reported scores").
    pub fn concept_calibrated(&self) -> bool {
        self.concept_calibration.is_some()
    }
    /// How many lenses carry calibration statistics of their own.
    pub fn concept_calibration_count(&self) -> usize {
        self.concept_calibration.as_ref().map_or(0, |c| c.iter().filter(|c| **c != ConceptCalibration::NEUTRAL).count())
    }
    /// The most probes any lens has (1 in a v1 pack).
    pub fn max_probes_per_lens(&self) -> usize {
        self.probe_starts.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(1)
    }
    /// Whether every concept has exactly one probe and there are no others (then
    /// `ProbeId::sole` maps between them).
    pub fn one_probe_per_concept(&self) -> bool {
        self.probes.len() == self.hierarchy.len()
    }
    /// The probe as errors name it: `name@layer`, and in v2 `name@layer (model layer m)`; a
    /// simplex pole's as `simplex name/pole (model layer m)`.
    pub fn probe_label(&self, id: ProbeId) -> String {
        probe_label(&self.hierarchy, &self.simplexes, self.format_version > 1, id, &self.probes[id.index()])
    }
    pub fn location(&self, id: ProbeId) -> ProbeLocation {
        self.probes[id.index()].location
    }
    /// Where each of the probe's tensors starts within its bytes (writers choose the order).
    pub fn tensor_offsets(&self, id: ProbeId) -> TensorOffsets {
        self.tensor_offsets[id.index()]
    }
    pub fn shards(&self) -> &[ShardFile] {
        &self.shards
    }
    pub fn shard_of(&self, id: ProbeId) -> &ShardFile {
        &self.shards[self.probes[id.index()].location.shard as usize]
    }
    /// Heap bytes held by the open pack (indices, locations, paths).
    pub fn heap_bytes(&self) -> usize {
        self.hierarchy.heap_bytes()
            + self.probes.capacity() * std::mem::size_of::<ProbeInfo>()
            + self.probe_starts.capacity() * 4
            + self.quantiles.capacity() * 8
            + self.concept_calibration.as_ref().map_or(0, |c| c.capacity() * std::mem::size_of::<ConceptCalibration>())
            + self.tensor_offsets.capacity() * std::mem::size_of::<TensorOffsets>()
            + self.shards.iter().map(|s| s.path.as_os_str().len() + std::mem::size_of::<ShardFile>()).sum::<usize>()
    }

    /// Reads one probe's bytes with a single positioned read and checks its CRC.
    pub fn read_probe(&self, id: ProbeId) -> Result<Vec<u8>, PackError> {
        let shard = self.shard_of(id);
        let file = File::open(&shard.path).map_err(|e| PackError::io(&shard.path, e))?;
        let mut buf = Vec::new();
        self.read_probe_from(&file, id, &mut buf)?;
        Ok(buf)
    }

    /// Like [`Pack::read_probe`] into a reused buffer, from an already open shard file.
    pub fn read_probe_from(&self, file: &File, id: ProbeId, buf: &mut Vec<u8>) -> Result<(), PackError> {
        let loc = self.location(id);
        let shard = &self.shards[loc.shard as usize];
        buf.resize(loc.length as usize, 0);
        file.read_exact_at(buf, loc.offset).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => PackError::Truncated {
                path: shard.path.clone(),
                concept: self.probe_label(id),
                start: loc.offset,
                end: loc.offset + loc.length,
                size: file.metadata().map(|m| m.len()).unwrap_or(0),
            },
            _ => PackError::io(&shard.path, e),
        })?;
        self.check_crc(id, buf)
    }

    pub fn check_crc(&self, id: ProbeId, bytes: &[u8]) -> Result<(), PackError> {
        let loc = self.location(id);
        let actual = crc32fast::hash(bytes);
        if actual != loc.crc32 {
            return Err(PackError::Checksum {
                path: self.shards[loc.shard as usize].path.clone(),
                concept: self.probe_label(id),
                expected: loc.crc32,
                actual,
            });
        }
        Ok(())
    }

    /// The error for a read that returned `got` bytes of a probe's length.
    pub fn short_read_error(&self, id: ProbeId, got: usize) -> PackError {
        let loc = self.location(id);
        PackError::ShortRead {
            path: self.shards[loc.shard as usize].path.clone(),
            concept: self.probe_label(id),
            offset: loc.offset,
            got,
            want: loc.length,
        }
    }

    /// The error for a failed read of a probe's bytes: truncation when the file ended early.
    pub fn read_error(&self, id: ProbeId, e: std::io::Error) -> PackError {
        let loc = self.location(id);
        let path = self.shards[loc.shard as usize].path.clone();
        let concept = self.probe_label(id);
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => PackError::Truncated {
                size: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                path,
                concept,
                start: loc.offset,
                end: loc.offset + loc.length,
            },
            _ => PackError::Read { path, concept, source: e },
        }
    }

    /// Decodes checked bytes to f32 weights, rejecting NaN and infinities.
    pub fn decode_probe(&self, id: ProbeId, bytes: &[u8]) -> Result<ProbeWeights, PackError> {
        let path = || self.shard_of(id).path.clone();
        let weights = ProbeWeights::decode(&self.layout, &self.tensor_offsets[id.index()], bytes).ok_or_else(|| {
            PackError::BadTensor {
                path: path(),
                concept: self.probe_label(id),
                tensor: "(all)".into(),
                reason: format!("{} bytes, expected {}", bytes.len(), self.layout.byte_len()),
            }
        })?;
        for (values, slot) in weights.in_layout_order().into_iter().zip(self.layout.tensors()) {
            if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(PackError::NonFinite {
                    path: path(),
                    concept: self.probe_label(id),
                    tensor: slot.key,
                    index,
                    value,
                });
            }
        }
        Ok(weights)
    }

    /// Reads every probe and checks its checksum and values; returns every defect found.
    pub fn verify(&self, mut progress: impl FnMut(usize)) -> Vec<PackError> {
        let mut defects = Vec::new();
        let mut buf = Vec::new();
        let mut done = 0;
        for (shard_index, shard) in self.shards.iter().enumerate() {
            let ids = (0..self.probes.len() as u32)
                .map(ProbeId)
                .filter(|&id| self.probes[id.index()].location.shard as usize == shard_index);
            let file = match File::open(&shard.path) {
                Ok(f) => f,
                Err(e) => {
                    defects.push(PackError::io(&shard.path, e));
                    continue;
                }
            };
            for id in ids {
                if let Err(e) = self.read_probe_from(&file, id, &mut buf).and_then(|_| self.decode_probe(id, &buf)) {
                    defects.push(e);
                }
                done += 1;
                progress(done);
            }
        }
        defects
    }
}

fn probe_label(
    hierarchy: &Hierarchy,
    simplexes: &[SimplexInfo],
    versioned: bool,
    id: ProbeId,
    p: &ProbeInfo,
) -> String {
    if p.concept == NO_CONCEPT {
        let (s, pole) = simplexes
            .iter()
            .find_map(|s| s.poles.iter().find(|(_, q)| *q == id).map(|(pole, _)| (&s.name, pole)))
            .expect("every pole probe is listed");
        return format!("simplex {s}/{pole} (model layer {})", p.model_layer);
    }
    let concept = hierarchy.label(p.concept);
    if versioned {
        format!("{concept} (model layer {})", p.model_layer)
    } else {
        concept
    }
}

struct ProbeTable {
    versioned: bool,
    simplexes: Vec<SimplexInfo>,
    model_layers: Vec<u32>,
    probes: Vec<ProbeInfo>,
    probe_starts: Vec<u32>,
    quantiles: Vec<f64>,
}

/// The probe table of a v1 or v2 manifest, checked: each version's fields and no other's, a
/// probe per lens at least and per model layer at most, model layers the pack lists, dense
/// probe ids, and quantiles that can calibrate (finite, non-decreasing, at least two).
fn probe_table(manifest: &Manifest, hierarchy: &Hierarchy, path: &Path) -> Result<ProbeTable, PackError> {
    let v2 = manifest.format_version > 1;
    let unsupported = |reason: String| PackError::Unsupported { path: path.into(), reason };
    let model_layers = match (&manifest.model_layers, &manifest.lens_score) {
        (None, None) if !v2 => Vec::new(),
        (Some(layers), Some(rule)) if v2 => {
            if rule != LENS_SCORE_RULE {
                return Err(unsupported(format!("lens_score `{rule}` is not supported (v2 has `{LENS_SCORE_RULE}`)")));
            }
            if layers.is_empty() || layers.windows(2).any(|w| w[0] >= w[1]) {
                return Err(unsupported(format!("model_layers {layers:?} must be non-empty, ascending and distinct")));
            }
            if layers.len() > u16::MAX as usize {
                return Err(unsupported(format!("{} model layers is too many", layers.len())));
            }
            layers.clone()
        }
        _ if v2 => return Err(unsupported("a v2 manifest needs `model_layers` and `lens_score`".into())),
        _ => return Err(unsupported("`model_layers` and `lens_score` are v2 fields; this manifest is v1".into())),
    };
    let mut table = ProbeTable {
        versioned: v2,
        model_layers,
        probes: Vec::with_capacity(manifest.concepts.len()),
        probe_starts: Vec::with_capacity(manifest.concepts.len() + 1),
        quantiles: Vec::new(),
        simplexes: Vec::new(),
    };
    table.probe_starts.push(0);
    for c in &manifest.concepts {
        let concept = ConceptId(c.id);
        let bad =
            |reason: String| PackError::BadConcept { path: path.into(), concept: hierarchy.label(concept), reason };
        let location =
            |w: WeightsRef, crc32| ProbeLocation { shard: w.shard, offset: w.offset, length: w.length, crc32 };
        match (c.weights, c.crc32, &c.probes) {
            (Some(w), Some(crc32), None) if !v2 => table.probes.push(ProbeInfo {
                concept,
                model_layer: 0,
                state: 0,
                location: location(w, crc32),
                quantiles: (0, 0),
            }),
            (None, None, Some(list)) if v2 => {
                if list.is_empty() {
                    return Err(bad("lists no probes: a lens needs at least one".into()));
                }
                for (k, p) in list.iter().enumerate() {
                    let ProbeEntry { id, model_layer, weights, crc32, quantiles } = p;
                    let want = table.probes.len() as u32;
                    if *id != want {
                        return Err(bad(format!(
                            "probe {k} has id {id}, but probe ids are dense in concept order (expected {want})"
                        )));
                    }
                    let Ok(state) = table.model_layers.binary_search(model_layer) else {
                        return Err(bad(format!(
                            "probe {id} reads model layer {model_layer}, which is not in the pack's model_layers {:?}",
                            table.model_layers
                        )));
                    };
                    if list[..k].iter().any(|q| q.model_layer == *model_layer) {
                        return Err(bad(format!("lists two probes of model layer {model_layer}")));
                    }
                    let start = table.quantiles.len() as u32;
                    if let Some(q) = quantiles {
                        check_quantiles(q)
                            .map_err(|why| bad(format!("probe {id} (model layer {model_layer}): {why}")))?;
                        table.quantiles.extend_from_slice(q);
                    }
                    table.probes.push(ProbeInfo {
                        concept,
                        model_layer: *model_layer,
                        state: state as u16,
                        location: location(*weights, *crc32),
                        quantiles: (start, table.quantiles.len() as u32 - start),
                    });
                }
            }
            _ if v2 => return Err(bad("a v2 concept lists `probes` (and no `weights` or `crc32`)".into())),
            _ => return Err(bad("a v1 concept has `weights` and `crc32` (and no `probes`)".into())),
        }
        if table.probes.len() > u32::MAX as usize / 2 {
            return Err(unsupported(format!("{} probes is too many", table.probes.len())));
        }
        table.probe_starts.push(table.probes.len() as u32);
    }
    simplex_table(manifest, &mut table, path)?;
    Ok(table)
}

/// A v2 manifest's simplexes, checked and appended to the probe table: named and distinct, at
/// least one pole each with distinct names, probe ids continuing the lenses' densely, model
/// layers the pack lists.
fn simplex_table(manifest: &Manifest, table: &mut ProbeTable, path: &Path) -> Result<(), PackError> {
    let Some(list) = &manifest.simplexes else { return Ok(()) };
    let unsupported = |reason: String| PackError::Unsupported { path: path.into(), reason };
    if !table.versioned {
        return Err(unsupported("`simplexes` is a v2 field; this manifest is v1".into()));
    }
    for (i, s) in list.iter().enumerate() {
        let bad = |reason: String| unsupported(format!("simplex {:?}: {reason}", s.name));
        if s.name.is_empty() || list[..i].iter().any(|t| t.name == s.name) {
            return Err(bad("simplex names must be non-empty and distinct".into()));
        }
        if s.poles.is_empty() {
            return Err(bad("lists no poles: a simplex needs at least one".into()));
        }
        let mut poles = Vec::with_capacity(s.poles.len());
        for (k, p) in s.poles.iter().enumerate() {
            if p.pole.is_empty() || s.poles[..k].iter().any(|q| q.pole == p.pole) {
                return Err(bad("pole names must be non-empty and distinct".into()));
            }
            let want = table.probes.len() as u32;
            if p.id != want {
                return Err(bad(format!(
                    "pole {:?} has probe id {}, but pole ids follow every lens probe's densely (expected {want})",
                    p.pole, p.id
                )));
            }
            let Ok(state) = table.model_layers.binary_search(&p.model_layer) else {
                return Err(bad(format!(
                    "pole {:?} reads model layer {}, which is not in the pack's model_layers {:?}",
                    p.pole, p.model_layer, table.model_layers
                )));
            };
            table.probes.push(ProbeInfo {
                concept: NO_CONCEPT,
                model_layer: p.model_layer,
                state: state as u16,
                location: ProbeLocation {
                    shard: p.weights.shard,
                    offset: p.weights.offset,
                    length: p.weights.length,
                    crc32: p.crc32,
                },
                quantiles: (0, 0),
            });
            poles.push((p.pole.clone(), ProbeId(p.id)));
        }
        table.simplexes.push(SimplexInfo { name: s.name.clone(), poles });
    }
    if table.probes.len() > u32::MAX as usize / 2 {
        return Err(unsupported(format!("{} probes is too many", table.probes.len())));
    }
    Ok(())
}

/// A v2 manifest's per-concept calibration, checked: the one rule, entries only where the pack
/// states it, finite statistics.
fn concept_calibration(
    manifest: &Manifest,
    hierarchy: &Hierarchy,
    path: &Path,
) -> Result<Option<Vec<ConceptCalibration>>, PackError> {
    let unsupported = |reason: String| PackError::Unsupported { path: path.into(), reason };
    match &manifest.concept_calibration {
        None => {
            if let Some(c) = manifest.concepts.iter().find(|c| c.calibration.is_some()) {
                return Err(PackError::BadConcept {
                    path: path.into(),
                    concept: hierarchy.label(ConceptId(c.id)),
                    reason: "has `calibration`, but the pack states no `concept_calibration` rule".into(),
                });
            }
            Ok(None)
        }
        Some(_) if manifest.format_version < 2 => {
            Err(unsupported("`concept_calibration` is a v2 field; this manifest is v1".into()))
        }
        Some(rule) if rule != CONCEPT_CALIBRATION_RULE => Err(unsupported(format!(
            "concept_calibration `{rule}` is not supported (v2 has `{CONCEPT_CALIBRATION_RULE}`)"
        ))),
        Some(_) => manifest
            .concepts
            .iter()
            .map(|c| {
                let cal = c.calibration.unwrap_or(ConceptCalibration::NEUTRAL);
                cal.check().map(|_| cal).map_err(|why| PackError::BadConcept {
                    path: path.into(),
                    concept: hierarchy.label(ConceptId(c.id)),
                    reason: format!("calibration: {why}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
    }
}

/// Why quantiles cannot calibrate a probe, if they cannot.
pub fn check_quantiles(q: &[f64]) -> Result<(), String> {
    if q.len() < 2 {
        return Err(format!("{} quantiles; calibration needs at least 2", q.len()));
    }
    if let Some((i, v)) = q.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(format!("quantile {i} is {v}, not finite"));
    }
    if let Some(i) = q.windows(2).position(|w| w[1] < w[0]) {
        return Err(format!("quantiles are not non-decreasing: [{i}] = {} > [{}] = {}", q[i], i + 1, q[i + 1]));
    }
    Ok(())
}
