// torch-sys links libtorch but gives the final binary no rpath, so binaries, tests and benches
// would need LD_LIBRARY_PATH. torch-sys exports its lib dir (links = "tch"); resolve it (it is
// usually the `.libtorch` symlink into ~/.cache) and bake it in as an rpath.
use std::path::PathBuf;

pub fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = PathBuf::from(&lib);
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // A full torch install carries libtorch_cuda.so; rustc links with --as-needed, which would
    // drop it (nothing references its symbols directly) and leave CUDA unregistered at run time.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
