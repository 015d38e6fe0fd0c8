//! A `torch.save` file as HatCat publishes them: the zip container, the pickle inside, the
//! tensors it describes, and their reading as a trained probe. Never executes anything: the
//! pickle reader knows a fixed set of opcodes and globals.
use std::path::Path;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(tensors) = probe_cascade::import::torch_file::parse_state_dict(data, Path::new("input.pt")) {
            if let Ok(probe) = probe_cascade::import::hatcat::trained_probe(tensors) {
                let _ = probe.folded();
            }
        }
    });
}
