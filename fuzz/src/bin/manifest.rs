//! The pack manifest (manifest.json): JSON, the format checks, the hierarchy it declares and
//! the shard locations, through `Pack::open` on a pack whose shard is valid, so that a
//! manifest that parses goes on to the probe reads.
use probe_cascade_fuzz::{open_and_read, scratch, tiny_pack};

fn main() {
    let dir = scratch("manifest");
    tiny_pack(dir);
    afl::fuzz!(|data: &[u8]| {
        std::fs::write(dir.join("manifest.json"), data).expect("writing the input");
        open_and_read(dir);
    });
}
