//! Reads a `torch.save` file holding a state_dict, without Python.
//!
//! Since PyTorch 1.6 such a file is a zip archive (entries stored, not compressed):
//! `<archive>/data.pkl`, a pickle whose tensors refer to storages by persistent id, and
//! `<archive>/data/<key>`, each storage's raw little-endian bytes. `<archive>` is whatever
//! name the writer chose, so entries are found by suffix.

use std::path::{Path, PathBuf};

use half::{bf16, f16};

use super::pickle::{self, TensorRef, Value};
use super::stored_zip::{StoredZip, ZipError};

/// Element types a probe file may store. All convert to f32 exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StoredDType {
    F32,
    Bf16,
    F16,
}

impl StoredDType {
    fn from_storage(kind: &str) -> Option<Self> {
        match kind {
            "FloatStorage" => Some(Self::F32),
            "BFloat16Storage" => Some(Self::Bf16),
            "HalfStorage" => Some(Self::F16),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

/// One tensor of a state_dict, converted to f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    pub shape: Vec<usize>,
    pub dtype: StoredDType,
    pub values: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum TorchFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: legacy (pre-1.6, non-zip) torch.save format; load and re-save it with a current PyTorch, \
         which writes the zip format"
    )]
    Legacy { path: PathBuf },
    #[error("{path}: not a readable torch.save zip archive ({reason}); truncated or not a .pt file?")]
    NotZip { path: PathBuf, reason: String },
    #[error("{path}: archive entry {entry}: {reason}")]
    Entry { path: PathBuf, entry: String, reason: String },
    #[error("{path}: data.pkl: {source}")]
    Pickle {
        path: PathBuf,
        #[source]
        source: pickle::PickleError,
    },
    #[error("{path}: holds {found}, not a state_dict (a dict of tensors)")]
    NotStateDict { path: PathBuf, found: String },
    #[error("{path}: tensor {key}: {reason}")]
    Tensor { path: PathBuf, key: String, reason: String },
}

/// Reads a state_dict: `(key, tensor)` in the file's order.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, StoredTensor)>, TorchFileError> {
    let bytes = std::fs::read(path).map_err(|source| TorchFileError::Io { path: path.into(), source })?;
    parse_state_dict(&bytes, path)
}

/// [`read_state_dict`] on bytes already in memory; `path` only names the file in errors.
pub fn parse_state_dict(bytes: &[u8], path: &Path) -> Result<Vec<(String, StoredTensor)>, TorchFileError> {
    // The legacy format is a bare pickle stream that starts with a magic number (a LONG1).
    if bytes.starts_with(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19") {
        return Err(TorchFileError::Legacy { path: path.into() });
    }
    let zip =
        StoredZip::parse(bytes).map_err(|e| TorchFileError::NotZip { path: path.into(), reason: e.to_string() })?;
    let Some(pkl) = zip.names().find(|n| *n == "data.pkl" || n.ends_with("/data.pkl")) else {
        return Err(TorchFileError::NotZip { path: path.into(), reason: "no data.pkl entry".into() });
    };
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
    let pkl = pkl.to_string();
    let order_entry = format!("{prefix}byteorder");
    if zip.size(&order_entry).is_some() {
        let order = read_entry(&zip, &order_entry, 16, path)?;
        if order != b"little" {
            let reason =
                format!("byte order {:?}; only little-endian files are supported", String::from_utf8_lossy(order));
            return Err(TorchFileError::Entry { path: path.into(), entry: order_entry, reason });
        }
    }
    let pickle_bytes = read_entry(&zip, &pkl, 64 << 20, path)?;
    let root = pickle::parse(pickle_bytes).map_err(|source| TorchFileError::Pickle { path: path.into(), source })?;
    let Value::Dict(items) = root else {
        return Err(TorchFileError::NotStateDict { path: path.into(), found: root.describe() });
    };
    let mut out = Vec::with_capacity(items.len());
    for (key, value) in items {
        let Value::Str(key) = key else {
            return Err(TorchFileError::NotStateDict {
                path: path.into(),
                found: format!("a dict keyed by {}", key.describe()),
            });
        };
        let Value::Tensor(tensor) = value else {
            let found = format!("a dict whose entry {key:?} is {}", value.describe());
            return Err(TorchFileError::NotStateDict { path: path.into(), found });
        };
        let values = read_tensor(&zip, &prefix, &tensor, path, &key)?;
        out.push((key, values));
    }
    if out.is_empty() {
        return Err(TorchFileError::NotStateDict { path: path.into(), found: "an empty dict".into() });
    }
    Ok(out)
}

