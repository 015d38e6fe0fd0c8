//! The generated gRPC code for `proto/probe_cascade/v1/probe_cascade.proto` (see build.rs).

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("probe_cascade.v1");

    /// The proto's descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe_cascade_descriptor.bin"));
}
