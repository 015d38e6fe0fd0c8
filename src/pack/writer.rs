//! Writes packs: shards streamed probe by probe, then the manifest.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::error::PackError;
use super::layout::{DType, ProbeLayout, ProbeWeights};
use super::manifest::{
    Architecture, ConceptCalibration, ConceptEntry, InputNormalization, Manifest, PoleEntry, ProbeEntry, SimplexEntry,
    WeightsRef, CONCEPT_CALIBRATION_RULE, FORMAT_NAME, LENS_SCORE_RULE, MANIFEST_FILE,
};
use super::shard::write_header;

/// A concept to write: children are derived from the parents lists.
#[derive(Debug, Clone)]
pub struct ConceptDef {
    pub name: String,
    pub layer: u16,
    pub parents: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct PackSpec {
    pub hidden_dim: usize,
    pub dtype: DType,
    pub input_normalization: InputNormalization,
    /// Probes per shard file. Each shard is one safetensors file; see docs/pack-format.md.
    pub probes_per_shard: usize,
    pub concepts: Vec<ConceptDef>,
    /// `None`: a v1 pack, one probe per concept. `Some`: a v2 pack of lenses.
    pub lenses: Option<LensSpec>,
}

/// The lenses of a v2 pack: each concept's probes.
#[derive(Debug, Clone)]
pub struct LensSpec {
    /// Ascending, distinct.
    pub model_layers: Vec<u32>,
    /// `probes[c]` are concept c's probes, in the order the manifest lists them.
    pub probes: Vec<Vec<ProbeDef>>,
    /// `Some`: a concept-calibrated pack, `calibration[c]` being concept c's statistics
    /// (`None`: the neutral default). See docs/cascade-semantics.md, "Reported scores".
    pub calibration: Option<Vec<Option<ConceptCalibration>>>,
    /// Always-on simplex lenses (docs/cascade-semantics.md, "Simplex lenses"); their poles'
    /// probes take the ids after every lens probe.
    pub simplexes: Vec<SimplexDef>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeDef {
    pub model_layer: u32,
    pub quantiles: Option<Vec<f64>>,
}

impl PackSpec {
    pub fn layout(&self) -> ProbeLayout {
        ProbeLayout::new(self.hidden_dim, self.dtype)
    }

