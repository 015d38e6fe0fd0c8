//! Between the wire and the runtime: hidden states from raw little-endian bytes, reports and
//! errors into messages. Pure functions, unit-tested.

use probe_cascade::engine::TokenReport;
use probe_cascade::runtime::{RuntimeError, TokenError, TokenErrorKind};

use crate::proto::v1 as pb;

/// A hidden state's bytes as f32 values (bf16 and f16 widen exactly). Names what is wrong:
/// the dtype, or the byte count against `len`.
pub fn decode_hidden(h: &pb::HiddenState) -> Result<Vec<f32>, String> {
    let dtype = pb::Dtype::try_from(h.dtype).ok();
    let width = match dtype {
        Some(pb::Dtype::F32) => 4,
        Some(pb::Dtype::Bf16 | pb::Dtype::F16) => 2,
        Some(pb::Dtype::Unspecified) => return Err("hidden state: `dtype` is not set (f32, bf16 or f16)".into()),
        None => return Err(format!("hidden state: `dtype` = {} is not f32 (1), bf16 (2) or f16 (3)", h.dtype)),
    };
    let name = dtype_name(h.dtype);
    let want = h.len as usize * width;
    if h.data.len() != want {
        return Err(format!(
            "hidden state: `data` has {} bytes, but `len` = {} values of {name} take {want}",
            h.data.len(),
            h.len
        ));
    }
    let data = &h.data[..];
    Ok(match dtype {
        Some(pb::Dtype::F32) => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Some(pb::Dtype::Bf16) => {
            data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        _ => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    })
}

/// One token's states for a pack that reads `model_layers`: `layers` (each of them once, any
/// order) in the pack's order, or the one `hidden` of a pack that reads one layer. Names what
/// is wrong: a missing, repeated or unknown model layer, or the state's own defect.
pub fn decode_states(
    hidden: Option<&pb::HiddenState>,
    layers: &[pb::LayerState],
    model_layers: &[u32],
) -> Result<Vec<Vec<f32>>, String> {
    if layers.is_empty() {
        let h = hidden.ok_or_else(|| "no hidden state: set `hidden` (or `layers`)".to_string())?;
        return Ok(vec![decode_hidden(h)?]);
    }
    if hidden.is_some() {
        return Err("both `hidden` and `layers` are set: send one".into());
    }
    let mut given: Vec<u32> = layers.iter().map(|l| l.model_layer).collect();
    given.sort_unstable();
    if given != model_layers {
        return Err(format!("`layers` holds model layers {given:?}, but the pack's probes read {model_layers:?}"));
    }
    model_layers
        .iter()
        .map(|m| {
            let h = layers
                .iter()
                .find(|l| l.model_layer == *m)
                .and_then(|l| l.hidden.as_ref())
                .ok_or_else(|| format!("model layer {m}: no `hidden`"))?;
            decode_hidden(h).map_err(|e| format!("model layer {m}: {e}"))
        })
        .collect()
}

fn dtype_name(dtype: i32) -> &'static str {
    match pb::Dtype::try_from(dtype) {
        Ok(pb::Dtype::F32) => "f32",
        Ok(pb::Dtype::Bf16) => "bf16",
        Ok(pb::Dtype::F16) => "f16",
        _ => "an unknown dtype",
    }
}

/// f32 values as a hidden-state message (clients, tests, benchmarks).
pub fn encode_f32(values: &[f32]) -> pb::HiddenState {
    let mut data = Vec::with_capacity(values.len() * 4);
    for v in values {
        data.extend_from_slice(&v.to_le_bytes());
    }
    pb::HiddenState { dtype: pb::Dtype::F32 as i32, len: values.len() as u32, data: data.into() }
}

