//! What the fuzz targets share: an allocator that turns any single allocation over 1 GiB into
//! a crash (the campaign's limit), and a scratch directory on tmpfs for the parsers that take
//! a file or a directory, so that each execution writes its input there and calls the real
//! entry point (`Pack::open`, `npy::read`, `read_hierarchy`), not a copy of its logic.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The most one allocation may ask for: more is a finding.
pub const ALLOCATION_LIMIT: usize = 1 << 30;

pub struct Capped;

// SAFETY: forwards to the system allocator; only refuses (by aborting) oversized requests.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

fn check(size: usize) {
    if size > ALLOCATION_LIMIT {
        // No allocation here: the message is static.
        let msg = b"fuzz: an allocation over 1 GiB was asked for\n";
        // SAFETY: writing a static buffer to stderr.
        unsafe { libc_write(2, msg.as_ptr(), msg.len()) };
        std::process::abort();
    }
}

extern "C" {
    #[link_name = "write"]
    fn libc_write(fd: i32, buf: *const u8, count: usize) -> isize;
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// A directory of this process's own under /dev/shm (or the temp dir), made once.
pub fn scratch(name: &str) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("probe-cascade-fuzz-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        dir
    })
}

/// A tiny valid pack (2 concepts, D=1, bf16) in `dir`, for the targets that replace one of
/// its files with their input.
pub fn tiny_pack(dir: &Path) {
    let params = probe_cascade::synth::SynthParams {
        concepts: 3,
        roots: 1,
        layers: 2,
        branching: None,
        hidden_dim: 1,
        dtype: probe_cascade::pack::DType::Bf16,
        probes_per_shard: 8,
        ..probe_cascade::synth::SynthParams::demo()
    };
    probe_cascade::synth::write_synth_pack(dir, &params, |_| {}).expect("writing the tiny pack");
}

/// Opens a pack and reads every probe (checking lengths and CRCs): what a runtime does first.
pub fn open_and_read(dir: &Path) {
    if let Ok(pack) = probe_cascade::pack::Pack::open(dir) {
        for id in pack.hierarchy().ids() {
            let _ = pack.read_probe(id);
        }
        let _ = pack.hierarchy().layer_count();
    }
}
