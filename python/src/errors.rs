//! The exception hierarchy, and how the core's errors map onto it. Each exception's message
//! names the thing (the token and position, the concept and file, the config key), and the
//! same facts are attributes: `token`, `position`, `key`, `path`, where known.

use probe_cascade::config::ConfigError as CoreConfigError;
use probe_cascade::pack::PackError;
use probe_cascade::runtime::{RuntimeError, StartError, TokenError, TokenErrorKind};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

pyo3::create_exception!(probe_cascade, ProbeCascadeError, PyException, "Base class of probe_cascade's errors.");
pyo3::create_exception!(
    probe_cascade,
    BadHiddenState,
    ProbeCascadeError,
    "A hidden state the runtime cannot score: wrong width, shape or dtype, NaN or infinity."
);
pyo3::create_exception!(
    probe_cascade,
    ProbeLoadError,
    ProbeCascadeError,
    "A pack or probe that cannot be read: a missing or corrupt file, a bad checksum."
);
pyo3::create_exception!(
    probe_cascade,
    ConfigError,
    ProbeCascadeError,
    "A bad config file, dict or session option: names the key."
);

/// Facts an exception carries as attributes, besides its message.
#[derive(Default)]
pub struct Facts {
    pub token: Option<usize>,
    pub position: Option<usize>,
    pub key: Option<String>,
    pub path: Option<String>,
}

pub fn raise<E: pyo3::PyTypeInfo>(message: String, facts: Facts) -> PyErr {
    Python::attach(|py| {
        let err = PyErr::new::<E, _>(message);
        let value = err.value(py);
        // Attributes are best effort: the message already says it all.
        let _ = value.setattr("token", facts.token);
        let _ = value.setattr("position", facts.position);
        let _ = value.setattr("key", facts.key);
        let _ = value.setattr("path", facts.path);
        err
    })
}

pub fn bad_hidden(message: String, position: Option<usize>) -> PyErr {
    raise::<BadHiddenState>(message, Facts { position, ..Facts::default() })
}

pub fn config_error(message: String, key: Option<String>) -> PyErr {
    raise::<ConfigError>(message, Facts { key, ..Facts::default() })
}

pub fn base_error(message: String) -> PyErr {
    raise::<ProbeCascadeError>(message, Facts::default())
}

pub fn from_config(e: &CoreConfigError) -> PyErr {
    let (key, path) = match e {
        CoreConfigError::Invalid { key, path, .. } => (Some(key.to_string()), Some(path.display().to_string())),
        CoreConfigError::Io { path, .. } | CoreConfigError::Parse { path, .. } => {
            (None, Some(path.display().to_string()))
        }
        CoreConfigError::AgainstPack { key, .. } => (Some(key.to_string()), None),
    };
    raise::<ConfigError>(e.to_string(), Facts { key, path, ..Facts::default() })
}

pub fn from_pack(e: &PackError) -> PyErr {
    raise::<ProbeLoadError>(e.to_string(), Facts { path: pack_path(e), ..Facts::default() })
}

fn pack_path(e: &PackError) -> Option<String> {
    match e {
        PackError::Io { path, .. } => Some(path.display().to_string()),
        _ => None,
    }
}

/// `position`: where the hidden state was in an `observe_batch` call.
pub fn from_runtime(e: &RuntimeError, position: Option<usize>) -> PyErr {
    let token = e.token().filter(|&t| t != usize::MAX);
    let at = match position {
        Some(p) => format!("observe_batch item {p}: "),
        None => String::new(),
    };
    let message = format!("{at}{e}");
    let facts = Facts { token, position, ..Facts::default() };
    match e {
        RuntimeError::Token(TokenError { kind: TokenErrorKind::Hidden(_), .. }) => {
            raise::<BadHiddenState>(message, facts)
        }
        RuntimeError::Token(TokenError { kind: TokenErrorKind::Probe(source), .. }) => {
            raise::<ProbeLoadError>(message, Facts { path: pack_path(&source.0), ..facts })
        }
        // The exception's class and its key come from the variant, not from the message.
        RuntimeError::Options(StartError::Config(
            CoreConfigError::Invalid { key, .. } | CoreConfigError::AgainstPack { key, .. },
        ))
        | RuntimeError::FixedKey { key } => {
            raise::<ConfigError>(message, Facts { key: Some(key.to_string()), ..facts })
        }
        RuntimeError::Options(_) => raise::<ConfigError>(message, facts),
        _ => raise::<ProbeCascadeError>(message, facts),
    }
}
