//! The `hatcat_json` fuzz target (its body: `targets::run`, in src/targets.rs).
probe_cascade_fuzz::fuzz_target!("hatcat_json");
