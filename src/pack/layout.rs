//! The fixed probe architecture of pack format v1 and where each tensor sits in a probe's bytes.

use half::bf16;
use serde::{Deserialize, Serialize};

/// Widths after the input: Linear(D→128) → ReLU → Linear(128→64) → ReLU → Linear(64→1) → sigmoid.
pub const HIDDEN1: usize = 128;
pub const HIDDEN2: usize = 64;

/// Storage dtype of probe weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    /// The dtype string in a safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::Bf16 => "BF16",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            other => Err(format!("unknown dtype `{other}` (expected f32 or bf16)")),
        }
    }
}

/// One tensor of a probe's state_dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorSlot {
    /// PyTorch state_dict key, e.g. `net.0.weight`.
    pub key: &'static str,
    /// Shape as PyTorch stores it ([out, in] for weights).
    pub rows: usize,
    /// 0 for 1-D tensors (biases).
    pub cols: usize,
}

impl TensorSlot {
    pub fn numel(&self) -> usize {
        self.rows * self.cols.max(1)
    }
    pub fn shape(&self) -> Vec<usize> {
        if self.cols == 0 {
            vec![self.rows]
        } else {
            vec![self.rows, self.cols]
        }
    }
}

/// Layout of one probe's bytes: its six tensors back to back, in key order. That is the
/// order every safetensors writer uses (it sorts by name within a dtype), so a probe written
/// with any writer under a common key prefix occupies one contiguous byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeLayout {
    pub hidden_dim: usize,
    pub dtype: DType,
}

/// Index of each tensor in [`ProbeLayout::tensors`].
pub const B1: usize = 0;
pub const W1: usize = 1;
pub const B2: usize = 2;
pub const W2: usize = 3;
pub const B3: usize = 4;
pub const W3: usize = 5;

impl ProbeLayout {
    /// The state_dict keys, in layout order.
    pub const KEYS: [&'static str; 6] =
        ["net.0.bias", "net.0.weight", "net.3.bias", "net.3.weight", "net.6.bias", "net.6.weight"];

    pub fn new(hidden_dim: usize, dtype: DType) -> Self {
        Self { hidden_dim, dtype }
    }

    pub fn tensors(&self) -> [TensorSlot; 6] {
        let d = self.hidden_dim;
        [
            TensorSlot { key: "net.0.bias", rows: HIDDEN1, cols: 0 },
            TensorSlot { key: "net.0.weight", rows: HIDDEN1, cols: d },
            TensorSlot { key: "net.3.bias", rows: HIDDEN2, cols: 0 },
            TensorSlot { key: "net.3.weight", rows: HIDDEN2, cols: HIDDEN1 },
            TensorSlot { key: "net.6.bias", rows: 1, cols: 0 },
            TensorSlot { key: "net.6.weight", rows: 1, cols: HIDDEN2 },
        ]
    }

    pub fn numel(&self) -> usize {
        self.tensors().iter().map(TensorSlot::numel).sum()
    }

    pub fn byte_len(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// Byte range of each tensor, given where each starts within the probe's bytes.
    pub fn ranges(&self, offsets: &TensorOffsets) -> [std::ops::Range<usize>; 6] {
        let tensors = self.tensors();
        std::array::from_fn(|i| {
            let start = offsets.0[i] as usize;
            start..start + tensors[i].numel() * self.dtype.size()
        })
    }

    /// Tensor offsets when the six tensors are stored in key order (what our writer does).
    pub fn canonical_offsets(&self) -> TensorOffsets {
        TensorOffsets(self.byte_ranges().map(|r| r.start as u32))
    }

    /// Byte range of each tensor relative to the start of the probe, in key order.
    pub fn byte_ranges(&self) -> [std::ops::Range<usize>; 6] {
        let mut start = 0;
        self.tensors().map(|t| {
            let len = t.numel() * self.dtype.size();
            let range = start..start + len;
            start += len;
            range
        })
    }
}

/// Where each tensor (in [`ProbeLayout::KEYS`] order) starts within a probe's bytes. A probe's
/// tensors fill one contiguous range, but writers choose their order within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorOffsets(pub [u32; 6]);

/// A probe's parameters in f32 on the host, in PyTorch's [out, in] row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeWeights {
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
    pub w3: Vec<f32>,
    pub b3: Vec<f32>,
}

impl ProbeWeights {
    /// Tensors in layout order (see [`ProbeLayout::tensors`]).
    pub fn in_layout_order(&self) -> [&[f32]; 6] {
        [&self.b1, &self.w1, &self.b2, &self.w2, &self.b3, &self.w3]
    }

