//! What the fuzz targets share: an allocator that turns any single allocation over 1 GiB into
//! a crash (the campaign's limit), a scratch directory on tmpfs for the parsers that take a
//! file or a directory, and the targets' bodies ([`targets`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};

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
        // A static message through unbuffered stderr: nothing allocates on the way out.
        let _ = std::io::Write::write_all(&mut std::io::stderr(), b"fuzz: an allocation over 1 GiB was asked for\n");
        std::process::abort();
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

pub mod targets;

/// Target `name`'s scratch directory under /dev/shm (or the temp dir), emptied and made
/// afresh. One per target: a campaign runs one instance of each.
pub fn scratch(name: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = base.join(format!("probe-cascade-fuzz-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

/// The body of every fuzz target's `main`: its scratch directory prepared once, then AFL's
/// loop over inputs.
#[macro_export]
macro_rules! fuzz_target {
    ($name:literal) => {
        fn main() {
            let dir = $crate::scratch($name);
            $crate::targets::prepare($name, &dir);
            let live = $crate::targets::realtime();
            afl::fuzz!(|data: &[u8]| {
                $crate::targets::run($name, &dir, &live, data);
            });
        }
    };
}
