//! `.npy` traces: the preamble, the header dict, the shape and the data, through `npy::read`.
use probe_cascade_fuzz::scratch;

fn main() {
    let path = scratch("npy").join("trace.npy");
    afl::fuzz!(|data: &[u8]| {
        std::fs::write(&path, data).expect("writing the input");
        if let Ok(m) = probe_cascade::npy::read(&path) {
            if m.rows > 0 {
                let _ = m.row(m.rows - 1);
            }
        }
    });
}
