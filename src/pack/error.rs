use std::path::PathBuf;

/// Every way a pack can be unusable. Each variant names the file and, where one is involved,
/// the concept (as `name@layer (id N)`).
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid pack manifest: {source}")]
    ManifestSyntax {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{path}: concept {concept}: {reason}")]
    BadConcept { path: PathBuf, concept: String, reason: String },
    #[error("{path}: concept {concept} refers to {relation} id {target}, which does not exist")]
    Dangling { path: PathBuf, concept: String, relation: &'static str, target: u32 },
    #[error("{path}: duplicate concept key {key}: ids {first} and {second}")]
    DuplicateKey { path: PathBuf, key: String, first: u32, second: u32 },
    #[error("{path}: the hierarchy has a cycle through concept {concept}: {cycle}")]
    Cycle { path: PathBuf, concept: String, cycle: String },
    #[error("{path}: concept {concept}: tensor {tensor}: {reason}")]
    BadTensor { path: PathBuf, concept: String, tensor: String, reason: String },
    #[error("{path}: concept {concept}: weights at bytes {start}..{end} but the file has {size} bytes (truncated)")]
    Truncated { path: PathBuf, concept: String, start: u64, end: u64, size: u64 },
    #[error("{path}: concept {concept}: a read at byte {offset} returned {got} of {want} bytes")]
    ShortRead { path: PathBuf, concept: String, offset: u64, got: usize, want: u64 },
    #[error("{path}: concept {concept}: checksum mismatch (manifest crc32 {expected:08x}, data {actual:08x})")]
    Checksum { path: PathBuf, concept: String, expected: u32, actual: u32 },
    #[error("{path}: concept {concept}: weight {tensor}[{index}] is {value}, not finite")]
    NonFinite { path: PathBuf, concept: String, tensor: &'static str, index: usize, value: f32 },
    #[error("{path}: bad safetensors header: {reason}")]
    Header { path: PathBuf, reason: String },
    #[error("{path}: concept {concept}: read failed: {source}")]
    Read {
        path: PathBuf,
        concept: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no concept {0} in the pack")]
    UnknownConcept(String),
}

impl PackError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PackError::Io { path: path.into(), source }
    }
}
