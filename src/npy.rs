//! Reading and writing 2-D float32 `.npy` files (NumPy format 1.0), the trace format.
//! Hand-written because the subset is tiny and we want errors that name the file and the
//! exact problem; tests pin the header layout byte for byte.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"\x93NUMPY";

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a supported .npy file: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// A T×D float32 matrix, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// The header of a T×D little-endian f32 C-order array, padded so the data starts at a
/// multiple of 64 bytes (what NumPy itself writes).
pub fn header(rows: usize, cols: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let unpadded = MAGIC.len() + 2 + 2 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let mut out = Vec::with_capacity(unpadded + pad);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&((dict.len() + pad + 1) as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    out
}

pub fn write(path: &Path, m: &Matrix) -> Result<(), NpyError> {
    let io = |source| NpyError::Io { path: path.into(), source };
    let mut out = BufWriter::new(File::create(path).map_err(io)?);
    out.write_all(&header(m.rows, m.cols)).map_err(io)?;
    for v in &m.data {
        out.write_all(&v.to_le_bytes()).map_err(io)?;
    }
    out.flush().map_err(io)
}

pub fn read(path: &Path) -> Result<Matrix, NpyError> {
    let io = |source| NpyError::Io { path: path.into(), source };
    let bad = |reason: String| NpyError::Format { path: path.into(), reason };
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut r = BufReader::new(file);
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre).map_err(|_| bad("shorter than the 8-byte preamble".into()))?;
    if &pre[..6] != MAGIC {
        return Err(bad("missing the \\x93NUMPY magic".into()));
    }
    let header_len = match pre[6] {
        1 => {
            let mut n = [0u8; 2];
            r.read_exact(&mut n).map_err(|_| bad("truncated header length".into()))?;
            u16::from_le_bytes(n) as usize
        }
        2 | 3 => {
            let mut n = [0u8; 4];
            r.read_exact(&mut n).map_err(|_| bad("truncated header length".into()))?;
            u32::from_le_bytes(n) as usize
        }
        v => return Err(bad(format!("format version {v} is not supported"))),
    };
    if header_len > 1 << 20 {
        return Err(bad(format!("header of {header_len} bytes is implausibly large")));
    }
    let mut dict = vec![0u8; header_len];
    r.read_exact(&mut dict).map_err(|_| bad("truncated header".into()))?;
    let dict = String::from_utf8(dict).map_err(|_| bad("header is not text".into()))?;
    let field = |key: &str| -> Option<&str> {
        let at = dict.find(&format!("'{key}':"))? + key.len() + 3;
        Some(dict[at..].trim_start())
    };
    let descr = field("descr").ok_or_else(|| bad("header has no 'descr'".into()))?;
    if !(descr.starts_with("'<f4'") || descr.starts_with("'float32'")) {
        return Err(bad(format!(
            "dtype {} is not little-endian float32 ('<f4')",
            descr.split(',').next().unwrap_or("")
        )));
    }
    if !field("fortran_order").is_some_and(|v| v.starts_with("False")) {
        return Err(bad("fortran_order arrays are not supported".into()));
    }
    let shape = field("shape").ok_or_else(|| bad("header has no 'shape'".into()))?;
    let shape =
        shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or_else(|| bad("malformed shape".into()))?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad(format!("malformed shape ({shape})"))))
        .collect::<Result<_, _>>()?;
    let (rows, cols) = match dims[..] {
        [rows, cols] => (rows, cols),
        [cols] => (1, cols),
        _ => return Err(bad(format!("expected a 2-D array of hidden states, got shape ({shape})"))),
    };
    let data_start = pre.len() as u64 + if pre[6] == 1 { 2 } else { 4 } + header_len as u64;
    let expected =
        rows.checked_mul(cols).and_then(|n| n.checked_mul(4)).ok_or_else(|| bad("shape overflows".into()))?;
    if file_len - data_start != expected as u64 {
        return Err(bad(format!(
            "shape ({rows}, {cols}) needs {expected} data bytes but the file has {}",
            file_len - data_start
        )));
    }
    let mut bytes = vec![0u8; expected];
    r.read_exact(&mut bytes).map_err(io)?;
    let data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(Matrix { rows, cols, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_matches_numpy() {
        let h = header(200, 2560);
        assert_eq!(&h[..6], b"\x93NUMPY");
        assert_eq!(&h[6..8], &[1, 0]);
        assert_eq!(h.len() % 64, 0);
        let len = u16::from_le_bytes([h[8], h[9]]) as usize;
        assert_eq!(10 + len, h.len());
        assert_eq!(*h.last().unwrap(), b'\n');
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (200, 2560), }"), "{text}");
    }

    #[test]
    fn round_trip_and_size_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.npy");
        let m = Matrix { rows: 3, cols: 5, data: (0..15).map(|i| i as f32 - 7.5).collect() };
        write(&path, &m).unwrap();
        assert_eq!(read(&path).unwrap(), m);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("needs 60 data bytes but the file has 56"), "{err}");
    }
}
