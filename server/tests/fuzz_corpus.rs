//! Replays every committed fuzz input (fuzz/corpus/<target>/, and fuzz/regressions/<target>/
//! where a campaign found something) through the fuzz targets' own bodies, uninstrumented:
//! each must be handled (a value or an error) without a panic, on every `make test`. The
//! campaign itself is `make fuzz` (docs/reliability.md, "Fuzzing").

#[path = "../../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

#[test]
fn every_committed_fuzz_input_is_handled_without_a_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let live = targets::realtime();
    for name in targets::NAMES {
        let dir = tempfile::tempdir().unwrap();
        targets::prepare(name, dir.path());
        let mut inputs = 0;
        for set in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(set).join(name)) else { continue };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    targets::run(name, dir.path(), &live, &data)
                }));
                assert!(caught.is_ok(), "{name}: {} panicked", path.display());
                inputs += 1;
            }
        }
        assert!(inputs > 0, "{name}: a committed seed corpus");
        println!("{name}: {inputs} inputs");
    }
}
