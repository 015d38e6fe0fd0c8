//! A safetensors shard: its header (length prefix, JSON, tensor names, dtypes, shapes,
//! `data_offsets`) against the manifest's byte ranges, then every probe's read (bounds, CRC),
//! through `Pack::open` on a pack whose manifest is valid and whose shard is the input.
use probe_cascade_fuzz::{open_and_read, scratch, tiny_pack};

fn main() {
    let dir = scratch("safetensors");
    tiny_pack(dir);
    let shard = std::fs::read_dir(dir)
        .expect("the tiny pack")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("a shard");
    afl::fuzz!(|data: &[u8]| {
        std::fs::write(&shard, data).expect("writing the input");
        open_and_read(dir);
    });
}
