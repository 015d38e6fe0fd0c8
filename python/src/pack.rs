//! Pack tools: open, inspect, verify, import HatCat lenses and headspace lens packs, and write
//! a pack from arrays (what `examples/train_pack.py` does with the probes it trains), lenses of
//! several probes and calibration quantiles included.

use std::path::PathBuf;

use probe_cascade::import::headspace::{concept_statistics, import_headspace as core_import_headspace};
use probe_cascade::import::{import_hatcat as core_import, ImportError, ImportOptions};
use probe_cascade::pack::{
    write_pack, ConceptDef, ConceptId, DType, InputNormalization, LensSpec, Pack, PackSpec, ProbeDef, ProbeWeights,
};
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::{base_error, config_error, from_pack, raise, Facts, ProbeLoadError};

fn open_pack(py: Python<'_>, dir: &PathBuf) -> PyResult<Pack> {
    py.detach(|| Pack::open(dir)).map_err(|e| from_pack(&e))
}

/// A pack's shape: concepts, D, dtype, layers and the hierarchy.
#[pyfunction]
pub fn inspect<'py>(py: Python<'py>, dir: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let pack = open_pack(py, &dir)?;
    let h = pack.hierarchy();
    let d = PyDict::new(py);
    d.set_item("dir", dir.display().to_string())?;
    d.set_item("concepts", pack.len())?;
    d.set_item("hidden_dim", pack.hidden_dim())?;
    d.set_item("dtype", pack.dtype().to_string())?;
    d.set_item(
        "input_normalization",
        match pack.input_normalization() {
            InputNormalization::None => "none",
            InputNormalization::LayerNorm => "layer_norm",
        },
    )?;
    d.set_item("bytes_per_probe", pack.layout().byte_len())?;
    d.set_item("shards", pack.shards().len())?;
    let layers = PyList::empty(py);
    for layer in 0..h.layer_count() as u16 {
        let members = h.layer_members(layer);
        let l = PyDict::new(py);
        l.set_item("layer", layer)?;
        l.set_item("concepts", members.len())?;
        l.set_item("leaves", members.iter().filter(|&&c| h.children(ConceptId(c)).is_empty()).count())?;
        layers.append(l)?;
    }
    d.set_item("layers", layers)?;
    Ok(d)
}

/// Every concept: name, layer, parents and children (by name).
#[pyfunction]
pub fn concepts<'py>(py: Python<'py>, dir: PathBuf) -> PyResult<Bound<'py, PyList>> {
    let pack = open_pack(py, &dir)?;
    let h = pack.hierarchy();
    let out = PyList::empty(py);
    let names = |ids: &[u32]| ids.iter().map(|&i| h.name(ConceptId(i)).to_string()).collect::<Vec<_>>();
    for id in h.ids() {
        let c = PyDict::new(py);
        c.set_item("id", id.0)?;
        c.set_item("name", h.name(id))?;
        c.set_item("layer", h.layer(id))?;
        c.set_item("parents", names(h.parents(id)))?;
        c.set_item("children", names(h.children(id)))?;
        out.append(c)?;
    }
    Ok(out)
}

/// Reads every probe: checksums, shapes, finite values. Returns the defects (empty when the
/// pack is sound); with `raise_on_defect`, raises ProbeLoadError naming the first.
#[pyfunction]
#[pyo3(signature = (dir, raise_on_defect = false))]
pub fn verify(py: Python<'_>, dir: PathBuf, raise_on_defect: bool) -> PyResult<Vec<String>> {
    let pack = open_pack(py, &dir)?;
    let defects = py.detach(|| pack.verify(|_| {}));
    if raise_on_defect {
        if let Some(first) = defects.first() {
            return Err(from_pack(first));
        }
    }
    Ok(defects.iter().map(|d| d.to_string()).collect())
}

fn dtype(s: &str) -> PyResult<DType> {
    s.parse().map_err(|e| config_error(format!("dtype = {s:?}: {e}"), Some("dtype".into())))
}