    /// Probes in id order: every lens's (in v1, every concept's), then every simplex pole's.
    fn probes(&self) -> Vec<Slot<'_>> {
        match &self.lenses {
            None => (0..self.concepts.len() as u32).map(Slot::Concept).collect(),
            Some(l) => l
                .probes
                .iter()
                .enumerate()
                .flat_map(|(c, list)| list.iter().map(move |p| Slot::Lens(c as u32, p)))
                .chain(
                    l.simplexes
                        .iter()
                        .enumerate()
                        .flat_map(|(s, def)| (0..def.poles.len()).map(move |k| Slot::Pole(s, k))),
                )
                .collect(),
        }
    }
}

/// Where a probe id's entry goes in the manifest.
#[derive(Clone, Copy)]
enum Slot<'a> {
    /// A v1 concept's one probe.
    Concept(u32),
    /// A probe of a v2 lens.
    Lens(u32, &'a ProbeDef),
    /// Pole `.1` of simplex `.0`.
    Pole(usize, usize),
}

/// A simplex lens to write: always-on poles, each one probe reading `model_layer`.
#[derive(Debug, Clone, PartialEq)]
pub struct SimplexDef {
    pub name: String,
    /// Pole names, in order (headspace's tripoles: positive, neutral, negative).
    pub poles: Vec<String>,
    /// One of the pack's model layers.
    pub model_layer: u32,
}

/// Writes a pack into `dir` (created if missing). `weights(id)` is called once per probe, in
/// probe id order (in v1, concept order); `progress(done)` after each probe.
pub fn write_pack(
    dir: &Path,
    spec: &PackSpec,
    mut weights: impl FnMut(u32) -> ProbeWeights,
    mut progress: impl FnMut(usize),
) -> Result<Manifest, PackError> {
    write_pack_with(dir, spec, |id, out, bytes| {
        weights(id).encode_into(&spec.layout(), bytes);
        out.write_all(bytes)?;
        progress(id as usize + 1);
        Ok(crc32fast::hash(bytes))
    })
}

/// Writes a pack whose shards have real headers but holes for data (sparse files): for
/// measuring how opening scales to packs far larger than this machine's disk. Checksums are 0.
pub fn write_sparse_pack(dir: &Path, spec: &PackSpec) -> Result<Manifest, PackError> {
    let len = spec.layout().byte_len() as u64;
    write_pack_with(dir, spec, |_, out, _| {
        out.flush()?;
        let file = out.get_mut();
        let pos = std::io::Seek::stream_position(file)?;
        file.set_len(pos + len)?;
        std::io::Seek::seek(file, std::io::SeekFrom::Start(pos + len))?;
        Ok(0)
    })
}

fn write_pack_with(
    dir: &Path,
    spec: &PackSpec,
    mut write_probe: impl FnMut(u32, &mut BufWriter<File>, &mut Vec<u8>) -> std::io::Result<u32>,
) -> Result<Manifest, PackError> {
    fs::create_dir_all(dir).map_err(|e| PackError::io(dir, e))?;
    let layout = spec.layout();
    let n = spec.concepts.len();
    if let Some(l) = &spec.lenses {
        if l.probes.len() != n {
            let reason = format!("{} concepts but probes for {}", n, l.probes.len());
            return Err(PackError::Unsupported { path: dir.into(), reason });
        }
        if let Some(c) = l.calibration.as_ref().filter(|c| c.len() != n) {
            let reason = format!("{} concepts but calibration for {}", n, c.len());
            return Err(PackError::Unsupported { path: dir.into(), reason });
        }
    }
    let mut children: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (i, c) in spec.concepts.iter().enumerate() {
        for &p in &c.parents {
            if let Some(list) = children.get_mut(p as usize) {
                list.push(i as u32);
            }
        }
    }
    let mut concepts: Vec<ConceptEntry> = spec
        .concepts
        .iter()
        .enumerate()
        .map(|(i, def)| {
            let mut parents = def.parents.clone();
            parents.sort_unstable();
            ConceptEntry {
                id: i as u32,
                name: def.name.clone(),
                layer: def.layer,
                parents,
                children: std::mem::take(&mut children[i]),
                weights: None,
                crc32: None,
                probes: spec.lenses.as_ref().map(|_| Vec::new()),
                calibration: spec.lenses.as_ref().and_then(|l| l.calibration.as_ref()).and_then(|c| c[i]),
            }
        })
        .collect();
    let probes = spec.probes();
    let mut simplexes: Vec<SimplexEntry> = spec
        .lenses
        .iter()
        .flat_map(|l| &l.simplexes)
        .map(|d| SimplexEntry { name: d.name.clone(), poles: Vec::new() })
        .collect();
    let per_shard = spec.probes_per_shard.max(1);
    let mut shards = Vec::new();
    let mut bytes = Vec::with_capacity(layout.byte_len());
    for (shard_index, first) in (0..probes.len()).step_by(per_shard).enumerate() {
        let ids: Vec<u32> = (first as u32..(first + per_shard).min(probes.len()) as u32).collect();
        let file_name = format!("weights-{shard_index:05}.safetensors");
        let path: PathBuf = dir.join(&file_name);
        let io = |e| PackError::io(&path, e);
        let mut out = BufWriter::with_capacity(4 << 20, File::create(&path).map_err(io)?);
        let offsets = write_header(&mut out, &layout, &ids).map_err(io)?;
        for (&id, &offset) in ids.iter().zip(&offsets) {
            let crc32 = write_probe(id, &mut out, &mut bytes).map_err(io)?;
            let weights = WeightsRef { shard: shard_index as u32, offset, length: layout.byte_len() as u64 };
            match probes[id as usize] {
                Slot::Concept(c) => {
                    concepts[c as usize].weights = Some(weights);
                    concepts[c as usize].crc32 = Some(crc32);
                }
                Slot::Lens(c, def) => concepts[c as usize].probes.get_or_insert_with(Vec::new).push(ProbeEntry {
                    id,
                    model_layer: def.model_layer,
                    weights,
                    crc32,
                    quantiles: def.quantiles.clone(),
                }),
                Slot::Pole(s, k) => {
                    let def = &spec.lenses.as_ref().expect("poles are v2").simplexes[s];
                    simplexes[s].poles.push(PoleEntry {
                        pole: def.poles[k].clone(),
                        id,
                        model_layer: def.model_layer,
                        weights,
                        crc32,
                    });
                }
            }
        }
        out.flush().map_err(io)?;
        shards.push(file_name);
    }
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: if spec.lenses.is_some() { 2 } else { 1 },
        hidden_dim: spec.hidden_dim,
        dtype: spec.dtype,
        architecture: Architecture::v1(),
        input_normalization: spec.input_normalization,
        model_layers: spec.lenses.as_ref().map(|l| l.model_layers.clone()),
        lens_score: spec.lenses.as_ref().map(|_| LENS_SCORE_RULE.to_string()),
        concept_calibration: spec
            .lenses
            .as_ref()
            .and_then(|l| l.calibration.as_ref())
            .map(|_| CONCEPT_CALIBRATION_RULE.to_string()),
        shards,
        concepts,
        simplexes: spec.lenses.as_ref().filter(|l| !l.simplexes.is_empty()).map(|_| simplexes),
    };
    write_manifest(dir, &manifest)?;
    Ok(manifest)
}

