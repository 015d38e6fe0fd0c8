// The libtorch rpath, as the core's build script gives its binaries.
#[path = "../build.rs"]
mod libtorch_rpath;

fn main() {
    libtorch_rpath::main();
}
