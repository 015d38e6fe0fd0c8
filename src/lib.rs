//! probe-cascade: evaluates a hierarchy of concept probes on an LLM's hidden states, token by
//! token, loading only the probes the cascade needs.

pub mod config;
pub mod engine;
pub mod fidelity;
pub mod headspace;
pub mod import;
pub mod kernel;
pub mod npy;
pub mod pack;
pub mod policy;
pub mod runtime;
pub mod synth;
pub mod tune;
pub mod types;
pub mod viewer;
