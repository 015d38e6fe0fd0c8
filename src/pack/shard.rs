//! Shard files: plain safetensors files holding many probes, each probe's six tensors under
//! the key prefix `"{id}/"`, back to back. We write and read the header ourselves because
//! packs are written as a stream (the safetensors crate's writer wants every tensor in memory)
//! and opened from the header alone (its reader wants the whole file). Tests check both
//! directions against the safetensors crate.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use super::error::PackError;
use super::layout::ProbeLayout;
use super::manifest::tensor_name;

/// safetensors refuses headers above 100 MB; so do we.
const MAX_HEADER: u64 = 100_000_000;

#[derive(Debug, Clone, Deserialize)]
pub struct HeaderTensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data_offsets: (u64, u64),
}

/// A parsed shard header: tensors by name, and where the data section starts in the file.
#[derive(Debug, Default)]
pub struct ShardHeader {
    pub data_start: u64,
    pub tensors: HashMap<String, HeaderTensor>,
}

impl<'de> Deserialize<'de> for ShardHeader {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ShardHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a safetensors header object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ShardHeader, A::Error> {
                let mut tensors = HashMap::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        let t: HeaderTensor = map.next_value()?;
                        tensors.insert(key, t);
                    }
                }
                Ok(ShardHeader {
                    data_start: 0,
                    tensors,
                })
            }
        }
        de.deserialize_map(V)
    }
}

impl ShardHeader {
    pub fn read(path: &Path, file: &mut File) -> Result<Self, PackError> {
        let bad = |reason: String| PackError::Header {
            path: path.into(),
            reason,
        };
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|e| bad(format!("cannot read the header length: {e}")))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER {
            return Err(bad(format!("header length {n} is over the 100 MB limit")));
        }
        let mut json = vec![0u8; n as usize];
        file.read_exact(&mut json)
            .map_err(|e| bad(format!("header of {n} bytes cannot be read: {e}")))?;
        let mut header: ShardHeader = serde_json::from_slice(&json)
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        header.data_start = 8 + n;
        Ok(header)
    }

    /// Checks that concept `id`'s six tensors exist with the layout's dtype and shapes, lie
    /// back to back in layout order, and start at `offset` (absolute, from the manifest).
    pub fn check_probe(
        &self,
        path: &Path,
        concept: &dyn Fn() -> String,
        id: u32,
        layout: &ProbeLayout,
        offset: u64,
        length: u64,
    ) -> Result<(), PackError> {
        let bad = |tensor: &str, reason: String| PackError::BadTensor {
            path: path.into(),
            concept: concept(),
            tensor: tensor.to_string(),
            reason,
        };
        if length != layout.byte_len() as u64 {
            return Err(bad(
                "(all)",
                format!(
                    "manifest length {length} but a {} probe of D={} takes {} bytes",
                    layout.dtype,
                    layout.hidden_dim,
                    layout.byte_len()
                ),
            ));
        }
        let mut expected_start = offset;
        for (slot, range) in layout.tensors().iter().zip(layout.byte_ranges()) {
            let name = tensor_name(id, slot.key);
            let t = self
                .tensors
                .get(&name)
                .ok_or_else(|| bad(&name, "missing from the shard header".into()))?;
            if t.dtype != layout.dtype.safetensors_name() {
                return Err(bad(
                    &name,
                    format!(
                        "dtype {} but the pack is {}",
                        t.dtype,
                        layout.dtype.safetensors_name()
                    ),
                ));
            }
            if t.shape != slot.shape() {
                return Err(bad(
                    &name,
                    format!("shape {:?}, expected {:?}", t.shape, slot.shape()),
                ));
            }
            let (s, e) = t.data_offsets;
            let start = self.data_start + s;
            if start != expected_start || e.checked_sub(s) != Some(range.len() as u64) {
                return Err(bad(
                    &name,
                    format!(
                        "data at {}..{} of the file, expected {}..{} (a probe's tensors must be contiguous, in key order)",
                        start,
                        self.data_start + e,
                        expected_start,
                        expected_start + range.len() as u64
                    ),
                ));
            }
            expected_start += range.len() as u64;
        }
        Ok(())
    }
}

/// Writes the header of a shard holding probes `ids` (in order) and returns the absolute file
/// offset of each probe. The data section follows immediately.
pub fn write_header(
    out: &mut impl Write,
    layout: &ProbeLayout,
    ids: &[u32],
) -> std::io::Result<Vec<u64>> {
    let probe_len = layout.byte_len() as u64;
    let mut json = String::with_capacity(ids.len() * 6 * 80 + 64);
    json.push_str("{\"__metadata__\":{\"format\":\"pt\"}");
    let ranges = layout.byte_ranges();
    // Tensor names sort the same way the data is laid out only within a probe, which is all the
    // format needs; we still emit them in data order for readability.
    for (i, &id) in ids.iter().enumerate() {
        let base = i as u64 * probe_len;
        for (slot, r) in layout.tensors().iter().zip(&ranges) {
            json.push_str(&format!(
                ",\"{}\":{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{},{}]}}",
                tensor_name(id, slot.key),
                layout.dtype.safetensors_name(),
                slot.shape(),
                base + r.start as u64,
                base + r.end as u64
            ));
        }
    }
    json.push('}');
    // Pad with spaces so the data section is 8-byte aligned, as the reference writer does.
    while (8 + json.len()) % 8 != 0 {
        json.push(' ');
    }
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(json.as_bytes())?;
    let data_start = 8 + json.len() as u64;
    Ok((0..ids.len() as u64)
        .map(|i| data_start + i * probe_len)
        .collect())
}
