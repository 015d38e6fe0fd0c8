//! Where a Python `config=` comes from: a preset name, a TOML file, or a dict. The raw
//! document is kept too, so that session overrides can be applied on top of it and checked
//! with their full key path.

use std::path::{Path, PathBuf};

use probe_cascade::config::{CascadeConfig, Config};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::Value;

use crate::errors::{config_error, from_config};

/// The configs shipped in `config/`, by name.
pub const PRESETS: [(&str, &str); 3] = [
    ("realtime", include_str!("../../config/realtime.toml")),
    ("decompose", include_str!("../../config/decompose.toml")),
    ("offline", include_str!("../../config/offline.toml")),
];

pub struct Resolved {
    pub config: Config,
    /// The document as given (TOML or dict), for overrides.
    pub raw: Value,
    /// What to call it in messages.
    pub source: String,
}

pub fn resolve(config: Option<&Bound<'_, PyAny>>) -> PyResult<Resolved> {
    let Some(obj) = config else {
        return from_toml(PRESETS[0].1, "preset \"realtime\"");
    };
    if let Ok(dict) = obj.cast::<PyDict>() {
        let raw = to_json(dict.as_any(), "config")?;
        let config = from_value::<Config>(&raw, "")?;
        config.validate(Path::new("config dict")).map_err(|e| from_config(&e))?;
        return Ok(Resolved { config, raw, source: "config dict".into() });
    }
    let text: PathBuf = obj
        .extract::<PathBuf>()
        .map_err(|_| config_error("config must be a preset name, a path to a TOML file, or a dict".into(), None))?;
    let name = text.to_string_lossy().to_string();
    if let Some((_, toml)) = PRESETS.iter().find(|(n, _)| *n == name) {
        if !text.exists() {
            return from_toml(toml, &format!("preset \"{name}\""));
        }
    }
    let body = std::fs::read_to_string(&text).map_err(|e| {
        let presets: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        config_error(
            format!(
                "{}: {e} (config is a path to a TOML file, a dict, or a preset: {})",
                text.display(),
                presets.join(", ")
            ),
            None,
        )
    })?;
    from_toml(&body, &text.display().to_string())
}

fn from_toml(text: &str, source: &str) -> PyResult<Resolved> {
    let (config, raw) = Config::parse_document(text, Path::new(source)).map_err(|e| from_config(&e))?;
    Ok(Resolved { config, raw, source: source.into() })
}

fn key_error(e: probe_cascade::config::KeyError) -> PyErr {
    config_error(e.to_string(), Some(e.key))
}

/// Deserializes, naming the full key path of what is wrong.
fn from_value<T: serde::de::DeserializeOwned>(value: &Value, root: &str) -> PyResult<T> {
    probe_cascade::config::from_json(value, root).map_err(key_error)
}

/// The cascade section of `raw` with `overrides` (cascade keys) applied.
pub fn cascade_with(raw: &Value, overrides: &serde_json::Map<String, Value>) -> PyResult<CascadeConfig> {
    probe_cascade::config::cascade_with(raw, overrides).map_err(key_error)
}

/// A Python value as JSON: dicts with string keys, lists, tuples, strings, numbers, bools,
/// None. `key` names where it is, for errors.
pub fn to_json(obj: &Bound<'_, PyAny>, key: &str) -> PyResult<Value> {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if obj.is_instance_of::<PyBool>() {
        return Ok(Value::Bool(obj.extract()?));
    }
    if obj.is_instance_of::<PyInt>() {
        return match obj.extract::<i64>() {
            Ok(v) => Ok(Value::from(v)),
            Err(_) => Err(config_error(format!("`{key}`: {obj} does not fit in 64 bits"), Some(key.into()))),
        };
    }
    if obj.is_instance_of::<PyFloat>() {
        let v: f64 = obj.extract()?;
        return serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| config_error(format!("`{key}`: {v} is not a finite number"), Some(key.into())));
    }
    if obj.is_instance_of::<PyString>() {
        return Ok(Value::String(obj.extract()?));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut map = serde_json::Map::new();
        for (k, v) in d.iter() {
            let k: String = k
                .extract()
                .map_err(|_| config_error(format!("`{key}`: keys must be strings, not {k}"), Some(key.into())))?;
            let inner = format!("{key}.{k}");
            map.insert(k, to_json(&v, &inner)?);
        }
        return Ok(Value::Object(map));
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let items: Vec<Bound<'_, PyAny>> = obj.try_iter()?.collect::<PyResult<_>>()?;
        return items.iter().enumerate().map(|(i, v)| to_json(v, &format!("{key}[{i}]"))).collect();
    }
    let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
    Err(config_error(format!("`{key}`: a {ty} is not a config value"), Some(key.into())))
}

/// JSON as Python objects.
pub fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any(),
            (_, Some(i)) => i.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(a) => {
            let list = PyList::empty(py);
            for x in a {
                list.append(to_py(py, x)?)?;
            }
            list.into_any()
        }
        Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}
