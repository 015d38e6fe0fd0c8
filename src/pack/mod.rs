//! Probe packs: a directory with `manifest.json` and safetensors shards (format v1,
//! docs/pack-format.md). Opening reads metadata only: the manifest and each shard's header.

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
pub use manifest::{InputNormalization, Manifest, MANIFEST_FILE};
pub use writer::{write_pack, write_sparse_pack, ConceptDef, PackSpec};

use manifest::{Architecture, FORMAT_NAME, FORMAT_VERSION};
use shard::ShardHeader;

/// Where one probe's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeLocation {
    pub shard: u32,
    pub offset: u64,
    pub length: u64,
    pub crc32: u32,
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
    locations: Vec<ProbeLocation>,
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
        if manifest.format_version != FORMAT_VERSION {
            return Err(unsupported(format!(
                "format_version {} is not supported (this build reads {FORMAT_VERSION})",
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

        let mut by_shard: Vec<Vec<u32>> = vec![Vec::new(); manifest.shards.len()];
        let mut locations = Vec::with_capacity(manifest.concepts.len());
        for c in &manifest.concepts {
            let w = c.weights;
            let Some(list) = by_shard.get_mut(w.shard as usize) else {
                return Err(PackError::BadConcept {
                    path: manifest_path.clone(),
                    concept: hierarchy.label(ConceptId(c.id)),
                    reason: format!("shard {} does not exist ({} shards)", w.shard, manifest.shards.len()),
                });
            };
            list.push(c.id);
            locations.push(ProbeLocation { shard: w.shard, offset: w.offset, length: w.length, crc32: c.crc32 });
        }
        let mut tensor_offsets = vec![layout.canonical_offsets(); locations.len()];
        let mut shards = Vec::with_capacity(manifest.shards.len());
        for (name, ids) in manifest.shards.iter().zip(&by_shard) {
            let path = dir.join(name);
            let mut file = File::open(&path).map_err(|e| PackError::io(&path, e))?;
            let size = file.metadata().map_err(|e| PackError::io(&path, e))?.len();
            let header = ShardHeader::read(&path, &mut file)?;
            for &id in ids {
                let loc = locations[id as usize];
                let label = || hierarchy.label(ConceptId(id));
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
            locations,
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
    pub fn location(&self, id: ConceptId) -> ProbeLocation {
        self.locations[id.index()]
    }
    /// Where each of the probe's tensors starts within its bytes (writers choose the order).
    pub fn tensor_offsets(&self, id: ConceptId) -> TensorOffsets {
        self.tensor_offsets[id.index()]
    }
    pub fn shards(&self) -> &[ShardFile] {
        &self.shards
    }
    pub fn shard_of(&self, id: ConceptId) -> &ShardFile {
        &self.shards[self.locations[id.index()].shard as usize]
    }
    /// Heap bytes held by the open pack (indices, locations, paths).
    pub fn heap_bytes(&self) -> usize {
        self.hierarchy.heap_bytes()
            + self.locations.capacity() * std::mem::size_of::<ProbeLocation>()
            + self.tensor_offsets.capacity() * std::mem::size_of::<TensorOffsets>()
            + self.shards.iter().map(|s| s.path.as_os_str().len() + std::mem::size_of::<ShardFile>()).sum::<usize>()
    }

    /// Reads one probe's bytes with a single positioned read and checks its CRC.
    pub fn read_probe(&self, id: ConceptId) -> Result<Vec<u8>, PackError> {
        let shard = self.shard_of(id);
        let file = File::open(&shard.path).map_err(|e| PackError::io(&shard.path, e))?;
        let mut buf = Vec::new();
        self.read_probe_from(&file, id, &mut buf)?;
        Ok(buf)
    }

    /// Like [`Pack::read_probe`] into a reused buffer, from an already open shard file.
    pub fn read_probe_from(&self, file: &File, id: ConceptId, buf: &mut Vec<u8>) -> Result<(), PackError> {
        let loc = self.location(id);
        let shard = &self.shards[loc.shard as usize];
        buf.resize(loc.length as usize, 0);
        file.read_exact_at(buf, loc.offset).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => PackError::Truncated {
                path: shard.path.clone(),
                concept: self.hierarchy.label(id),
                start: loc.offset,
                end: loc.offset + loc.length,
                size: file.metadata().map(|m| m.len()).unwrap_or(0),
            },
            _ => PackError::io(&shard.path, e),
        })?;
        self.check_crc(id, buf)
    }

    pub fn check_crc(&self, id: ConceptId, bytes: &[u8]) -> Result<(), PackError> {
        let loc = self.location(id);
        let actual = crc32fast::hash(bytes);
        if actual != loc.crc32 {
            return Err(PackError::Checksum {
                path: self.shards[loc.shard as usize].path.clone(),
                concept: self.hierarchy.label(id),
                expected: loc.crc32,
                actual,
            });
        }
        Ok(())
    }

    /// The error for a read that returned `got` bytes of a probe's length.
    pub fn short_read_error(&self, id: ConceptId, got: usize) -> PackError {
        let loc = self.location(id);
        PackError::ShortRead {
            path: self.shards[loc.shard as usize].path.clone(),
            concept: self.hierarchy.label(id),
            offset: loc.offset,
            got,
            want: loc.length,
        }
    }

    /// The error for a failed read of a probe's bytes: truncation when the file ended early.
    pub fn read_error(&self, id: ConceptId, e: std::io::Error) -> PackError {
        let loc = self.location(id);
        let path = self.shards[loc.shard as usize].path.clone();
        let concept = self.hierarchy.label(id);
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
    pub fn decode_probe(&self, id: ConceptId, bytes: &[u8]) -> Result<ProbeWeights, PackError> {
        let path = || self.shard_of(id).path.clone();
        let weights = ProbeWeights::decode(&self.layout, &self.tensor_offsets[id.index()], bytes).ok_or_else(|| {
            PackError::BadTensor {
                path: path(),
                concept: self.hierarchy.label(id),
                tensor: "(all)".into(),
                reason: format!("{} bytes, expected {}", bytes.len(), self.layout.byte_len()),
            }
        })?;
        for (values, slot) in weights.in_layout_order().into_iter().zip(self.layout.tensors()) {
            if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(PackError::NonFinite {
                    path: path(),
                    concept: self.hierarchy.label(id),
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
            let ids = self.hierarchy.ids().filter(|id| self.locations[id.index()].shard as usize == shard_index);
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
