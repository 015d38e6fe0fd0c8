//! headspace's JSON trace from Python reports: the same writer as `run --trace-json`
//! (`probe_cascade::headspace`), so the two cannot disagree.

use std::sync::Arc;

use probe_cascade::headspace::{document, pack_name, TraceRun, TraceToken};
use probe_cascade::pack::Pack;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::report::Report;

/// One run as Python handed it over: the reports stay borrowed from their Python objects.
struct Run<'py> {
    prompt: String,
    title: Option<String>,
    note: Option<String>,
    seconds: Option<f64>,
    tokens: Vec<(String, PyRef<'py, Report>)>,
}

fn run_of<'py>(i: usize, item: &Bound<'py, PyAny>) -> PyResult<Run<'py>> {
    let d = item.cast::<PyDict>().map_err(|_| PyTypeError::new_err(format!("runs[{i}] is not a dict")))?;
    let get = |key: &str| d.get_item(key);
    let text = |key: &str| -> PyResult<Option<String>> {
        get(key)?
            .filter(|v| !v.is_none())
            .map(|v| v.extract::<String>())
            .transpose()
            .map_err(|_| PyTypeError::new_err(format!("runs[{i}][{key:?}] is not a str")))
    };
    let prompt = text("prompt")?.ok_or_else(|| PyValueError::new_err(format!("runs[{i}] has no \"prompt\"")))?;
    let seconds = get("seconds")?
        .filter(|v| !v.is_none())
        .map(|v| v.extract::<f64>())
        .transpose()
        .map_err(|_| PyTypeError::new_err(format!("runs[{i}][\"seconds\"] is not a number")))?;
    let tokens = get("tokens")?.ok_or_else(|| PyValueError::new_err(format!("runs[{i}] has no \"tokens\"")))?;
    let mut out = Vec::new();
    for (t, tok) in tokens.try_iter()?.enumerate() {
        let pair: (String, PyRef<'py, Report>) = tok?.extract().map_err(|_| {
            PyTypeError::new_err(format!("runs[{i}][\"tokens\"][{t}] is not a (text, probe_cascade.Report) pair"))
        })?;
        out.push(pair);
    }
    Ok(Run { prompt, title: text("title")?, note: text("note")?, seconds, tokens: out })
}

/// The trace document, as JSON text. `runs`: dicts with "prompt", "tokens" (a list of
/// (text, Report) pairs) and optional "title", "note", "seconds". Every report must come from
/// one pack.
#[pyfunction]
#[pyo3(signature = (runs, model=None, top=8))]
pub fn headspace_trace(runs: &Bound<'_, PyList>, model: Option<String>, top: usize) -> PyResult<String> {
    let runs: Vec<Run> = runs.iter().enumerate().map(|(i, r)| run_of(i, &r)).collect::<PyResult<_>>()?;
    let mut pack: Option<Arc<Pack>> = None;
    for (i, run) in runs.iter().enumerate() {
        for (t, (_, r)) in run.tokens.iter().enumerate() {
            match &pack {
                None => pack = Some(r.pack().clone()),
                Some(p) if !Arc::ptr_eq(p, r.pack()) && p.dir() != r.pack().dir() => {
                    return Err(PyValueError::new_err(format!(
                        "runs[{i}][\"tokens\"][{t}] is a report of pack {}, but earlier ones are of {}: a trace \
                         holds one pack",
                        r.pack().dir().display(),
                        p.dir().display()
                    )));
                }
                Some(_) => {}
            }
        }
    }
    let Some(pack) = pack else { return Err(PyValueError::new_err("the runs hold no token")) };
    let traced: Vec<TraceRun> = runs
        .iter()
        .map(|r| TraceRun {
            prompt: r.prompt.clone(),
            title: r.title.clone(),
            note: r.note.clone(),
            seconds: r.seconds,
            tokens: r.tokens.iter().map(|(text, rep)| TraceToken { text, report: rep.token_report() }).collect(),
        })
        .collect();
    let doc = document(&pack, &pack_name(&pack), model.as_deref(), &traced, top);
    serde_json::to_string(&doc).map_err(|e| PyValueError::new_err(e.to_string()))
}