/// Imports a HatCat layout (its hierarchy directory and lens files, read as they are) into a
/// new pack at `out`; returns the summary the command line prints.
#[pyfunction]
#[pyo3(signature = (hierarchy_dir, lenses_dir, out, *, dtype = "f32", skip_bad = false, probes_per_shard = 256))]
pub fn import_hatcat(
    py: Python<'_>,
    hierarchy_dir: PathBuf,
    lenses_dir: PathBuf,
    out: PathBuf,
    dtype: &str,
    skip_bad: bool,
    probes_per_shard: usize,
) -> PyResult<String> {
    let options = ImportOptions { dtype: self::dtype(dtype)?, skip_bad, probes_per_shard: probes_per_shard.max(1) };
    let summary = py.detach(|| core_import(&hierarchy_dir, &lenses_dir, &out, &options, |_, _, _| {}));
    summary.map(|s| s.to_string()).map_err(|e| import_error(&e))
}

/// Imports a headspace lens pack (as it is on disk) into a new v2 pack at `out`; returns the
/// summary the command line prints.
#[pyfunction]
#[pyo3(signature = (dir, out, *, dtype = "f32", probes_per_shard = 256))]
pub fn import_headspace(
    py: Python<'_>,
    dir: PathBuf,
    out: PathBuf,
    dtype: &str,
    probes_per_shard: usize,
) -> PyResult<String> {
    let options =
        ImportOptions { dtype: self::dtype(dtype)?, skip_bad: false, probes_per_shard: probes_per_shard.max(1) };
    let summary = py.detach(|| core_import_headspace(&dir, &out, &options, |_, _, _| {}));
    summary.map(|s| s.to_string()).map_err(|e| import_error(&e))
}

/// An import's error as Python's: a pack defect as such, the rest as `ProbeLoadError` with
/// the file it names.
fn import_error(e: &ImportError) -> PyErr {
    if let ImportError::Pack(e) = e {
        return from_pack(e);
    }
    let path = match e {
        ImportError::Io { path, .. }
        | ImportError::Hierarchy { path, .. }
        | ImportError::Probe { path, .. }
        | ImportError::Metadata { path, .. } => Some(path.display().to_string()),
        _ => None,
    };
    raise::<ProbeLoadError>(e.to_string(), Facts { path, ..Facts::default() })
}

/// The values of `weights[key]` (any array-like, as float32), checked to hold `count` rows
/// of `per`.
fn rows_of(weights: &Bound<'_, PyDict>, key: &str, per: usize, count: usize) -> PyResult<Vec<f32>> {
    let py = weights.py();
    let arr = weights.get_item(key)?.ok_or_else(|| base_error(format!("weights has no {key:?}")))?;
    let flat = py
        .import("numpy")?
        .call_method1("ascontiguousarray", (arr, "float32"))
        .and_then(|a| PyBuffer::<f32>::get(&a)?.to_vec(py))
        .map_err(|e| base_error(format!("weights[{key:?}]: {e}")))?;
    if flat.len() != per * count {
        return Err(base_error(format!(
            "weights[{key:?}] has {} values; {count} probes need {count} × {per}",
            flat.len()
        )));
    }
    if let Some(i) = flat.iter().position(|v| !v.is_finite()) {
        return Err(base_error(format!("weights[{key:?}]: value {i} (probe {}) is {}", i / per, flat[i])));
    }
    Ok(flat)
}

/// One probe of a lens, as Python gives it: (model layer, quantiles or None).
type LensProbe = (u32, Option<Vec<f64>>);