    /// Serializes into `out` in the layout's order and dtype (little endian, bf16 rounded to
    /// nearest even).
    pub fn encode_into(&self, layout: &ProbeLayout, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(layout.byte_len());
        for (values, slot) in self.in_layout_order().into_iter().zip(layout.tensors()) {
            assert_eq!(values.len(), slot.numel(), "{} has the wrong length", slot.key);
            match layout.dtype {
                DType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
                DType::Bf16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
            }
        }
    }

    /// Parses a probe's bytes; `bytes` must be exactly `layout.byte_len()` long.
    pub fn decode(layout: &ProbeLayout, offsets: &TensorOffsets, bytes: &[u8]) -> Option<Self> {
        if bytes.len() != layout.byte_len() {
            return None;
        }
        let ranges = layout.ranges(offsets);
        if ranges.iter().any(|r| r.end > bytes.len()) {
            return None;
        }
        let read = |i: usize| decode_values(layout.dtype, &bytes[ranges[i].clone()]);
        Some(Self { b1: read(B1), w1: read(W1), b2: read(B2), w2: read(W2), b3: read(B3), w3: read(W3) })
    }

    /// Plain f32 forward pass: the logit. Used by synthesis and as an independent check on tch.
    pub fn logit(&self, h: &[f32]) -> f32 {
        let d = h.len();
        let mut a1 = [0f32; HIDDEN1];
        for (k, a) in a1.iter_mut().enumerate() {
            let row = &self.w1[k * d..(k + 1) * d];
            *a = (dot(row, h) + self.b1[k]).max(0.0);
        }
        let mut a2 = [0f32; HIDDEN2];
        for (j, a) in a2.iter_mut().enumerate() {
            let row = &self.w2[j * HIDDEN1..(j + 1) * HIDDEN1];
            *a = (dot(row, &a1) + self.b2[j]).max(0.0);
        }
        dot(&self.w3, &a2) + self.b3[0]
    }

    /// The logit in f64 (each product of f32 weights and f64 activations summed in f64), and
    /// its scale |b3| + Σ|w3·a2|, the size of what was summed, against which rounding errors
    /// are judged. The import checks probes with it.
    pub fn logit_f64(&self, x: &[f64]) -> (f64, f64) {
        let layer = |weights: &[f32], bias: &[f32], input: &[f64]| -> Vec<f64> {
            let width = input.len();
            bias.iter()
                .enumerate()
                .map(|(k, &b)| {
                    let row = &weights[k * width..(k + 1) * width];
                    (row.iter().zip(input).map(|(&w, &v)| w as f64 * v).sum::<f64>() + b as f64).max(0.0)
                })
                .collect()
        };
        let a2 = layer(&self.w2, &self.b2, &layer(&self.w1, &self.b1, x));
        let terms: Vec<f64> = self.w3.iter().zip(&a2).map(|(&w, &a)| w as f64 * a).collect();
        let b3 = self.b3[0] as f64;
        (terms.iter().sum::<f64>() + b3, terms.iter().map(|t| t.abs()).sum::<f64>() + b3.abs())
    }
}

pub fn decode_values(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::Bf16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums let the compiler vectorize while staying deterministic.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_len_matches_pytorch_parameter_count() {
        let layout = ProbeLayout::new(2560, DType::F32);
        // 2560*128 + 128 + 128*64 + 64 + 64 + 1
        assert_eq!(layout.numel(), 327_680 + 128 + 8_192 + 64 + 64 + 1);
        assert_eq!(layout.byte_len(), layout.numel() * 4);
        let ranges = layout.byte_ranges();
        assert_eq!(ranges[0], 0..512);
        assert_eq!(ranges[5].end, layout.byte_len());
    }

    #[test]
    fn keys_are_in_sorted_order() {
        let layout = ProbeLayout::new(8, DType::Bf16);
        let keys: Vec<_> = layout.tensors().iter().map(|t| t.key).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn encode_decode_round_trip_bf16_rounds() {
        let layout = ProbeLayout::new(4, DType::Bf16);
        let n = |k: usize| (0..k).map(|i| i as f32 * 0.37 - 1.0).collect::<Vec<_>>();
        let w = ProbeWeights { w1: n(512), b1: n(128), w2: n(8192), b2: n(64), w3: n(64), b3: n(1) };
        let mut bytes = Vec::new();
        w.encode_into(&layout, &mut bytes);
        assert_eq!(bytes.len(), layout.byte_len());
        let back = ProbeWeights::decode(&layout, &layout.canonical_offsets(), &bytes).unwrap();
        for (a, b) in w.w2.iter().zip(&back.w2) {
            assert!((a - b).abs() <= a.abs() / 128.0 + 1e-6, "{a} vs {b}");
        }
        assert!(ProbeWeights::decode(&layout, &layout.canonical_offsets(), &bytes[1..]).is_none());
    }
}
