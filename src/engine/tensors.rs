//! tch helpers shared by the engines: device selection and probe tensors from pack bytes.

use std::collections::HashMap;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::{BackendError, EngineError};
use crate::config::{DeviceConfig, DeviceKind};
use crate::pack::{DType, Pack, ProbeId, ProbeLayout, TensorOffsets};

pub fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::Bf16 => Kind::BFloat16,
    }
}

/// The math thread count: `device.threads`, or every core when it is 0.
pub fn math_threads(config: &DeviceConfig) -> usize {
    match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Resolves the configured device, and sets the math thread count (a process-wide setting).
pub fn open_device(config: &DeviceConfig) -> Result<Device, EngineError> {
    tch::set_num_threads(math_threads(config) as i32);
    match config.kind().map_err(|m| EngineError::Device(format!("device.device {m}")))? {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda(n) => {
            let count = tch::Cuda::device_count();
            if (n as i64) < count {
                Ok(Device::Cuda(n))
            } else {
                Err(EngineError::Device(format!(
                    "device.device = \"{}\" but libtorch sees {count} CUDA device(s) (a CPU-only libtorch sees none)",
                    config.device
                )))
            }
        }
    }
}

/// A device as `device.device` spells it: `"cpu"`, `"cuda:0"`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// One probe's six tensors on the device, in the compute dtype.
pub struct ProbeTensors {
    pub w1: Tensor,
    pub b1: Tensor,
    pub w2: Tensor,
    pub b2: Tensor,
    pub w3: Tensor,
    pub b3: Tensor,
}

impl ProbeTensors {
    /// Builds fresh tensors from a probe's checked bytes.
    pub fn from_bytes(
        layout: &ProbeLayout,
        offsets: &TensorOffsets,
        bytes: &[u8],
        device: Device,
        compute: Kind,
    ) -> Result<Self, tch::TchError> {
        let storage = kind_of(layout.dtype);
        let ranges = layout.ranges(offsets);
        let slots = layout.tensors();
        let make = |i: usize| -> Result<Tensor, tch::TchError> {
            let shape: Vec<i64> = slots[i].shape().iter().map(|&d| d as i64).collect();
            Tensor::f_from_data_size(&bytes[ranges[i].clone()], &shape, storage)?
                .f_to_kind(compute)?
                .f_to_device(device)
        };
        use crate::pack::layout::{B1, B2, B3, W1, W2, W3};
        Ok(Self { w1: make(W1)?, b1: make(B1)?, w2: make(W2)?, b2: make(B2)?, w3: make(W3)?, b3: make(B3)? })
    }
}

impl ProbeTensors {
    /// Applies `f` to each of the six tensors.
    pub fn try_map(&self, f: impl Fn(&Tensor) -> Result<Tensor, tch::TchError>) -> Result<Self, tch::TchError> {
        Ok(Self {
            w1: f(&self.w1)?,
            b1: f(&self.b1)?,
            w2: f(&self.w2)?,
            b2: f(&self.b2)?,
            w3: f(&self.w3)?,
            b3: f(&self.b3)?,
        })
    }
}

/// What a synchronous backend holds: the tensors of its active probes, on one device.
pub struct HeldProbes {
    pub pack: Arc<Pack>,
    pub device: Device,
    pub compute: Kind,
    probes: HashMap<ProbeId, ProbeTensors>,
}

impl HeldProbes {
    pub fn new(pack: Arc<Pack>, device: Device, compute: Kind) -> Self {
        Self { pack, device, compute, probes: HashMap::new() }
    }

    /// Reads a probe from the pack (a fresh open and read, CRC checked) into new tensors.
    pub fn read(&self, id: ProbeId, device: Device, kind: Kind) -> Result<ProbeTensors, BackendError> {
        let bytes = self.pack.read_probe(id)?;
        Ok(ProbeTensors::from_bytes(&self.pack.layout(), &self.pack.tensor_offsets(id), &bytes, device, kind)?)
    }

    pub fn insert(&mut self, id: ProbeId, probe: ProbeTensors) {
        self.probes.insert(id, probe);
    }

    pub fn remove(&mut self, ids: &[ProbeId]) {
        for id in ids {
            self.probes.remove(id);
        }
    }

    pub fn get(&self, id: ProbeId) -> Result<&ProbeTensors, BackendError> {
        self.probes.get(&id).ok_or(BackendError::NotLoaded(id))
    }
}

/// The hidden state as a [D, 1] column on the device.
pub fn hidden_column(hidden: &[f32], device: Device, compute: Kind) -> Result<Tensor, tch::TchError> {
    Tensor::f_from_slice(hidden)?.f_view([hidden.len() as i64, 1])?.f_to_kind(compute)?.f_to_device(device)
}

/// Copies a small float tensor back to the host as f32.
pub fn to_host_f32(t: &Tensor) -> Result<Vec<f32>, tch::TchError> {
    let t = t.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?.f_view([-1])?;
    Vec::<f32>::try_from(&t)
}

/// Logits of `n` stacked probes: weights `[n,128,D]`, `[n,64,128]`, `[n,1,64]`, biases
/// `[n,128,1]`, `[n,64,1]`, `[n,1,1]` (contiguous), hidden state `[D,1]`. The first layer is
/// one matrix-vector product over all `n·128` rows: on CPU that runs near the memory-bandwidth
/// floor, where `baddbmm` with a broadcast input ran 2.5× slower (measured on a 2-core
/// machine). Every engine scores through this function, so their logits agree bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn batched_logits(
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
    w3: &Tensor,
    b3: &Tensor,
    x: &Tensor,
    split: &RowSplit,
) -> Result<Tensor, tch::TchError> {
    let n = w1.size()[0];
    let d = x.size()[0];
    let a1 = split.addmv(&b1.f_view([-1])?, &w1.f_view([-1, d])?, &x.f_view([-1])?)?.f_relu()?.f_view([n, -1, 1])?;
    let a2 = b2.f_baddbmm(w2, &a1, 1, 1)?.f_relu()?;
    b3.f_baddbmm(w3, &a2, 1, 1)?.f_view([-1])
}

