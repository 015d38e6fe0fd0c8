//! The dataset's tables as Arrow record batches: one schema for every writer (the command
//! line's Parquet, and the Python package's, which receives these batches as Arrow IPC and
//! hands them to pyarrow and Ray), so the two cannot drift.
//!
//! - `detections`: each token's reported concepts, best first (`rank` 1 is the strongest),
//!   with the per-model-layer probe scores of a multi-layer lens;
//! - `tokens`: what each token cost and did;
//! - `alerts`: the watch profiles' alerts (over everything scored, so not only the reported
//!   concepts: join on recording, token and concept);
//! - `simplex`: every simplex pole's reading, on packs with simplexes;
//! - `failures`: recordings and tokens that have no results, and why.

use std::sync::Arc;

use arrow_array::builder::{Float32Builder, Float64Builder, StringBuilder, UInt16Builder, UInt32Builder};
use arrow_array::{ArrayRef, ListArray, RecordBatch, StructArray};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{ArrowError, DataType, Field, Fields, Schema, SchemaRef};

use crate::score::Outcome;

/// The tables, in the order they are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Detections,
    Tokens,
    Alerts,
    Simplex,
    Failures,
}

impl Table {
    pub const ALL: [Table; 5] = [Table::Detections, Table::Tokens, Table::Alerts, Table::Simplex, Table::Failures];

    /// The table's name: its directory in a dataset.
    pub fn name(self) -> &'static str {
        match self {
            Table::Detections => "detections",
            Table::Tokens => "tokens",
            Table::Alerts => "alerts",
            Table::Simplex => "simplex",
            Table::Failures => "failures",
        }
    }

    pub fn schema(self) -> SchemaRef {
        use DataType::{Float32, Float64, UInt16, UInt32, Utf8};
        let f = |name: &str, t: DataType| Field::new(name, t, false);
        // Every table is keyed by recording and token; a failure's token is null when the
        // whole recording failed.
        let token = Field::new("token", UInt32, self == Table::Failures);
        let rest: Vec<Field> = match self {
            Table::Detections => vec![
                f("rank", UInt16),
                f("concept", UInt32),
                f("name", Utf8),
                f("layer", UInt16),
                f("prob", Float32),
                f("logit", Float32),
                Field::new("probes", DataType::List(Arc::new(Field::new("item", probe_type(), false))), true),
            ],
            Table::Tokens => {
                let counts = ["scored", "children", "loaded", "unloaded", "skipped_by_cap", "active", "alerts"];
                counts.iter().map(|n| f(n, UInt32)).chain([f("ms", Float64)]).collect()
            }
            Table::Alerts => vec![
                f("profile", Utf8),
                f("concept", UInt32),
                f("name", Utf8),
                f("layer", UInt16),
                f("watched", Utf8),
                f("score", Float32),
                f("logit", Float32),
            ],
            Table::Simplex => vec![
                f("simplex", Utf8),
                f("pole", Utf8),
                f("prob", Float32),
                f("logit", Float32),
                Field::new("deviation", Float32, true),
            ],
            Table::Failures => vec![f("error", Utf8)],
        };
        Arc::new(Schema::new([f("recording", Utf8), token].into_iter().chain(rest).collect::<Vec<_>>()))
    }
}

/// One probe of a multi-layer lens: its model layer, logit, raw score and calibrated score.
fn probe_fields() -> Fields {
    Fields::from(vec![
        Field::new("model_layer", DataType::UInt32, false),
        Field::new("logit", DataType::Float32, false),
        Field::new("prob", DataType::Float32, false),
        Field::new("calibrated", DataType::Float32, true),
    ])
}

fn probe_type() -> DataType {
    DataType::Struct(probe_fields())
}

/// `outcomes`' rows of one table.
pub fn batch(table: Table, outcomes: &[Outcome]) -> Result<RecordBatch, ArrowError> {
    let schema = table.schema();
    let columns: Vec<ArrayRef> = match table {
        Table::Detections => detections(outcomes),
        Table::Tokens => tokens(outcomes),
        Table::Alerts => alerts(outcomes),
        Table::Simplex => simplex(outcomes),
        Table::Failures => failures(outcomes),
    };
    RecordBatch::try_new(schema, columns)
}

/// The two key columns, one row per `(recording, token)` pair given.
struct Key {
    recording: StringBuilder,
    token: UInt32Builder,
}

impl Key {
    fn new() -> Self {
        Self { recording: StringBuilder::new(), token: UInt32Builder::new() }
    }

    fn push(&mut self, recording: &str, token: u32) {
        self.recording.append_value(recording);
        self.token.append_value(token);
    }

    fn finish(mut self) -> Vec<ArrayRef> {
        vec![Arc::new(self.recording.finish()), Arc::new(self.token.finish())]
    }
}

