//! Shard files: plain safetensors files holding many probes, each probe's six tensors under
//! the key prefix `"{id}/"`, back to back. We write and read the header ourselves because
//! packs are written as a stream (the safetensors crate's writer wants every tensor in memory)
//! and opened from the header alone (its reader wants the whole file). Tests check both
//! directions against the safetensors crate.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::error::PackError;
use super::layout::{DType, ProbeLayout, TensorOffsets};
use super::manifest::tensor_name;

/// safetensors refuses headers above 100 MB; so do we.
const MAX_HEADER: u64 = 100_000_000;

/// One tensor entry of a header. Parsed without allocating: opening a 100,000-probe pack parses
/// 600,000 of these.
#[derive(Debug, Clone, Deserialize)]
pub struct HeaderTensor<'a> {
    #[serde(borrow)]
    pub dtype: Cow<'a, str>,
    pub shape: Shape,
    pub data_offsets: (u64, u64),
}

/// A shape of up to four dimensions, stored inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    dims: [usize; 4],
    len: usize,
}

impl Shape {
    pub fn as_slice(&self) -> &[usize] {
        &self.dims[..self.len.min(4)]
    }
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shape;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a tensor shape (list of at most 4 sizes)")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
                let mut shape = Shape { dims: [0; 4], len: 0 };
                while let Some(d) = seq.next_element::<usize>()? {
                    if shape.len == 4 {
                        return Err(serde::de::Error::custom("tensor has more than 4 dimensions"));
                    }
                    shape.dims[shape.len] = d;
                    shape.len += 1;
                }
                Ok(shape)
            }
        }
        de.deserialize_seq(V)
    }
}

/// A parsed shard header: the tensors named `"{id}/{key}"` with a v1 key, sorted by
/// (id, key index), and where the data section starts in the file.
#[derive(Debug, Default)]
pub struct ShardHeader {
    pub data_start: u64,
    tensors: Vec<((u32, u8), Entry)>,
}

#[derive(Debug, Clone)]
struct Entry {
    dtype: Result<DType, String>,
    shape: Shape,
    data_offsets: (u64, u64),
}

/// Splits `"{id}/{key}"` into (id, index of key in the v1 layout).
fn parse_name(name: &str) -> Option<(u32, u8)> {
    let (id, key) = name.split_once('/')?;
    let slot = ProbeLayout::KEYS.iter().position(|k| *k == key)?;
    Some((id.parse().ok()?, slot as u8))
}

struct Entries(Vec<((u32, u8), Entry)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a safetensors header object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut tensors = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "__metadata__" {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                    let t: HeaderTensor<'de> = map.next_value()?;
                    // Tensors that belong to no probe are allowed and ignored.
                    if let Some(k) = parse_name(&key) {
                        let dtype = match &*t.dtype {
                            "F32" => Ok(DType::F32),
                            "BF16" => Ok(DType::Bf16),
                            other => Err(other.to_string()),
                        };
                        tensors.push((k, Entry { dtype, shape: t.shape, data_offsets: t.data_offsets }));
                    }
                }
                Ok(Entries(tensors))
            }
        }
        de.deserialize_map(V)
    }
}

impl ShardHeader {
    pub fn read(path: &Path, file: &mut File) -> Result<Self, PackError> {
        let bad = |reason: String| PackError::Header { path: path.into(), reason };
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| bad(format!("cannot read the header length: {e}")))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER {
            return Err(bad(format!("header length {n} is over the 100 MB limit")));
        }
        let mut json = vec![0u8; n as usize];
        file.read_exact(&mut json).map_err(|e| bad(format!("header of {n} bytes cannot be read: {e}")))?;
        let Entries(mut tensors) =
            serde_json::from_slice(&json).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        tensors.sort_unstable_by_key(|(k, _)| *k);
        if let Some(w) = tensors.windows(2).find(|w| w[0].0 == w[1].0) {
            let (id, slot) = w[0].0;
            return Err(bad(format!("tensor {id}/{} appears twice", ProbeLayout::KEYS[slot as usize])));
        }
        Ok(ShardHeader { data_start: 8 + n, tensors })
    }

    /// Checks that concept `id`'s six tensors exist with the layout's dtype and shapes and
    /// together fill exactly `[offset, offset + length)` of the file (from the manifest), in
    /// any order. Returns where each tensor starts within that range.
    pub fn check_probe(
        &self,
        path: &Path,
        concept: &dyn Fn() -> String,
        id: u32,
        layout: &ProbeLayout,
        offset: u64,
        length: u64,
    ) -> Result<TensorOffsets, PackError> {
        let bad = |tensor: &str, reason: String| PackError::BadTensor {
            path: path.into(),
            concept: concept(),
            tensor: tensor.to_string(),
            reason,
        };
        if length != layout.byte_len() as u64 {
            let reason = format!(
                "manifest length {length} but a {} probe of D={} takes {} bytes",
                layout.dtype,
                layout.hidden_dim,
                layout.byte_len()
            );
            return Err(bad("(all)", reason));
        }
        let mut placed: [(u64, u64, usize); 6] = [(0, 0, 0); 6];
        for (index, (slot, range)) in layout.tensors().iter().zip(layout.byte_ranges()).enumerate() {
            let name = || tensor_name(id, slot.key);
            let t = match self.tensors.binary_search_by_key(&(id, index as u8), |(k, _)| *k) {
                Ok(i) => &self.tensors[i].1,
                Err(_) => return Err(bad(&name(), "missing from the shard header".into())),
            };
            match &t.dtype {
                Ok(dtype) if *dtype == layout.dtype => {}
                Ok(dtype) => {
                    let reason = format!(
                        "dtype {} but the pack is {}",
                        dtype.safetensors_name(),
                        layout.dtype.safetensors_name()
                    );
                    return Err(bad(&name(), reason));
                }
                Err(other) => return Err(bad(&name(), format!("dtype {other} is not supported (F32 or BF16)"))),
            }
            if t.shape.as_slice() != slot.shape() {
                return Err(bad(&name(), format!("shape {:?}, expected {:?}", t.shape.as_slice(), slot.shape())));
            }
            let (s, e) = t.data_offsets;
            if e.checked_sub(s) != Some(range.len() as u64) {
                return Err(bad(&name(), format!("data_offsets {s}..{e} do not hold {} bytes", range.len())));
            }
            placed[index] = (self.data_start + s, self.data_start + e, index);
        }
        placed.sort_unstable();
        let mut cursor = offset;
        let mut starts = [0u32; 6];
        for (start, end, index) in placed {
            if start != cursor {
                let reason = format!(
                    "data at bytes {start}..{end} of the file, but the probe's tensors must fill {offset}..{} back to back (next expected at {cursor})",
                    offset + length
                );
                return Err(bad(&tensor_name(id, ProbeLayout::KEYS[index]), reason));
            }
            starts[index] = (start - offset) as u32;
            cursor = end;
        }
        Ok(TensorOffsets(starts))
    }
}

/// Writes the header of a shard holding probes `ids` (in order) and returns the absolute file
/// offset of each probe. The data section follows immediately.
pub fn write_header(out: &mut impl Write, layout: &ProbeLayout, ids: &[u32]) -> std::io::Result<Vec<u64>> {
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
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(' ');
    }
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(json.as_bytes())?;
    let data_start = 8 + json.len() as u64;
    Ok((0..ids.len() as u64).map(|i| data_start + i * probe_len).collect())
}