fn ns(d: std::time::Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

pub fn report(r: &TokenReport) -> pb::Report {
    let s = &r.stages;
    pb::Report {
        token: r.index as u64,
        top: r
            .top
            .iter()
            .map(|e| pb::Detection {
                concept_id: e.id.0,
                name: e.name.clone(),
                layer: e.layer as u32,
                prob: e.prob,
                logit: e.logit,
                probes: e
                    .probes
                    .iter()
                    .map(|p| pb::ProbeScore {
                        model_layer: p.model_layer,
                        logit: p.logit,
                        prob: p.prob,
                        calibrated: p.calibrated,
                    })
                    .collect(),
            })
            .collect(),
        children: r.children as u32,
        loaded: r.loaded as u32,
        unloaded: r.unloaded as u32,
        skipped_by_cap: r.skipped_by_cap as u32,
        scored: r.scored as u32,
        active: r.active as u32,
        stages: Some(pb::Stages {
            initial_scoring_ns: ns(s.initial_scoring),
            expansion_lookup_ns: ns(s.expansion_lookup),
            loading_ns: ns(s.loading),
            new_scoring_ns: ns(s.new_scoring),
            pruning_ns: ns(s.pruning),
            sorting_ns: ns(s.sorting),
        }),
        elapsed_ns: ns(r.elapsed),
        in_flight: r.in_flight.clone(),
        failed_loads: r.failed_loads.clone(),
        alerts: r
            .alerts
            .iter()
            .map(|a| pb::Alert {
                profile: a.profile.clone(),
                concept_id: a.id.0,
                concept: a.concept.clone(),
                layer: a.layer as u32,
                watched: a.watched.clone(),
                score: a.score,
                logit: a.logit,
            })
            .collect(),
        simplex: r
            .simplex
            .iter()
            .map(|x| pb::SimplexReading {
                simplex: x.simplex.clone(),
                pole: x.pole.clone(),
                prob: x.prob,
                logit: x.logit,
                deviation: x.deviation,
            })
            .collect(),
    }
}

/// The kind of a runtime error, for the wire and for `probe_cascade_errors_total{kind}`.
pub fn kind_of(e: &RuntimeError) -> pb::ErrorKind {
    match e {
        RuntimeError::Token(TokenError { kind: TokenErrorKind::Hidden(_), .. }) => pb::ErrorKind::BadHidden,
        RuntimeError::Token(TokenError { kind: TokenErrorKind::Probe(_), .. }) => pb::ErrorKind::ProbeLoad,
        RuntimeError::SessionLimit { .. } | RuntimeError::StoreLimit(_) => pb::ErrorKind::Limit,
        RuntimeError::ShutDown => pb::ErrorKind::ShuttingDown,
        RuntimeError::UnknownSession(_) => pb::ErrorKind::UnknownSession,
        _ => pb::ErrorKind::Internal,
    }
}

pub fn error(kind: pb::ErrorKind, message: String, token: Option<u64>) -> pb::Error {
    pb::Error { kind: kind as i32, message, token }
}

pub fn runtime_error(e: &RuntimeError) -> pb::Error {
    error(kind_of(e), e.to_string(), e.token().map(|t| t as u64))
}

/// The label `probe_cascade_errors_total` counts an error kind under.
pub fn kind_label(kind: pb::ErrorKind) -> &'static str {
    match kind {
        pb::ErrorKind::Unspecified => "unspecified",
        pb::ErrorKind::BadHidden => "bad_hidden",
        pb::ErrorKind::ProbeLoad => "probe_load",
        pb::ErrorKind::Limit => "limit",
        pb::ErrorKind::Deadline => "deadline",
        pb::ErrorKind::ShuttingDown => "shutting_down",
        pb::ErrorKind::UnknownSession => "unknown_session",
        pb::ErrorKind::Internal => "internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hidden(dtype: i32, len: u32, data: Vec<u8>) -> pb::HiddenState {
        pb::HiddenState { dtype, len, data: data.into() }
    }

    #[test]
    fn decodes_every_dtype_exactly() {
        let values = [1.5f32, -0.25, 3.0e-3, 65504.0];
        assert_eq!(decode_hidden(&encode_f32(&values)).unwrap(), values);
        let bf: Vec<u8> = values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let want: Vec<f32> = values.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
        assert_eq!(decode_hidden(&hidden(pb::Dtype::Bf16 as i32, 4, bf)).unwrap(), want);
        let f: Vec<u8> = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let want: Vec<f32> = values.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
        assert_eq!(decode_hidden(&hidden(pb::Dtype::F16 as i32, 4, f)).unwrap(), want);
    }

    #[test]
    fn names_what_is_wrong() {
        let e = decode_hidden(&hidden(pb::Dtype::F32 as i32, 4, vec![0; 15])).unwrap_err();
        assert!(e.contains("15 bytes") && e.contains("`len` = 4") && e.contains("16"), "{e}");
        let e = decode_hidden(&hidden(9, 1, vec![0; 4])).unwrap_err();
        assert!(e.contains("`dtype` = 9"), "{e}");
        let e = decode_hidden(&hidden(0, 1, vec![0; 4])).unwrap_err();
        assert!(e.contains("`dtype` is not set"), "{e}");
    }
}