fn detections(outcomes: &[Outcome]) -> Vec<ArrayRef> {
    let mut key = Key::new();
    let (mut rank, mut concept, mut layer) = (UInt16Builder::new(), UInt32Builder::new(), UInt16Builder::new());
    let (mut name, mut prob, mut logit) = (StringBuilder::new(), Float32Builder::new(), Float32Builder::new());
    // The probes list: offsets into flat struct columns; null where the entry has none.
    let mut offsets: Vec<i32> = vec![0];
    let mut valid: Vec<bool> = Vec::new();
    let (mut p_layer, mut p_logit, mut p_prob, mut p_cal) =
        (UInt32Builder::new(), Float32Builder::new(), Float32Builder::new(), Float32Builder::new());
    for o in outcomes {
        for (t, r) in &o.reports {
            for (i, e) in r.top.iter().enumerate() {
                key.push(&o.recording, *t);
                rank.append_value(u16::try_from(i + 1).unwrap_or(u16::MAX));
                concept.append_value(e.id.0);
                name.append_value(&e.name);
                layer.append_value(e.layer);
                prob.append_value(e.prob);
                logit.append_value(e.logit);
                for p in &e.probes {
                    p_layer.append_value(p.model_layer);
                    p_logit.append_value(p.logit);
                    p_prob.append_value(p.prob);
                    p_cal.append_option(p.calibrated);
                }
                let last = *offsets.last().unwrap_or(&0);
                offsets.push(last + e.probes.len() as i32);
                valid.push(!e.probes.is_empty());
            }
        }
    }
    let values = StructArray::new(
        probe_fields(),
        vec![
            Arc::new(p_layer.finish()) as ArrayRef,
            Arc::new(p_logit.finish()),
            Arc::new(p_prob.finish()),
            Arc::new(p_cal.finish()),
        ],
        None,
    );
    let probes = ListArray::new(
        Arc::new(Field::new("item", probe_type(), false)),
        OffsetBuffer::new(offsets.into()),
        Arc::new(values),
        Some(NullBuffer::from(valid)),
    );
    let mut cols = key.finish();
    cols.extend([
        Arc::new(rank.finish()) as ArrayRef,
        Arc::new(concept.finish()),
        Arc::new(name.finish()),
        Arc::new(layer.finish()),
        Arc::new(prob.finish()),
        Arc::new(logit.finish()),
        Arc::new(probes),
    ]);
    cols
}

fn tokens(outcomes: &[Outcome]) -> Vec<ArrayRef> {
    let mut key = Key::new();
    let mut counts: [UInt32Builder; 7] = std::array::from_fn(|_| UInt32Builder::new());
    let mut ms = Float64Builder::new();
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    for o in outcomes {
        for (t, r) in &o.reports {
            key.push(&o.recording, *t);
            let values = [r.scored, r.children, r.loaded, r.unloaded, r.skipped_by_cap, r.active, r.alerts.len()];
            for (b, v) in counts.iter_mut().zip(values) {
                b.append_value(n(v));
            }
            ms.append_value(r.elapsed.as_secs_f64() * 1e3);
        }
    }
    let mut cols = key.finish();
    cols.extend(counts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    cols.push(Arc::new(ms.finish()));
    cols
}

fn alerts(outcomes: &[Outcome]) -> Vec<ArrayRef> {
    let mut key = Key::new();
    let (mut profile, mut concept, mut name) = (StringBuilder::new(), UInt32Builder::new(), StringBuilder::new());
    let (mut layer, mut watched) = (UInt16Builder::new(), StringBuilder::new());
    let (mut score, mut logit) = (Float32Builder::new(), Float32Builder::new());
    for o in outcomes {
        for (t, r) in &o.reports {
            for a in &r.alerts {
                key.push(&o.recording, *t);
                profile.append_value(&a.profile);
                concept.append_value(a.id.0);
                name.append_value(&a.concept);
                layer.append_value(a.layer);
                watched.append_value(&a.watched);
                score.append_value(a.score);
                logit.append_value(a.logit);
            }
        }
    }
    let mut cols = key.finish();
    cols.extend([
        Arc::new(profile.finish()) as ArrayRef,
        Arc::new(concept.finish()),
        Arc::new(name.finish()),
        Arc::new(layer.finish()),
        Arc::new(watched.finish()),
        Arc::new(score.finish()),
        Arc::new(logit.finish()),
    ]);
    cols
}

fn simplex(outcomes: &[Outcome]) -> Vec<ArrayRef> {
    let mut key = Key::new();
    let (mut simplex, mut pole) = (StringBuilder::new(), StringBuilder::new());
    let (mut prob, mut logit, mut deviation) = (Float32Builder::new(), Float32Builder::new(), Float32Builder::new());
    for o in outcomes {
        for (t, r) in &o.reports {
            for x in &r.simplex {
                key.push(&o.recording, *t);
                simplex.append_value(&x.simplex);
                pole.append_value(&x.pole);
                prob.append_value(x.prob);
                logit.append_value(x.logit);
                deviation.append_option(x.deviation);
            }
        }
    }
    let mut cols = key.finish();
    cols.extend([
        Arc::new(simplex.finish()) as ArrayRef,
        Arc::new(pole.finish()),
        Arc::new(prob.finish()),
        Arc::new(logit.finish()),
        Arc::new(deviation.finish()),
    ]);
    cols
}

fn failures(outcomes: &[Outcome]) -> Vec<ArrayRef> {
    let (mut recording, mut token, mut error) = (StringBuilder::new(), UInt32Builder::new(), StringBuilder::new());
    for o in outcomes {
        for f in &o.failures {
            recording.append_value(&o.recording);
            token.append_option(f.token);
            error.append_value(&f.error);
        }
    }
    vec![Arc::new(recording.finish()), Arc::new(token.finish()), Arc::new(error.finish())]
}

/// Batches as one Arrow IPC stream each (what `pyarrow.ipc.open_stream` reads).
pub fn to_ipc(batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
    let mut w = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &batch.schema())?;
    w.write(batch)?;
    w.finish()?;
    w.into_inner()
}
