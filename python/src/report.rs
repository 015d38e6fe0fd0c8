//! Per-token reports as Python objects.

use probe_cascade::engine::TokenReport;
use probe_cascade::pack::{ConceptId, Hierarchy};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// One concept the cascade reported for a token.
#[pyclass(module = "probe_cascade", frozen, get_all)]
pub struct Detection {
    /// The concept's name.
    pub name: String,
    /// Its layer in the hierarchy.
    pub layer: u16,
    /// sigmoid(logit).
    pub prob: f32,
    pub logit: f32,
    /// Names from a root down to this concept (first parents).
    pub path: Vec<String>,
}

#[pymethods]
impl Detection {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("name", &self.name)?;
        d.set_item("layer", self.layer)?;
        d.set_item("prob", self.prob)?;
        d.set_item("logit", self.logit)?;
        d.set_item("path", &self.path)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("Detection({:?}, layer={}, prob={:.4}, logit={:.4})", self.name, self.layer, self.prob, self.logit)
    }
}

/// What the cascade found for one token, and what it cost.
#[pyclass(module = "probe_cascade", frozen, get_all)]
pub struct Report {
    /// The token's index within its session (0, 1, ...).
    pub token: usize,
    /// The top concepts, most probable first.
    pub top: Vec<Py<Detection>>,
    /// Distinct inactive children the expansion asked for.
    pub children: usize,
    /// Probes activated this token.
    pub loaded: usize,
    /// Probes deactivated by pruning this token.
    pub unloaded: usize,
    /// Children left out because the active set would pass `cascade.max_loaded`.
    pub skipped_by_cap: usize,
    /// Probes scored this token.
    pub scored: usize,
    /// Active probes after pruning.
    pub active: usize,
    /// Wall time of each stage, in milliseconds.
    pub stages: Py<PyDict>,
    /// The token's wall time inside the runtime, in microseconds.
    pub elapsed_us: f64,
    /// Pipelined mode: children still loading when the report was made.
    pub in_flight: Vec<String>,
    /// Pipelined mode: children of earlier tokens whose late loads failed.
    pub failed_loads: Vec<String>,
}

/// The names from a root to `id`, following first parents.
fn path_from_root(h: &Hierarchy, id: ConceptId) -> Vec<String> {
    let mut path = vec![h.name(id).to_string()];
    let mut at = id;
    // A DAG may give a concept several parents; a layer bound keeps a bad cycle finite.
    for _ in 0..=h.layer_count() {
        match h.parents(at).first() {
            Some(&p) => {
                at = ConceptId(p);
                path.push(h.name(at).to_string());
            }
            None => break,
        }
    }
    path.reverse();
    path
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Report {
    pub fn new(py: Python<'_>, r: TokenReport, h: &Hierarchy) -> PyResult<Self> {
        let top = r
            .top
            .iter()
            .map(|e| {
                Py::new(
                    py,
                    Detection {
                        name: e.name.clone(),
                        layer: e.layer,
                        prob: e.prob,
                        logit: e.logit,
                        path: path_from_root(h, e.id),
                    },
                )
            })
            .collect::<PyResult<_>>()?;
        let stages = PyDict::new(py);
        let s = &r.stages;
        stages.set_item("initial_scoring", ms(s.initial_scoring))?;
        stages.set_item("expansion_lookup", ms(s.expansion_lookup))?;
        stages.set_item("loading", ms(s.loading))?;
        stages.set_item("new_scoring", ms(s.new_scoring))?;
        stages.set_item("pruning", ms(s.pruning))?;
        stages.set_item("sorting", ms(s.sorting))?;
        Ok(Self {
            token: r.index,
            top,
            children: r.children,
            loaded: r.loaded,
            unloaded: r.unloaded,
            skipped_by_cap: r.skipped_by_cap,
            scored: r.scored,
            active: r.active,
            stages: stages.unbind(),
            elapsed_us: r.elapsed.as_secs_f64() * 1e6,
            in_flight: r.in_flight,
            failed_loads: r.failed_loads,
        })
    }
}

#[pymethods]
impl Report {
    /// Plain data (lists, dicts, numbers): for json.dumps and logging.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("token", self.token)?;
        let top = PyList::empty(py);
        for det in &self.top {
            top.append(det.get().to_dict(py)?)?;
        }
        d.set_item("top", top)?;
        d.set_item("children", self.children)?;
        d.set_item("loaded", self.loaded)?;
        d.set_item("unloaded", self.unloaded)?;
        d.set_item("skipped_by_cap", self.skipped_by_cap)?;
        d.set_item("scored", self.scored)?;
        d.set_item("active", self.active)?;
        d.set_item("stages", self.stages.bind(py).copy()?)?;
        d.set_item("elapsed_us", self.elapsed_us)?;
        d.set_item("in_flight", &self.in_flight)?;
        d.set_item("failed_loads", &self.failed_loads)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let names: Vec<String> = self.top.iter().take(3).map(|d| format!("{:?}", d.get().name)).collect();
        format!("Report(token={}, top=[{}{}], scored={})", self.token, names.join(", "),
            if self.top.len() > 3 { ", ..." } else { "" }, self.scored)
    }
}
