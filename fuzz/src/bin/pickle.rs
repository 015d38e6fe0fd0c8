//! The pickle reader on its own: inside a zip, mutated pickles mostly fail the container's
//! checks first, so the opcodes get their own target.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(v) = probe_cascade::import::pickle::parse(data) {
            let _ = v.describe();
        }
    });
}
