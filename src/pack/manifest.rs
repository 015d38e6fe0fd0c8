//! The on-disk manifest (`manifest.json`) of pack format v1. See docs/pack-format.md.

use serde::{Deserialize, Serialize};

use super::layout::DType;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT_NAME: &str = "probe-cascade-pack";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub hidden_dim: usize,
    pub dtype: DType,
    pub architecture: Architecture,
    /// Normalization the probes expect on their input (`none` or `layer_norm`).
    #[serde(default)]
    pub input_normalization: InputNormalization,
    /// Weight files, relative to the pack directory. Concepts refer to them by index.
    pub shards: Vec<String>,
    pub concepts: Vec<ConceptEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputNormalization {
    #[default]
    None,
    LayerNorm,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    pub kind: String,
    /// Hidden widths between the input (D) and the single output.
    pub hidden: Vec<usize>,
    pub activation: String,
    pub output: String,
}

impl Architecture {
    pub fn v1() -> Self {
        Self {
            kind: "mlp".into(),
            hidden: vec![super::layout::HIDDEN1, super::layout::HIDDEN2],
            activation: "relu".into(),
            output: "sigmoid".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConceptEntry {
    /// Must equal the entry's position in `concepts`.
    pub id: u32,
    pub name: String,
    pub layer: u16,
    pub parents: Vec<u32>,
    pub children: Vec<u32>,
    pub weights: WeightsRef,
    /// zlib CRC-32 of the probe's bytes `[offset, offset + length)`.
    pub crc32: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsRef {
    pub shard: u32,
    /// Absolute byte offset of the probe's first tensor in the shard file.
    pub offset: u64,
    pub length: u64,
}

/// The safetensors key of one tensor of a concept's probe: `"{id}/{key}"`.
pub fn tensor_name(id: u32, key: &str) -> String {
    format!("{id}/{key}")
}