/// A unit of work for a helper thread; its tensors are views the caller keeps alive.
type RowJob = Box<dyn FnOnce() -> Result<Tensor, tch::TchError> + Send>;

/// Runs the heavy row-wise work of CPU scoring (the first layer's matrix-vector product, and
/// copying a probe's first-layer weights into a slot) in row blocks on several threads.
///
/// Why: MKL's `sgemv` runs this shape on one thread, and one core reads about 20 GB/s where
/// two reach the machine's ~28–31 GB/s. libtorch's own thread pool cannot help: its idle
/// OpenMP workers spin for the next region and take the core a helper needs, which is why a
/// thread that owns a `RowSplit` sets libtorch to one thread for itself
/// ([`RowSplit::single_threaded_torch`]) and gets its parallelism here instead.
///
/// Each block is still one libtorch call, and product blocks start at multiples of 128 rows.
/// On AMD's AVX2 MKL path that kept every row's bits; on an Intel AVX-512 machine it did not
/// (3 of 389 logits changed), and nothing in MKL promises it. So only rounding-level agreement
/// is guaranteed here; bit-exact, batch-invariant scoring is the CPU kernel's
/// ([`crate::kernel`]), which the runtime uses on the CPU unless `device.cpu_kernel = "torch"`.
/// The helpers are long-lived threads fed through bounded channels, one job each per call;
/// every call waits for all of its jobs, so views lent to helpers never outlive the call.
pub struct RowSplit {
    helpers: Vec<Helper>,
}

struct Helper {
    jobs: Option<flume::Sender<RowJob>>,
    results: flume::Receiver<Result<Tensor, tch::TchError>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Product blocks start at multiples of this: MKL's kernels handle rows in groups, and a block
/// boundary inside a group changed how the tail rows were summed (and their bits) on AMD.
const ROW_ALIGN: i64 = 128;

/// Work on fewer bytes than this stays on the calling thread: the hand-off would cost more.
const SPLIT_MIN_BYTES: i64 = 1 << 20;

impl RowSplit {
    /// No helpers: all work on the calling thread.
    pub fn none() -> Self {
        Self { helpers: Vec::new() }
    }

