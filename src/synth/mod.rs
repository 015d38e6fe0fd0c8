//! Synthetic packs and traces, for demos, tests and benchmarks.

mod names;
pub mod pack;
pub mod trace;

pub use pack::{synth_hierarchy, synth_probe, write_synth_pack, SynthParams};
pub use trace::{concept_geometry, synth_trace, TraceParams};
