//! Kernels and components against their floors: batched inference (f32 and bf16 weights) vs
//! the memory-bandwidth floor, installing a probe, cache hit/miss/evict, reader throughput
//! (io_uring vs threads) and one actor round trip. Each prints bytes per second where bytes
//! make sense.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kameo::prelude::Spawn;
use probe_cascade::config::Config;
use probe_cascade::engine::tensors::{batched_logits, RowSplit};
use probe_cascade::pack::{write_pack, ConceptDef, DType, Pack, PackSpec, ProbeId, ProbeWeights};
use probe_cascade::runtime::cache::ProbeBytes;
use probe_cascade::runtime::cache::{CacheSettings, Get, WeightCache};
use probe_cascade::runtime::faults::Faults;
use probe_cascade::runtime::pool::SlotOp;
use probe_cascade::runtime::reader::{start_reader, ReadRequest, ReaderKind};
use probe_cascade::runtime::scoring::torch::TorchBackend;
use probe_cascade::runtime::scoring::ScoringBackend;
use probe_cascade::runtime::Cascade;
use probe_cascade::runtime::SessionId;
use tch::{Device, Kind, Tensor};

const D: i64 = 2560;

/// This machine's read bandwidth: summing a 512 MB f32 tensor, best of five.
fn read_bandwidth() -> f64 {
    let t = Tensor::ones([128 << 20], (Kind::Float, Device::Cpu));
    (0..5)
        .map(|_| {
            let s = Instant::now();
            let _ = t.sum(Kind::Float).double_value(&[]);
            (512u64 << 20) as f64 / s.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn inference(c: &mut Criterion) {
    let _g = tch::no_grad_guard();
    tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()) as i32);
    let bw = read_bandwidth();
    eprintln!("measured read bandwidth: {:.1} GB/s", bw / 1e9);
    let mut group = c.benchmark_group("inference");
    group.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // What the runtime runs (the first layer split in row blocks over the cores), and the
    // same math as one `addmv` call, for comparison.
    let (split, single) = (RowSplit::new(threads), RowSplit::none());
    for (kind, name, split) in
        [(Kind::Float, "f32", &split), (Kind::Float, "f32-one-call", &single), (Kind::BFloat16, "bf16", &split)]
    {
        // As in the runtime: libtorch single-threaded beside the row blocks, all threads without.
        if split.parts() > 1 {
            RowSplit::single_threaded_torch();
        } else {
            tch::set_num_threads(threads as i32);
        }
        for s in [14i64, 30, 100, 500] {
            let opts = (kind, Device::Cpu);
            let (w1, b1) = (Tensor::randn([s, 128, D], opts) * 0.02, Tensor::zeros([s, 128, 1], opts));
            let (w2, b2) = (Tensor::randn([s, 64, 128], opts) * 0.1, Tensor::zeros([s, 64, 1], opts));
            let (w3, b3) = (Tensor::randn([s, 1, 64], opts) * 0.1, Tensor::zeros([s, 1, 1], opts));
            let x = Tensor::randn([D, 1], opts);
            let bytes = (s * (128 * D + 128 + 64 * 128 + 64 + 64 + 1)) as u64 * kind.elt_size_in_bytes() as u64;
            let floor_ms = bytes as f64 / bw * 1e3;
            eprintln!(
                "inference/{name}/S={s}: {:.1} MB of weights per token, floor {floor_ms:.3} ms",
                bytes as f64 / 1e6
            );
            group.throughput(Throughput::Bytes(bytes));
            group.bench_with_input(BenchmarkId::new(name, s), &s, |b, _| {
                b.iter(|| batched_logits(&w1, &b1, &w2, &b2, &w3, &b3, &x, split).unwrap())
            });
        }
    }
    group.finish();
}

/// A pack of `n` f32 probes at D=2560 (1.34 MB each), with simple weights.
fn big_pack(n: usize, dtype: DType) -> (tempfile::TempDir, Arc<Pack>) {
    let dir = tempfile::tempdir().unwrap();
    let spec = PackSpec {
        hidden_dim: D as usize,
        dtype,
        input_normalization: Default::default(),
        probes_per_shard: 256,
        concepts: (0..n).map(|i| ConceptDef { name: format!("C{i}"), layer: 0, parents: vec![] }).collect(),
        lenses: None,
    };
    let w = ProbeWeights {
        w1: (0..128 * D as usize).map(|i| (i % 97) as f32 * 1e-3).collect(),
        b1: vec![0.0; 128],
        w2: vec![0.01; 64 * 128],
        b2: vec![0.0; 64],
        w3: vec![0.1; 64],
        b3: vec![0.0],
    };
    write_pack(dir.path(), &spec, |_| w.clone(), |_| {}).unwrap();
    let pack = Arc::new(Pack::open(dir.path()).unwrap());
    (dir, pack)
}

fn install(c: &mut Criterion) {
    let mut group = c.benchmark_group("install");
    group.sample_size(30).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    // As the runtime's step scheduler does with the tch backend's resident store
    // (accelerators, or `device.cpu_kernel = "torch"`): an install of a probe the store does
    // not hold copies it into a row (the CPU kernel copies nothing on install), and an install
    // of a resident probe only pins its row. `copy`: a one-row store, installing its two
    // probes in turn, so that each evicts the other; `resident`: the same probe every time.
    for dtype in [DType::Bf16, DType::F32] {
        let (_dir, pack) = big_pack(2, dtype);
        let ids = [ProbeId(0), ProbeId(1)];
        let bytes: std::collections::HashMap<_, _> =
            ids.iter().map(|&id| (id, Arc::new(ProbeBytes::detached(id, pack.read_probe(id).unwrap())))).collect();
        let (none, faults) = (probe_cascade::policy::ProbeSet::default(), Faults::none());
        let mut store = TorchBackend::new(pack.clone(), 1, Device::Cpu, Kind::Float, None, none, faults).unwrap();
        group.throughput(Throughput::Bytes(bytes[&ids[0]].len() as u64));
        let mut n = 0;
        group.bench_function(format!("{dtype}_to_f32_copy"), |b| {
            b.iter(|| {
                n += 1;
                store.open(SessionId(0), 1);
                store.apply(SessionId(0), &[SlotOp::Install { slot: 0, id: ids[n % 2] }], &bytes).unwrap();
                store.close(SessionId(0));
            })
        });
        group.bench_function(format!("{dtype}_to_f32_resident"), |b| {
            b.iter(|| {
                store.open(SessionId(0), 1);
                store.apply(SessionId(0), &[SlotOp::Install { slot: 0, id: ids[0] }], &bytes).unwrap();
                store.close(SessionId(0));
            })
        });
    }
    group.finish();
}

fn cache_and_reader(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (_dir, pack) = big_pack(500, DType::F32);
    let shards: Vec<_> = pack.shards().iter().map(|s| s.path.clone()).collect();
    let probe = pack.layout().byte_len() as u64;
    // Warm the page cache.
    for s in &shards {
        std::io::copy(&mut std::fs::File::open(s).unwrap(), &mut std::io::sink()).unwrap();
    }
    let mut group = c.benchmark_group("reader");
    group.sample_size(10).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Bytes(probe * 500));
    for kind in [ReaderKind::IoUring, ReaderKind::Threads] {
        let (tx, rx) = flume::unbounded();
        let Ok(reader) = start_reader(kind, shards.clone(), 32, 2, tx) else {
            eprintln!("reader/{kind:?}: unavailable here, skipped");
            continue;
        };
        // Recycled buffers, as the cache gives them: 32 in circulation.
        let mut spare: Vec<Vec<u8>> = (0..32).map(|_| Vec::with_capacity(probe as usize)).collect();
        group.bench_function(format!("{kind:?}_500_probes_warm_page_cache"), |b| {
            b.iter(|| {
                let (mut next, mut done) = (0usize, 0usize);
                while done < 500 {
                    while next < 500 && !spare.is_empty() {
                        let buf = spare.pop().unwrap();
                        reader.submit(ReadRequest::for_probe(&pack, ProbeId(next as u32), buf)).unwrap();
                        next += 1;
                    }
                    let c = rx.recv().unwrap();
                    spare.push(c.result.unwrap());
                    done += 1;
                }
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("cache");
    group.sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    group.throughput(Throughput::Bytes(probe));
    let settings = |budget| CacheSettings {
        budget_bytes: budget,
        queue_depth: 32,
        reader: ReaderKind::Auto,
        fallback_threads: 2,
        faults: Faults::none(),
    };
    let cache = rt.block_on(async { WeightCache::spawn(WeightCache::new(pack.clone(), &settings(1 << 31)).unwrap()) });
    rt.block_on(async { cache.ask(Get(vec![ProbeId(0)])).await }).unwrap();
    group.bench_function("hit", |b| b.iter(|| rt.block_on(async { cache.ask(Get(vec![ProbeId(0)])).await }).unwrap()));
    // Misses: a budget of zero keeps nothing, so every Get reads (from the page cache).
    let uncached = rt.block_on(async { WeightCache::spawn(WeightCache::new(pack.clone(), &settings(0)).unwrap()) });
    group.bench_function("miss", |b| {
        b.iter(|| rt.block_on(async { uncached.ask(Get(vec![ProbeId(1)])).await }).unwrap())
    });
    // Evict: a budget of two probes, cycling through three, so every Get reads and evicts.
    let small =
        rt.block_on(async { WeightCache::spawn(WeightCache::new(pack.clone(), &settings(2 * probe)).unwrap()) });
    let mut i = 0u32;
    group.bench_function("miss_and_evict", |b| {
        b.iter(|| {
            i = (i + 1) % 3;
            rt.block_on(async { small.ask(Get(vec![ProbeId(i)])).await }).unwrap()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("actor");
    group.sample_size(50).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    let config = Config::default();
    let cascade = rt.block_on(Cascade::start(pack.clone(), &config)).unwrap();
    group.bench_function("round_trip", |b| b.iter(|| rt.block_on(cascade.active()).unwrap()));
    group.finish();
    rt.block_on(cascade.shutdown());
}

/// The CPU kernel against the floor: S probes, each in its own buffer as in the cache, scored
/// for B hidden states, on every path this CPU has, both dtypes.
fn kernel(c: &mut Criterion) {
    use probe_cascade::kernel::{CpuInfo, Isa, Kernel, ProbeRef};
    use probe_cascade::pack::ProbeLayout;
    use rand::{RngCore, SeedableRng};
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    tch::set_num_threads(threads as i32); // the floor is measured on all cores
    let bw = read_bandwidth();
    let cpu = CpuInfo::detect();
    eprintln!("kernel bench on {cpu}; measured read bandwidth {:.1} GB/s", bw / 1e9);
    let mut group = c.benchmark_group("kernel");
    group.sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for dtype in [DType::Bf16, DType::F32] {
        let layout = ProbeLayout::new(D as usize, dtype);
        let ranges = layout.ranges(&layout.canonical_offsets());
        let s_max = 100;
        // Weights uniform in ±0.05 (no subnormals, which cost extra cycles on some CPUs).
        let probes: Vec<Vec<u8>> = (0..s_max)
            .map(|_| {
                let mut b = Vec::with_capacity(layout.byte_len());
                for _ in 0..layout.numel() {
                    let v = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 * 0.1 - 0.05;
                    match dtype {
                        DType::F32 => b.extend_from_slice(&v.to_le_bytes()),
                        DType::Bf16 => b.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    }
                }
                b
            })
            .collect();
        let hidden: Vec<Vec<f32>> =
            (0..8).map(|i| (0..D).map(|j| ((i * 31 + j) as f32 * 0.01).sin()).collect()).collect();
        for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
            let kernel = Kernel::new(&layout, isa, threads).unwrap();
            for s in [30usize, 100] {
                let refs: Vec<ProbeRef> = probes[..s].iter().map(|b| ProbeRef { bytes: b, ranges: &ranges }).collect();
                let bytes = (s * layout.byte_len()) as u64;
                for batch in [1usize, 8] {
                    let xs: Vec<&[f32]> = hidden[..batch].iter().map(|h| &h[..]).collect();
                    let mut out = vec![0f32; s * batch];
                    let floor_ms = bytes as f64 / bw * 1e3;
                    eprintln!(
                        "kernel/{isa}/{dtype}/S={s}/B={batch}: {:.1} MB, floor {floor_ms:.3} ms",
                        bytes as f64 / 1e6
                    );
                    group.throughput(Throughput::Bytes(bytes));
                    group.bench_function(format!("{isa}/{dtype}/S={s}/B={batch}"), |b| {
                        b.iter(|| kernel.score(&refs, &xs, &mut out).unwrap())
                    });
                }
            }
        }
    }
    group.finish();
}

criterion_group!(benches, inference, kernel, install, cache_and_reader);
criterion_main!(benches);