    /// `parts` row blocks: `parts - 1` helper threads plus the caller.
    pub fn new(parts: usize) -> Self {
        let helpers = (1..parts.max(1))
            .map(|i| {
                let (jobs, inbox) = flume::bounded::<RowJob>(1);
                let (reply, results) = flume::bounded(1);
                let thread = std::thread::Builder::new()
                    .name(format!("row-split-{i}"))
                    .spawn(move || {
                        Self::single_threaded_torch();
                        let _no_grad = tch::no_grad_guard();
                        for job in inbox {
                            if reply.send(job()).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("spawning a math helper thread");
                Helper { jobs: Some(jobs), results, thread: Some(thread) }
            })
            .collect();
        Self { helpers }
    }

    pub fn parts(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Makes libtorch run single-threaded on the calling thread (its OpenMP and MKL thread
    /// counts are per thread; this also becomes the default for threads libtorch sets up later).
    pub fn single_threaded_torch() {
        tch::set_num_threads(1);
    }

    /// `b + w·x` for `w` [rows, D], `b` [rows], `x` [D].
    pub fn addmv(&self, b: &Tensor, w: &Tensor, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let rows = w.size()[0];
        let per_part = (rows + self.parts() as i64 - 1) / self.parts() as i64;
        let block = (per_part + ROW_ALIGN - 1) / ROW_ALIGN * ROW_ALIGN;
        let blocks = self.run(w, rows, block, |start, len| {
            let (b, w, x) = (b.shallow_clone(), w.shallow_clone(), x.shallow_clone());
            Box::new(move || b.f_narrow(0, start, len)?.f_addmv(&w.f_narrow(0, start, len)?, &x))
        })?;
        match blocks.len() {
            1 => Ok(blocks.into_iter().next().expect("one block")),
            _ => Tensor::f_cat(&blocks, 0),
        }
    }

    /// `dst.copy_(src)`, in row blocks along the first dimension (converting dtype as `copy_`
    /// does). `src` may borrow memory it does not own (`from_blob`): it is only read until
    /// this returns.
    pub fn copy(&self, dst: &Tensor, src: &Tensor) -> Result<(), tch::TchError> {
        let rows = dst.size().first().copied().unwrap_or(1);
        let block = (rows + self.parts() as i64 - 1) / self.parts() as i64;
        self.run(dst, rows, block, |start, len| {
            let (dst, src) = (dst.shallow_clone(), src.shallow_clone());
            Box::new(move || {
                let mut view = dst.f_narrow(0, start, len)?;
                view.f_copy_(&src.f_narrow(0, start, len)?)?;
                Ok(view)
            })
        })?;
        Ok(())
    }

    /// Runs `job(start, len)` for each block of `block` rows (the first on this thread) and
    /// returns the results in row order. Small or non-CPU work runs as one block here.
    fn run(
        &self,
        size_of: &Tensor,
        rows: i64,
        block: i64,
        job: impl Fn(i64, i64) -> RowJob,
    ) -> Result<Vec<Tensor>, tch::TchError> {
        let bytes = size_of.numel() as i64 * size_of.kind().elt_size_in_bytes() as i64;
        if self.helpers.is_empty() || size_of.device() != Device::Cpu || bytes < SPLIT_MIN_BYTES || block >= rows {
            return Ok(vec![job(0, rows)()?]);
        }
        let used = ((rows + block - 1) / block - 1) as usize;
        let mut sent = 0;
        let mut failure = None;
        for (i, helper) in self.helpers[..used].iter().enumerate() {
            let start = block * (i as i64 + 1);
            let work = job(start, block.min(rows - start));
            match helper.jobs.as_ref().expect("open until drop").send(work) {
                Ok(()) => sent += 1,
                Err(_) => {
                    failure = Some(stopped());
                    break;
                }
            }
        }
        let first = match failure {
            None => job(0, block)(),
            Some(e) => Err(e),
        };
        // Collect every answer owed, even after a failure: none may be left for the next call,
        // and no borrowed view may be in use once this returns.
        let mut blocks = vec![first];
        for helper in &self.helpers[..sent] {
            blocks.push(helper.results.recv().unwrap_or_else(|_| Err(stopped())));
        }
        blocks.into_iter().collect()
    }
}

fn stopped() -> tch::TchError {
    tch::TchError::Torch("a math helper thread stopped".into())
}

impl Drop for RowSplit {
    fn drop(&mut self) {
        for helper in &mut self.helpers {
            helper.jobs.take();
            if let Some(thread) = helper.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the split guarantees on any CPU: the same rows, each within rounding of one call.
    /// (Bit identity held on AMD's MKL path only; see [`RowSplit`].)
    #[test]
    fn row_blocks_agree_with_one_call_within_rounding() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(7);
        for (rows, d) in [(30 * 128, 2560), (3 * 128 + 5, 2000), (100, 64)] {
            let w = Tensor::randn([rows, d], (Kind::Float, Device::Cpu));
            let b = Tensor::randn([rows], (Kind::Float, Device::Cpu));
            let x = Tensor::randn([d], (Kind::Float, Device::Cpu));
            let want = Vec::<f32>::try_from(&b.addmv(&w, &x)).unwrap();
            for parts in [1, 2, 3, 7] {
                let split = RowSplit::new(parts);
                assert_eq!(split.parts(), parts);
                let scale = (d as f32).sqrt();
                for _ in 0..2 {
                    let got = Vec::<f32>::try_from(&split.addmv(&b, &w, &x).unwrap()).unwrap();
                    assert_eq!(got.len(), want.len());
                    for (row, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * scale * (1.0 + w.abs()),
                            "rows {rows}, d {d}, {parts} parts, row {row}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn row_block_copies_convert_and_land_like_one_copy() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(11);
        let src = Tensor::randn([128, 4096], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let want = src.to_kind(Kind::Float);
        for parts in [1, 2, 3] {
            let arena = Tensor::zeros([3, 128, 4096], (Kind::Float, Device::Cpu));
            RowSplit::new(parts).copy(&arena.get(1), &src).unwrap();
            assert!(arena.get(1).equal(&want), "{parts} parts");
            assert_eq!(arena.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0, "neighbours untouched");
            assert_eq!(arena.get(2).abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
    }
}
