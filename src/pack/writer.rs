//! Writes packs: shards streamed probe by probe, then the manifest.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::error::PackError;
use super::layout::{DType, ProbeLayout, ProbeWeights};
use super::manifest::{
    Architecture, ConceptEntry, InputNormalization, Manifest, ProbeEntry, WeightsRef, FORMAT_NAME, LENS_SCORE_RULE,
    MANIFEST_FILE,
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

    /// Probes in id order, each with its concept and its definition (`None` in v1).
    fn probes(&self) -> Vec<(u32, Option<&ProbeDef>)> {
        match &self.lenses {
            None => (0..self.concepts.len() as u32).map(|c| (c, None)).collect(),
            Some(l) => l
                .probes
                .iter()
                .enumerate()
                .flat_map(|(c, list)| list.iter().map(move |p| (c as u32, Some(p))))
                .collect(),
        }
    }
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
            }
        })
        .collect();
    let probes = spec.probes();
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
            let (concept, def) = probes[id as usize];
            let entry = &mut concepts[concept as usize];
            match (def, &mut entry.probes) {
                (Some(def), Some(list)) => list.push(ProbeEntry {
                    id,
                    model_layer: def.model_layer,
                    weights,
                    crc32,
                    quantiles: def.quantiles.clone(),
                }),
                _ => {
                    entry.weights = Some(weights);
                    entry.crc32 = Some(crc32);
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
        shards,
        concepts,
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
    head["shards"] = serde_json::json!(manifest.shards);
    let head = serde_json::to_string(&head).expect("manifest header serializes");
    let mut text = String::with_capacity(manifest.concepts.len() * 160 + head.len());
    text.push_str(&head[..head.len() - 1]);
    text.push_str(",\"concepts\":[\n");
    for (i, c) in manifest.concepts.iter().enumerate() {
        text.push_str(&serde_json::to_string(c).expect("concept entry serializes"));
        text.push_str(if i + 1 < manifest.concepts.len() { ",\n" } else { "\n" });
    }
    text.push_str("]}\n");
    out.write_all(text.as_bytes()).map_err(io)?;
    out.flush().map_err(io)
}
