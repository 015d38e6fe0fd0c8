//! `probe-cascade serve`: the runtime as a network service for generation daemons in other
//! processes (docs/serving.md).
//!
//! ```text
//!  gRPC (tonic, TCP and/or Unix socket)        HTTP (axum)
//!   Session stream ─┐                           /metrics /healthz /readyz
//!   ObserveBatch ───┼──▶ Service ──▶ State ◀──── /v1/pack /v1/sessions /v1/sessions/{id}/events
//!   Open/Close ─────┘   (per call)   (one owner: the Runtime, the live config, the sessions)
//!                                        ▲
//!                       lifecycle: SIGHUP reload, SIGTERM/SIGINT drain
//! ```

pub mod auth;
pub mod convert;
pub mod events;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod proto;
pub mod service;
pub mod state;

pub use lifecycle::{run, start, ServeOptions, Server};
pub use state::ReloadOutcome;

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] probe_cascade::config::ConfigError),
    #[error("{path}: {source}")]
    Pack {
        path: std::path::PathBuf,
        #[source]
        source: probe_cascade::pack::PackError,
    },
    #[error(transparent)]
    Runtime(#[from] probe_cascade::runtime::RuntimeError),
    #[error("{what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the bearer token file {path}: {message}")]
    Token { path: std::path::PathBuf, message: String },
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Setup(String),
}