/// Writes a pack. `concepts`: a list of (name, layer, [parent indices]); `weights`: a dict of
/// arrays stacked over probes, in HatCat's MLP shapes: w1 [P, 128, D], b1 [P, 128],
/// w2 [P, 64, 128], b2 [P, 64], w3 [P, 1, 64], b3 [P, 1]. Without `probes`, one probe per
/// concept (P = C, a v1 pack). With `probes`, a v2 pack of lenses: `probes[c]` lists concept
/// c's probes as (model layer, quantiles or None), and the weights' rows follow them in order.
/// `concept_calibration` (with `probes`) makes the pack concept-calibrated: per concept, a dict
/// of statistics (`self_mean`, `cross_mean`, `cross_fire_rate`, `gen_fire_rate`,
/// `noise_fire_rate`, headspace's calibration.json entries) or None (it reports 0.5).
/// Returns the number of probes written.
#[pyfunction]
#[pyo3(signature = (out, concepts, weights, *, dtype = "f32", input_normalization = "none", probes_per_shard = 256, probes = None, concept_calibration = None))]
#[allow(clippy::too_many_arguments)]
pub fn write(
    py: Python<'_>,
    out: PathBuf,
    concepts: Vec<(String, u16, Vec<u32>)>,
    weights: &Bound<'_, PyDict>,
    dtype: &str,
    input_normalization: &str,
    probes_per_shard: usize,
    probes: Option<Vec<Vec<LensProbe>>>,
    concept_calibration: Option<Vec<Option<std::collections::HashMap<String, f64>>>>,
) -> PyResult<usize> {
    let dtype = self::dtype(dtype)?;
    let norm = match input_normalization {
        "none" => InputNormalization::None,
        "layer_norm" => InputNormalization::LayerNorm,
        other => {
            return Err(config_error(
                format!("input_normalization = {other:?}: expected \"none\" or \"layer_norm\""),
                Some("input_normalization".into()),
            ))
        }
    };
    let calibration = match concept_calibration {
        None => None,
        Some(_) if probes.is_none() => {
            return Err(base_error("concept_calibration needs probes= (a v2 pack of lenses)".into()))
        }
        Some(list) if list.len() != concepts.len() => {
            return Err(base_error(format!(
                "concept_calibration lists {} concepts, concepts {}",
                list.len(),
                concepts.len()
            )))
        }
        Some(list) => Some(
            list.into_iter()
                .enumerate()
                .map(|(i, stats)| {
                    stats
                        .map(|m| {
                            let value = serde_json::Value::from(serde_json::Map::from_iter(
                                m.into_iter().map(|(k, v)| (k, serde_json::Value::from(v))),
                            ));
                            concept_statistics(&value)
                                .map_err(|why| base_error(format!("concept_calibration[{i}]: {why}")))
                        })
                        .transpose()
                })
                .collect::<PyResult<Vec<_>>>()?,
        ),
    };
    let lenses = match probes {
        None => None,
        Some(list) => {
            if list.len() != concepts.len() {
                return Err(base_error(format!("probes lists {} concepts, concepts {}", list.len(), concepts.len())));
            }
            let mut model_layers: Vec<u32> = list.iter().flatten().map(|(m, _)| *m).collect();
            model_layers.sort_unstable();
            model_layers.dedup();
            let probes = list
                .into_iter()
                .map(|l| l.into_iter().map(|(model_layer, quantiles)| ProbeDef { model_layer, quantiles }).collect())
                .collect();
            Some(LensSpec { model_layers, probes, calibration, simplexes: Vec::new() })
        }
    };
    let c = lenses.as_ref().map_or(concepts.len(), |l| l.probes.iter().map(Vec::len).sum());
    let w1_shape: Vec<usize> = weights
        .get_item("w1")?
        .ok_or_else(|| base_error("weights has no \"w1\"".into()))?
        .getattr("shape")?
        .extract()?;
    let d = match w1_shape.as_slice() {
        [n, 128, d] if *n == c => *d,
        other => return Err(base_error(format!("weights[\"w1\"] has shape {other:?}; expected [{c}, 128, D]"))),
    };
    let (h1, h2) = (128, 64);
    let w1 = rows_of(weights, "w1", h1 * d, c)?;
    let b1 = rows_of(weights, "b1", h1, c)?;
    let w2 = rows_of(weights, "w2", h2 * h1, c)?;
    let b2 = rows_of(weights, "b2", h2, c)?;
    let w3 = rows_of(weights, "w3", h2, c)?;
    let b3 = rows_of(weights, "b3", 1, c)?;
    let spec = PackSpec {
        hidden_dim: d,
        dtype,
        input_normalization: norm,
        probes_per_shard: probes_per_shard.max(1),
        concepts: concepts.into_iter().map(|(name, layer, parents)| ConceptDef { name, layer, parents }).collect(),
        lenses,
    };
    let slice = |v: &Vec<f32>, per: usize, i: usize| v[i * per..(i + 1) * per].to_vec();
    py.detach(|| {
        write_pack(
            &out,
            &spec,
            |id| {
                let i = id as usize;
                ProbeWeights {
                    w1: slice(&w1, h1 * d, i),
                    b1: slice(&b1, h1, i),
                    w2: slice(&w2, h2 * h1, i),
                    b2: slice(&b2, h2, i),
                    w3: slice(&w3, h2, i),
                    b3: slice(&b3, 1, i),
                }
            },
            |_| {},
        )
    })
    .map_err(|e| from_pack(&e))?;
    Ok(c)
}