/// Entry `name`'s bytes, refused when larger than `limit` (before any are looked at).
fn read_entry<'a>(zip: &StoredZip<'a>, name: &str, limit: usize, path: &Path) -> Result<&'a [u8], TorchFileError> {
    let err = |reason: String| TorchFileError::Entry { path: path.into(), entry: name.into(), reason };
    match zip.size(name) {
        None => Err(err("missing from the archive".into())),
        Some(size) if size > limit => Err(err(format!("{size} bytes is more than the {limit} expected"))),
        Some(_) => zip.read(name).map_err(|e| match e {
            ZipError::Crc { expected, found, .. } => {
                err(format!("CRC-32 is {found:08x}, the archive says {expected:08x}: the bytes are corrupt"))
            }
            other => err(other.to_string()),
        }),
    }
}

fn read_tensor(
    zip: &StoredZip,
    prefix: &str,
    t: &TensorRef,
    path: &Path,
    key: &str,
) -> Result<StoredTensor, TorchFileError> {
    let bad = |reason: String| TorchFileError::Tensor { path: path.into(), key: key.into(), reason };
    let Some(dtype) = StoredDType::from_storage(&t.storage.kind) else {
        return Err(bad(format!("storage type {} is not supported (f32, bf16 or f16)", t.storage.kind)));
    };
    let elt = dtype.size();
    let numel =
        t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| bad("size overflows".into()))?;
    // The furthest element the view touches must lie inside the storage.
    let last = t.shape.iter().zip(&t.stride).try_fold(t.offset, |end, (&d, &s)| {
        if d == 0 {
            Some(end)
        } else {
            (d - 1).checked_mul(s).and_then(|x| end.checked_add(x))
        }
    });
    match last {
        Some(last) if numel == 0 || last < t.storage.numel => {}
        _ => return Err(bad(format!("view reaches past its storage of {} elements", t.storage.numel))),
    }
    // A state_dict's tensors never repeat elements (stride-0 views); refusing them bounds the
    // allocation below by the storage, which the file's size bounds in turn.
    if numel > t.storage.numel {
        return Err(bad(format!("view of {numel} elements repeats a storage of {}", t.storage.numel)));
    }
    let entry = format!("{prefix}data/{}", t.storage.key);
    let Some(limit) = t.storage.numel.checked_mul(elt) else { return Err(bad("storage size overflows".into())) };
    let raw = read_entry(zip, &entry, limit, path)?;
    if raw.len() != t.storage.numel * elt {
        let reason = format!("{} bytes but the storage holds {} {} elements", raw.len(), t.storage.numel, dtype.name());
        return Err(TorchFileError::Entry { path: path.into(), entry, reason });
    }
    let contiguous = t
        .shape
        .iter()
        .zip(&t.stride)
        .rev()
        .try_fold(1usize, |expected, (&d, &s)| (d <= 1 || s == expected).then(|| expected * d));
    let values = if contiguous.is_some() {
        decode(dtype, &raw[t.offset * elt..(t.offset + numel) * elt])
    } else {
        // A saved view need not be contiguous: walk it in row-major order over the storage.
        let storage = decode(dtype, raw);
        let mut values = Vec::with_capacity(numel);
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            values.push(storage[t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>()]);
            for dim in (0..index.len()).rev() {
                index[dim] += 1;
                if index[dim] < t.shape[dim] {
                    break;
                }
                index[dim] = 0;
            }
        }
        values
    };
    Ok(StoredTensor { shape: t.shape.clone(), dtype, values })
}

/// Little-endian elements of `dtype` to f32 (exact for all three).
fn decode(dtype: StoredDType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        StoredDType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        StoredDType::Bf16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        StoredDType::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    }
}