/// Writes `manifest.json`: one concept per line, so diffs and `grep` stay useful.
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), PackError> {
    let path = dir.join(MANIFEST_FILE);
    let io = |e| PackError::io(&path, e);
    let mut out = BufWriter::new(File::create(&path).map_err(io)?);
    let head = serde_json::json!({
        "format": manifest.format,
        "format_version": manifest.format_version,
        "hidden_dim": manifest.hidden_dim,
        "dtype": manifest.dtype,
        "architecture": manifest.architecture,
        "input_normalization": manifest.input_normalization,
    });
    let mut head = head;
    if let (Some(layers), Some(rule)) = (&manifest.model_layers, &manifest.lens_score) {
        head["model_layers"] = serde_json::json!(layers);
        head["lens_score"] = serde_json::json!(rule);
    }
    if let Some(rule) = &manifest.concept_calibration {
        head["concept_calibration"] = serde_json::json!(rule);
    }
    head["shards"] = serde_json::json!(manifest.shards);
    let head = serde_json::to_string(&head).expect("manifest header serializes");
    let mut text = String::with_capacity(manifest.concepts.len() * 160 + head.len());
    text.push_str(&head[..head.len() - 1]);
    text.push_str(",\"concepts\":[\n");
    for (i, c) in manifest.concepts.iter().enumerate() {
        text.push_str(&serde_json::to_string(c).expect("concept entry serializes"));
        text.push_str(if i + 1 < manifest.concepts.len() { ",\n" } else { "\n" });
    }
    text.push(']');
    if let Some(list) = &manifest.simplexes {
        text.push_str(",\"simplexes\":[\n");
        for (i, s) in list.iter().enumerate() {
            text.push_str(&serde_json::to_string(s).expect("simplex entry serializes"));
            text.push_str(if i + 1 < list.len() { ",\n" } else { "\n" });
        }
        text.push(']');
    }
    text.push_str("}\n");
    out.write_all(text.as_bytes()).map_err(io)?;
    out.flush().map_err(io)
}
