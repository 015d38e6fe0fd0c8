//! `probe_cascade._native`: the Rust runtime for Python. The Python package around it
//! (`probe_cascade/`) imports torch first, so that this module binds the libtorch already in
//! the process: the extension links torch's own `lib/` (found relative to itself, see
//! build.rs), never a copy of its own.

mod config;
mod dataset;
mod errors;
mod hidden;
mod pack;
mod report;
mod runtime;
mod trace;

use pyo3::prelude::*;

/// The CPU and the kernel path the runtime scores on, as `probe-cascade cpu` prints them.
#[pyfunction]
fn cpu_info() -> String {
    probe_cascade::kernel::CpuInfo::detect().to_string()
}

/// The viewer page (`probe_cascade::viewer`, the same the server and `run --html` give) with
/// `data`, a JSON document `{pack, sessions: [{id, label, events}]}`, in it. A `data` that is
/// not JSON is a ValueError naming where it fails.
#[pyfunction]
fn viewer_page(title: &str, data: &str) -> PyResult<String> {
    probe_cascade::viewer::page_with_data(title, data)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("viewer data is not JSON: {e}")))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ProbeCascadeError", py.get_type::<errors::ProbeCascadeError>())?;
    m.add("BadHiddenState", py.get_type::<errors::BadHiddenState>())?;
    m.add("ProbeLoadError", py.get_type::<errors::ProbeLoadError>())?;
    m.add("ConfigError", py.get_type::<errors::ConfigError>())?;
    m.add_class::<runtime::Runtime>()?;
    m.add_class::<runtime::Session>()?;
    m.add_class::<report::Report>()?;
    m.add_class::<report::Detection>()?;
    m.add_class::<report::ProbeScore>()?;
    m.add_class::<report::Alert>()?;
    m.add_class::<report::SimplexReading>()?;
    m.add_function(wrap_pyfunction!(cpu_info, m)?)?;
    m.add_function(wrap_pyfunction!(dataset::discover_recordings, m)?)?;
    m.add_function(wrap_pyfunction!(dataset::empty_tables, m)?)?;
    m.add_function(wrap_pyfunction!(dataset::report_tables, m)?)?;
    m.add_function(wrap_pyfunction!(dataset::dataset_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(dataset::resolve_config, m)?)?;
    m.add_function(wrap_pyfunction!(viewer_page, m)?)?;
    m.add_function(wrap_pyfunction!(pack::inspect, m)?)?;
    m.add_function(wrap_pyfunction!(pack::concepts, m)?)?;
    m.add_function(wrap_pyfunction!(pack::verify, m)?)?;
    m.add_function(wrap_pyfunction!(pack::import_hatcat, m)?)?;
    m.add_function(wrap_pyfunction!(pack::import_headspace, m)?)?;
    m.add_function(wrap_pyfunction!(pack::write, m)?)?;
    m.add_function(wrap_pyfunction!(trace::headspace_trace, m)?)?;
    let presets: Vec<&str> = config::PRESETS.iter().map(|(n, _)| *n).collect();
    m.add("CONFIG_PRESETS", presets)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
