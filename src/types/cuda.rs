//! The few CUDA runtime calls tch does not bind: free device memory (the resident store's
//! default budget) and events (ordering the runtime's reads of a caller's CUDA tensor after
//! the stream that produced it, without the host waiting).
//!
//! Why looked up rather than linked: libtorch_cuda loads libcudart, in the GPU binary and
//! under Python's torch alike, so the symbols are there whenever a CUDA tensor can exist;
//! linking libcudart ourselves would tie the build (and the CPU wheel) to one CUDA install.
//! Where the symbols are missing (a CPU libtorch) every call says so in its error.

use std::ffi::{c_void, CStr};

/// A CUDA runtime call that failed, or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    #[error("{call} is not among the loaded libraries (no CUDA libtorch in this process)")]
    Missing { call: &'static str },
    #[error("{call} failed with CUDA error {code}")]
    Failed { call: &'static str, code: i32 },
}

/// The address of `name` among the loaded libraries.
fn symbol(name: &'static CStr) -> Result<*mut c_void, CudaError> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name has no other precondition.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if p.is_null() {
        return Err(CudaError::Missing { call: name.to_str().unwrap_or("?") });
    }
    Ok(p)
}

fn check(call: &'static str, code: i32) -> Result<(), CudaError> {
    if code == 0 {
        Ok(())
    } else {
        Err(CudaError::Failed { call, code })
    }
}

type GetDevice = unsafe extern "C" fn(*mut i32) -> i32;
type SetDevice = unsafe extern "C" fn(i32) -> i32;

/// Runs `f` with device `index` current on this thread, then puts the previous one back.
fn on_device<T>(index: usize, f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    // SAFETY: the symbols are the CUDA runtime's, with these C signatures (cuda_runtime_api.h),
    // called with valid pointers to locals.
    unsafe {
        let get: GetDevice = std::mem::transmute(symbol(c"cudaGetDevice")?);
        let set: SetDevice = std::mem::transmute(symbol(c"cudaSetDevice")?);
        let mut current = 0i32;
        check("cudaGetDevice", get(&mut current))?;
        if current == index as i32 {
            return f();
        }
        check("cudaSetDevice", set(index as i32))?;
        let out = f();
        set(current);
        out
    }
}

/// Free memory of CUDA device `index` (`cudaMemGetInfo`).
pub fn free_memory(index: usize) -> Result<u64, CudaError> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    on_device(index, || {
        // SAFETY: as in `on_device`.
        unsafe {
            let info: MemGetInfo = std::mem::transmute(symbol(c"cudaMemGetInfo")?);
            let (mut free, mut total) = (0usize, 0usize);
            check("cudaMemGetInfo", info(&mut free, &mut total))?;
            Ok(free as u64)
        }
    })
}

/// A CUDA event recorded on the stream that produced a caller's tensor. The runtime's own
/// work on the device goes to the legacy default stream (libtorch's current stream on a
/// thread that set none); [`StreamEvent::order_default_stream`] makes that stream wait for the
/// event on the device, so the host never waits for the producer and the caller need not
/// synchronise.
#[derive(Debug)]
pub struct StreamEvent {
    event: *mut c_void,
    device: usize,
}

// SAFETY: a CUDA event handle may be used and destroyed from any thread.
unsafe impl Send for StreamEvent {}
unsafe impl Sync for StreamEvent {}

const EVENT_DISABLE_TIMING: u32 = 0x02;

impl StreamEvent {
    /// Records an event on `stream` (a `cudaStream_t`, as `torch.cuda.Stream.cuda_stream`
    /// gives it) of device `device`, after the work queued there so far.
    pub fn record(device: usize, stream: usize) -> Result<Self, CudaError> {
        type Create = unsafe extern "C" fn(*mut *mut c_void, u32) -> i32;
        type Record = unsafe extern "C" fn(*mut c_void, *mut c_void) -> i32;
        on_device(device, || {
            // SAFETY: as in `on_device`; `stream` is a live stream of `device` (the caller's
            // current stream), and the event is destroyed once, on drop.
            unsafe {
                let create: Create = std::mem::transmute(symbol(c"cudaEventCreateWithFlags")?);
                let record: Record = std::mem::transmute(symbol(c"cudaEventRecord")?);
                let mut event = std::ptr::null_mut();
                check("cudaEventCreateWithFlags", create(&mut event, EVENT_DISABLE_TIMING))?;
                let recorded = Self { event, device };
                check("cudaEventRecord", record(event, stream as *mut c_void))?;
                Ok(recorded)
            }
        })
    }

    /// Makes the device's legacy default stream wait for the event: later work there (the
    /// runtime's reads of the tensor) runs after the producer's. The host does not wait.
    pub fn order_default_stream(&self) -> Result<(), CudaError> {
        type Wait = unsafe extern "C" fn(*mut c_void, *mut c_void, u32) -> i32;
        on_device(self.device, || {
            // SAFETY: as in `on_device`; the null stream is the legacy default stream of the
            // current device, which `on_device` made the event's.
            unsafe {
                let wait: Wait = std::mem::transmute(symbol(c"cudaStreamWaitEvent")?);
                check("cudaStreamWaitEvent", wait(std::ptr::null_mut(), self.event, 0))
            }
        })
    }
}

impl Drop for StreamEvent {
    fn drop(&mut self) {
        type Destroy = unsafe extern "C" fn(*mut c_void) -> i32;
        // Destroying an event whose wait is queued is allowed: CUDA releases it once done.
        if let Ok(p) = symbol(c"cudaEventDestroy") {
            // SAFETY: the event was created by `record` and is destroyed only here.
            unsafe {
                let destroy: Destroy = std::mem::transmute(p);
                destroy(self.event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_cuda_libtorch_each_call_names_what_is_missing() {
        if symbol(c"cudaGetDevice").is_ok() {
            return; // A CUDA libtorch is loaded: tests/runtime.rs covers the calls there.
        }
        let e = StreamEvent::record(0, 0).unwrap_err();
        assert_eq!(e, CudaError::Missing { call: "cudaGetDevice" });
        assert!(e.to_string().contains("no CUDA libtorch"), "{e}");
        assert!(free_memory(0).is_err());
    }
}
