// The extension links libtorch from the torch installed in the Python environment
// (LIBTORCH_USE_PYTORCH). Its run-time search path is relative to where it is installed,
// site-packages/probe_cascade/_native*.so, so it finds site-packages/torch/lib: the same
// libraries `import torch` loaded, wherever the environment lives. No absolute build path.
fn main() {
    println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../torch/lib");
}
