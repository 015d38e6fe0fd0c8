//! The on-disk manifest (`manifest.json`) of pack formats v1 and v2. See docs/pack-format.md.
//!
//! v2 differs from v1 in one place: a concept (a *lens*) lists its probes, each reading one
//! model layer's hidden state and optionally carrying calibration quantiles, where v1 gives
//! every concept exactly one probe (`weights` and `crc32` on the concept itself).

use serde::{Deserialize, Serialize};

use super::layout::DType;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT_NAME: &str = "probe-cascade-pack";
/// The newest version this build writes and reads; v1 is read too.
pub const FORMAT_VERSION: u32 = 2;
/// The one lens-score rule of v2: the max of calibrated probe scores when every probe of the
/// lens has quantiles, else the mean of raw probabilities (docs/cascade-semantics.md).
pub const LENS_SCORE_RULE: &str = "calibrated_max_else_raw_mean";
/// The one rule of v2's optional `concept_calibration`: every reported lens score goes through
/// its concept's calibration (HatCat's three-stage normalization, which headspace applies to a
/// pack's `calibration.json`); a lens without an entry reports the neutral default.
pub const CONCEPT_CALIBRATION_RULE: &str = "three_stage";

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
    /// v2: the model layers whose hidden states the probes read, ascending, distinct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_layers: Option<Vec<u32>>,
    /// v2: how a lens combines its probes' scores ([`LENS_SCORE_RULE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lens_score: Option<String>,
    /// v2, optional: how reported scores are calibrated per concept
    /// ([`CONCEPT_CALIBRATION_RULE`]). Absent: reports show lens scores as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concept_calibration: Option<String>,
    /// Weight files, relative to the pack directory. Concepts refer to them by index.
    pub shards: Vec<String>,
    pub concepts: Vec<ConceptEntry>,
    /// v2, optional: always-on simplex lenses, scored every token apart from the hierarchy.
    /// Their poles' probe ids follow every lens probe's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simplexes: Option<Vec<SimplexEntry>>,
}

/// One simplex lens (headspace's tripole): named poles, each one probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimplexEntry {
    pub name: String,
    /// At least one; distinct names.
    pub poles: Vec<PoleEntry>,
}

/// One pole of a simplex: its name and its probe (as a lens probe, without quantiles).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoleEntry {
    pub pole: String,
    pub id: u32,
    pub model_layer: u32,
    pub weights: WeightsRef,
    pub crc32: u32,
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
    /// v1: the concept's one probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightsRef>,
    /// v1: zlib CRC-32 of the probe's bytes `[offset, offset + length)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
    /// v2: the lens's probes, at most one per model layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<Vec<ProbeEntry>>,
    /// v2, in packs with `concept_calibration`: this lens's calibration statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<ConceptCalibration>,
}

/// A concept's calibration statistics (HatCat's, from headspace's older `calibration.json`):
/// what maps its lens score to the score reported (`policy::lens::normalize`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConceptCalibration {
    /// Mean score on the concept's own prompts.
    pub self_mean: f64,
    /// Mean score on other concepts' prompts where it fired: its noise floor.
    pub cross_mean: f64,
    /// Share of other concepts' prompts it fired on.
    pub cross_fire_rate: f64,
    /// Share of free-generation tokens it fired on.
    pub gen_fire_rate: f64,
    /// Share of random-noise inputs it fired on.
    pub noise_fire_rate: f64,
}

impl ConceptCalibration {
    /// What a lens without an entry gets in a concept-calibrated pack: no confidence at all,
    /// so that it reports exactly 0.5 whatever it scores (as headspace does).
    pub const NEUTRAL: Self =
        Self { self_mean: 0.9, cross_mean: 0.5, cross_fire_rate: 1.0, gen_fire_rate: 1.0, noise_fire_rate: 0.0 };

    /// Why these statistics cannot calibrate, if they cannot: every field must be a number in
    /// [0, 1] (means of probabilities, and shares).
    pub fn check(&self) -> Result<(), String> {
        let fields = [
            ("self_mean", self.self_mean),
            ("cross_mean", self.cross_mean),
            ("cross_fire_rate", self.cross_fire_rate),
            ("gen_fire_rate", self.gen_fire_rate),
            ("noise_fire_rate", self.noise_fire_rate),
        ];
        match fields.iter().find(|(_, v)| !(0.0..=1.0).contains(v)) {
            Some((name, v)) => Err(format!("{name} is {v}, not in [0, 1]")),
            None => Ok(()),
        }
    }
}

/// One probe of a v2 lens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeEntry {
    /// The probe's key in the shards (`"{id}/net.0.weight"`): probes are numbered densely in
    /// concept order, then in the order each concept lists them.
    pub id: u32,
    /// The model layer whose hidden state it reads; one of the pack's `model_layers`.
    pub model_layer: u32,
    pub weights: WeightsRef,
    /// zlib CRC-32 of the probe's bytes `[offset, offset + length)`.
    pub crc32: u32,
    /// The probe's probabilities on background text at evenly spaced levels 0..=1 (at least
    /// two values, non-decreasing): what calibrates its score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantiles: Option<Vec<f64>>,
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
