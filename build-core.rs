// The core crate's build script: the libtorch rpath (build.rs, shared with the other crates),
// and with the `cuda-graphs` feature the CUDA graph shim (src/runtime/scoring/cuda_graphs.cpp),
// compiled with the `cc` crate against that libtorch's headers, as torch-sys compiles its own.
#[path = "build.rs"]
mod libtorch_rpath;

fn main() {
    libtorch_rpath::main();
    #[cfg(feature = "cuda-graphs")]
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let lib = std::path::PathBuf::from(&lib);
        cuda_graphs::compile(&lib.canonicalize().unwrap_or(lib));
    }
}

#[cfg(feature = "cuda-graphs")]
mod cuda_graphs {
    use std::path::{Path, PathBuf};

    /// Where the CUDA 13 headers are: `PROBE_CASCADE_CUDA_INCLUDE` (colon-separated), then
    /// the `nvidia/cu13/include` beside a pip-installed torch (`nvidia-cuda-runtime`, and
    /// `nvidia-cuda-crt` for `crt/`), then `$CUDA_HOME/include`.
    fn cuda_includes(torch_lib: &Path) -> Vec<PathBuf> {
        println!("cargo:rerun-if-env-changed=PROBE_CASCADE_CUDA_INCLUDE");
        println!("cargo:rerun-if-env-changed=CUDA_HOME");
        let mut dirs: Vec<PathBuf> = std::env::var("PROBE_CASCADE_CUDA_INCLUDE")
            .map(|v| v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect())
            .unwrap_or_default();
        // torch_lib is site-packages/torch/lib.
        if let Some(site) = torch_lib.parent().and_then(Path::parent) {
            dirs.push(site.join("nvidia/cu13/include"));
        }
        if let Ok(home) = std::env::var("CUDA_HOME") {
            dirs.push(PathBuf::from(home).join("include"));
        }
        dirs.retain(|d| d.is_dir());
        dirs
    }

    pub fn compile(torch_lib: &Path) {
        let shim = "src/runtime/scoring/cuda_graphs.cpp";
        println!("cargo:rerun-if-changed={shim}");
        let include = torch_lib.parent().expect("libtorch's lib dir has a parent").join("include");
        let cuda = cuda_includes(torch_lib);
        let has = |rel: &str| cuda.iter().any(|d| d.join(rel).is_file());
        if !include.join("ATen/cuda/CUDAGraph.h").is_file() || !has("cuda_runtime_api.h") || !has("crt/host_config.h") {
            panic!(
                "the cuda-graphs feature needs libtorch's ATen/cuda headers (looked in {}) and CUDA 13's \
                 cuda_runtime_api.h and crt/host_config.h (looked in {cuda:?}): pip install \
                 nvidia-cuda-runtime and nvidia-cuda-crt 13.0 beside torch, or set PROBE_CASCADE_CUDA_INCLUDE \
                 (scripts/build-gpu.sh does both)",
                include.display()
            );
        }
        cc::Build::new()
            .cpp(true)
            .pic(true)
            .warnings(false)
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .includes(&cuda)
            .flag("-std=c++17")
            .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
            .flag("-DGLOG_USE_GLOG_EXPORT")
            .file(shim)
            .compile("probe_cascade_cuda_graphs");
        // The shim calls into libtorch_cuda and libc10_cuda.
        println!("cargo:rustc-link-search=native={}", torch_lib.display());
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}
