//! The actor runtime: reads on io_uring, a byte-budgeted RAM cache, slots in a device arena,
//! batched inference on its own thread, and the cascade policies on top (docs/architecture.md).

pub mod cache;
pub mod reader;
