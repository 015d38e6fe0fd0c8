//! The `headspace_calibration` fuzz target (its body: `targets::run`, in src/targets.rs).
probe_cascade_fuzz::fuzz_target!("headspace_calibration");
