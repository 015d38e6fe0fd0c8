// Compiles proto/probe_cascade/v1/probe_cascade.proto with protox (pure Rust: no protoc) into
// tonic's server and client code, and keeps the descriptor set for gRPC reflection.
// It also gives tests the libtorch rpath, as the core's build script does.
use std::path::PathBuf;

#[path = "../build.rs"]
mod libtorch_rpath;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    libtorch_rpath::main();
    let proto_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let proto = proto_dir.join("probe_cascade/v1/probe_cascade.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let fds = protox::compile([&proto], [&proto_dir])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("probe_cascade_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().bytes(".probe_cascade.v1.HiddenState.data").compile_fds(fds)?;
    Ok(())
}
