//! Recordings scored as sessions of one runtime, with their results handed to Python as
//! Arrow IPC streams (`probe_cascade_dataset`): the Ray path (`probe_cascade.ray`) and
//! `probe_cascade.dataset` read them with pyarrow, in the schema `run --parquet` writes.

use std::path::PathBuf;

use probe_cascade::npy::Matrix;
use probe_cascade_dataset::{self as dataset, Failure, Outcome, Recording, Source, Table};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors::base_error;
use crate::hidden;

/// The recordings a directory or glob names, sorted: `(name, path, tensor)`, where `tensor` is
/// None for a `.npy`, as `run --traces` finds them.
#[pyfunction]
pub fn discover_recordings(spec: &str) -> PyResult<Vec<(String, String, Option<String>)>> {
    let found = dataset::discover(spec).map_err(|e| base_error(e.to_string()))?;
    Ok(found
        .into_iter()
        .map(|r| match r.source {
            Source::Npy(p) => (r.name, p.display().to_string(), None),
            Source::Safetensors { path, tensor } => (r.name, path.display().to_string(), Some(tensor)),
            Source::Matrix(_) => unreachable!("discover gives files"),
        })
        .collect())
}

/// A recording from Python: a path (str or os.PathLike) to a `.npy`, a `(path, tensor)` pair
/// for a safetensors tensor, or a [T, D] array or tensor. One that is none of these is an
/// outcome with a failure, as a bad file is.
pub fn recording(name: String, obj: &Bound<'_, PyAny>) -> Result<Recording, Outcome> {
    let failed = |error: String| Outcome {
        recording: name.clone(),
        reports: Vec::new(),
        failures: vec![Failure { token: None, error }],
    };
    if let Ok((path, tensor)) = obj.extract::<(PathBuf, String)>() {
        return Ok(Recording { name, source: Source::Safetensors { path, tensor } });
    }
    if let Ok(path) = obj.extract::<PathBuf>() {
        return Ok(Recording { name, source: Source::Npy(path) });
    }
    let rows = obj.len().map_err(|e| failed(format!("not a path, a (path, tensor) pair or a [T, D] array: {e}")))?;
    let (values, loans) = hidden::host_rows(obj, rows).map_err(|e| failed(e.to_string()))?;
    drop(loans);
    let cols = values.first().map_or(0, Vec::len);
    let mut data = Vec::with_capacity(rows * cols);
    for (t, row) in values.into_iter().enumerate() {
        if row.len() != cols {
            return Err(failed(format!("row {t} has {} values and row 0 has {cols}", row.len())));
        }
        data.extend(row);
    }
    Ok(Recording { name, source: Source::Matrix(Matrix { rows, cols, data }) })
}

/// Outcomes as `{table name: Arrow IPC stream bytes}`, every table present (maybe empty).
pub fn ipc_tables<'py>(py: Python<'py>, outcomes: &[Outcome]) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for table in Table::ALL {
        let bytes = dataset::tables::batch(table, outcomes)
            .and_then(|b| dataset::tables::to_ipc(&b))
            .map_err(|e| base_error(format!("building the {} table: {e}", table.name())))?;
        out.set_item(table.name(), PyBytes::new(py, &bytes))?;
    }
    Ok(out)
}

/// Reports already made (a monitor's, a session's) as the dataset's tables: `items` is a list of
/// `(recording, reports)`, each recording's reports in token order (token t is the t-th report).
#[pyfunction]
pub fn report_tables<'py>(
    py: Python<'py>,
    items: Vec<(String, Vec<PyRef<'py, crate::report::Report>>)>,
) -> PyResult<Bound<'py, PyDict>> {
    let outcomes: Vec<Outcome> = items
        .into_iter()
        .map(|(recording, reports)| Outcome {
            recording,
            reports: reports.iter().enumerate().map(|(t, r)| (t as u32, r.token_report().clone())).collect(),
            failures: Vec::new(),
        })
        .collect();
    ipc_tables(py, &outcomes)
}

/// Every table of the dataset schema, empty, as `{table: Arrow IPC bytes}`: the schema for a
/// writer that has no rows of a table.
#[pyfunction]
pub fn empty_tables(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    ipc_tables(py, &[])
}

/// The `manifest.json` (as JSON text) of a dataset scored with `pack_dir` and `config` (a
/// preset name, a TOML path or a dict): the config, the pack's identity and the options, as
/// `run --parquet` writes it.
#[pyfunction]
#[pyo3(signature = (pack_dir, config = None, *, skip_bad_tokens = false))]
pub fn dataset_manifest(
    pack_dir: PathBuf,
    config: Option<&Bound<'_, PyAny>>,
    skip_bad_tokens: bool,
) -> PyResult<String> {
    let resolved = crate::config::resolve(config)?;
    let pack = probe_cascade::pack::Pack::open(&pack_dir).map_err(|e| crate::errors::from_pack(&e))?;
    let identity = dataset::PackIdentity::of(&pack).map_err(|e| base_error(e.to_string()))?;
    let m = dataset::Manifest::new(resolved.raw, resolved.source, identity, skip_bad_tokens);
    serde_json::to_string_pretty(&m).map_err(|e| base_error(e.to_string()))
}

/// A config (a preset name, a TOML path or a dict) as the dict it resolves to.
#[pyfunction]
#[pyo3(signature = (config = None))]
pub fn resolve_config<'py>(py: Python<'py>, config: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
    let resolved = crate::config::resolve(config)?;
    crate::config::to_py(py, &resolved.raw)
}
