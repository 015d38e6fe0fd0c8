//! Per-token reports as Python objects.

use std::sync::Arc;

use probe_cascade::engine::TokenReport;
use probe_cascade::pack::{ConceptId, Hierarchy, Pack};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList};

/// One concept the cascade reported for a token.
#[pyclass(module = "probe_cascade", frozen, get_all)]
pub struct Detection {
    /// The concept's name.
    pub name: String,
    /// Its layer in the hierarchy.
    pub layer: u16,
    /// The lens score: sigmoid(logit) for a concept of one uncalibrated probe.
    pub prob: f32,
    /// The largest logit among the lens's probes.
    pub logit: f32,
    /// Names from a root down to this concept (first parents).
    pub path: Vec<String>,
    /// In a pack of lenses (format v2), each probe of the lens this token; empty otherwise.
    pub probes: Vec<Py<ProbeScore>>,
}

/// One probe of a reported lens: the model layer it reads, its logit, its raw score and its
/// calibrated score (None where the pack has no quantiles for it).
#[pyclass(module = "probe_cascade", frozen, get_all)]
pub struct ProbeScore {
    pub model_layer: u32,
    pub logit: f32,
    pub prob: f32,
    pub calibrated: Option<f32>,
}

#[pymethods]
impl ProbeScore {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("model_layer", self.model_layer)?;
        d.set_item("logit", self.logit)?;
        d.set_item("prob", self.prob)?;
        d.set_item("calibrated", self.calibrated)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("ProbeScore(model_layer={}, prob={:.4}, calibrated={:?})", self.model_layer, self.prob, self.calibrated)
    }
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
        if !self.probes.is_empty() {
            let probes = self.probes.iter().map(|p| p.get().to_dict(py)).collect::<PyResult<Vec<_>>>()?;
            d.set_item("probes", probes)?;
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("Detection({:?}, layer={}, prob={:.4}, logit={:.4})", self.name, self.layer, self.prob, self.logit)
    }
}

/// A watch profile's alert: a concept scored this token, under a watched concept, at or above
/// the profile's threshold.
#[pyclass(module = "probe_cascade", frozen, get_all)]
pub struct Alert {
    /// The profile's name.
    pub profile: String,
    /// The concept that scored.
    pub concept: String,
    pub layer: u16,
    /// The watched concept whose subtree holds `concept` (itself, or its nearest watched
    /// ancestor).
    pub watched: String,
    /// The probability compared with the threshold.
    pub score: f32,
    pub logit: f32,
    /// Names from a root down to `concept` (first parents).
    pub path: Vec<String>,
}

#[pymethods]
impl Alert {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("profile", &self.profile)?;
        d.set_item("concept", &self.concept)?;
        d.set_item("layer", self.layer)?;
        d.set_item("watched", &self.watched)?;
        d.set_item("score", self.score)?;
        d.set_item("logit", self.logit)?;
        d.set_item("path", &self.path)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "Alert({:?}, {:?} under {:?}, layer={}, score={:.4})",
            self.profile, self.concept, self.watched, self.layer, self.score
        )
    }
}

/// One pole of an always-on simplex lens on this token, reported apart from the hierarchy.
#[pyclass(module = "probe_cascade", frozen, get_all)]
pub struct SimplexReading {
    /// The simplex's name.
    pub simplex: String,
    pub pole: String,
    /// sigmoid(logit).
    pub prob: f32,
    pub logit: f32,
    /// Standard deviations of `prob` from the pole's rolling baseline in this session (its last
    /// 100 scores); None for the session's first 9 tokens.
    pub deviation: Option<f32>,
}

#[pymethods]
impl SimplexReading {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("simplex", &self.simplex)?;
        d.set_item("pole", &self.pole)?;
        d.set_item("prob", self.prob)?;
        d.set_item("logit", self.logit)?;
        d.set_item("deviation", self.deviation)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "SimplexReading({:?}, {:?}, prob={:.4}, deviation={:?})",
            self.simplex, self.pole, self.prob, self.deviation
        )
    }
}

/// What the cascade found for one token, and what it cost. Built lazily: the Python objects
/// for `top` and `stages` are made on first access, so `observe` itself stays cheap.
#[pyclass(module = "probe_cascade", frozen)]
pub struct Report {
    report: TokenReport,
    pack: Arc<Pack>,
    top: PyOnceLock<Py<PyList>>,
}

fn path_from_root(h: &Hierarchy, id: ConceptId) -> Vec<String> {
    h.path_from_root(id).into_iter().map(String::from).collect()
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Report {
    pub fn new(report: TokenReport, pack: Arc<Pack>) -> Self {
        Self { report, pack, top: PyOnceLock::new() }
    }

    pub fn token_report(&self) -> &TokenReport {
        &self.report
    }

    pub fn pack(&self) -> &Arc<Pack> {
        &self.pack
    }
}

#[pymethods]
impl Report {
    /// The token's index within its session (0, 1, ...).
    #[getter]
    fn token(&self) -> usize {
        self.report.index
    }

    /// The top concepts, most probable first.
    #[getter]
    fn top<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = self.top.get_or_try_init(py, || -> PyResult<_> {
            let h = self.pack.hierarchy();
            let items = self
                .report
                .top
                .iter()
                .map(|e| {
                    let probes = e
                        .probes
                        .iter()
                        .map(|p| {
                            let (model_layer, logit, prob, calibrated) = (p.model_layer, p.logit, p.prob, p.calibrated);
                            Py::new(py, ProbeScore { model_layer, logit, prob, calibrated })
                        })
                        .collect::<PyResult<Vec<_>>>()?;
                    Py::new(
                        py,
                        Detection {
                            name: e.name.clone(),
                            layer: e.layer,
                            prob: e.prob,
                            logit: e.logit,
                            path: path_from_root(h, e.id),
                            probes,
                        },
                    )
                })
                .collect::<PyResult<Vec<_>>>()?;
            Ok(PyList::new(py, items)?.unbind())
        })?;
        Ok(list.bind(py).clone())
    }

    /// Distinct inactive children the expansion asked for.
    #[getter]
    fn children(&self) -> usize {
        self.report.children
    }

    /// Probes activated this token.
    #[getter]
    fn loaded(&self) -> usize {
        self.report.loaded
    }

    /// Probes deactivated by pruning this token.
    #[getter]
    fn unloaded(&self) -> usize {
        self.report.unloaded
    }

    /// Children left out because the active set would pass `cascade.max_loaded`.
    #[getter]
    fn skipped_by_cap(&self) -> usize {
        self.report.skipped_by_cap
    }

    /// Probes scored this token.
    #[getter]
    fn scored(&self) -> usize {
        self.report.scored
    }

    /// Active probes after pruning.
    #[getter]
    fn active(&self) -> usize {
        self.report.active
    }

    /// Wall time of each stage, in milliseconds.
    #[getter]
    fn stages<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let s = &self.report.stages;
        d.set_item("initial_scoring", ms(s.initial_scoring))?;
        d.set_item("expansion_lookup", ms(s.expansion_lookup))?;
        d.set_item("loading", ms(s.loading))?;
        d.set_item("new_scoring", ms(s.new_scoring))?;
        d.set_item("pruning", ms(s.pruning))?;
        d.set_item("sorting", ms(s.sorting))?;
        Ok(d)
    }

    /// The token's wall time inside the runtime, in microseconds.
    #[getter]
    fn elapsed_us(&self) -> f64 {
        self.report.elapsed.as_secs_f64() * 1e6
    }

    /// Pipelined mode: children still loading when the report was made.
    #[getter]
    fn in_flight(&self) -> Vec<String> {
        self.report.in_flight.clone()
    }

    /// Pipelined mode: children of earlier tokens whose late loads failed.
    #[getter]
    fn failed_loads(&self) -> Vec<String> {
        self.report.failed_loads.clone()
    }

    /// Every watch profile's alerts over everything scored this token (not only `top`):
    /// profiles in config order, each best first.
    #[getter]
    fn alerts(&self) -> Vec<Alert> {
        let h = self.pack.hierarchy();
        self.report
            .alerts
            .iter()
            .map(|a| Alert {
                profile: a.profile.clone(),
                concept: a.concept.clone(),
                layer: a.layer,
                watched: a.watched.clone(),
                score: a.score,
                logit: a.logit,
                path: path_from_root(h, a.id),
            })
            .collect()
    }

    /// Every simplex pole of the pack, simplex by simplex (empty without simplexes).
    #[getter]
    fn simplex(&self) -> Vec<SimplexReading> {
        self.report
            .simplex
            .iter()
            .map(|x| SimplexReading {
                simplex: x.simplex.clone(),
                pole: x.pole.clone(),
                prob: x.prob,
                logit: x.logit,
                deviation: x.deviation,
            })
            .collect()
    }

    /// Plain data (lists, dicts, numbers): for json.dumps and logging.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("token", self.token())?;
        let top = PyList::empty(py);
        for det in self.top(py)?.iter() {
            top.append(det.cast::<Detection>()?.get().to_dict(py)?)?;
        }
        d.set_item("top", top)?;
        d.set_item("children", self.children())?;
        d.set_item("loaded", self.loaded())?;
        d.set_item("unloaded", self.unloaded())?;
        d.set_item("skipped_by_cap", self.skipped_by_cap())?;
        d.set_item("scored", self.scored())?;
        d.set_item("active", self.active())?;
        d.set_item("stages", self.stages(py)?)?;
        d.set_item("elapsed_us", self.elapsed_us())?;
        d.set_item("in_flight", self.in_flight())?;
        d.set_item("failed_loads", self.failed_loads())?;
        let alerts = PyList::empty(py);
        for a in self.alerts() {
            alerts.append(a.to_dict(py)?)?;
        }
        d.set_item("alerts", alerts)?;
        let simplex = PyList::empty(py);
        for x in self.simplex() {
            simplex.append(x.to_dict(py)?)?;
        }
        d.set_item("simplex", simplex)?;
        Ok(d)
    }

    /// How Jupyter shows a report: its top concepts, tinted as the viewer tints them, with
    /// their paths and alerts (`probe_cascade.viewer.report_html`, shared with the client's
    /// reports).
    fn _repr_html_(&self, py: Python<'_>) -> PyResult<String> {
        py.import("probe_cascade.viewer")?.call_method1("report_html", (self.to_dict(py)?,))?.extract()
    }

    fn __repr__(&self) -> String {
        let top = &self.report.top;
        let names: Vec<String> = top.iter().take(3).map(|d| format!("{:?}", d.name)).collect();
        let more = if top.len() > 3 { ", ..." } else { "" };
        format!("Report(token={}, top=[{}{more}], scored={})", self.report.index, names.join(", "), self.report.scored)
    }
}
