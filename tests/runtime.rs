//! The actor runtime against the reference engine, its readers, its cache and its failure
//! behaviour. Async tests on a multi-threaded tokio runtime, as a daemon embedding it would run.

mod common;

use std::sync::Arc;
use std::time::Duration;

use kameo::prelude::Spawn;
use probe_cascade::config::{CascadeConfig, Config, CpuKernel, Expansion, Pruning};
use probe_cascade::engine::{build_engine, EngineKind, TokenReport};
use probe_cascade::npy::Matrix;
use probe_cascade::pack::{Pack, ProbeId};
use probe_cascade::runtime::cache::{CacheSettings, Get, Stats, WeightCache};
use probe_cascade::runtime::faults::Faults;
use probe_cascade::runtime::reader::{start_reader, ReadRequest, ReaderKind};
use probe_cascade::runtime::{Cascade, RuntimeError, StartError};
use probe_cascade::synth::{concept_geometry, synth_trace, TraceParams};

fn tiny() -> (tempfile::TempDir, Arc<Pack>, Matrix) {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_pack(dir.path());
    let pack = Arc::new(Pack::open(dir.path()).unwrap());
    let geometry = concept_geometry(&pack, |_| {}).unwrap();
    let trace = synth_trace(&pack, &geometry, &TraceParams { tokens: 40, seed: 3, ..Default::default() });
    (dir, pack, trace)
}

fn config(cascade: CascadeConfig) -> Config {
    let mut c = Config { cascade, ..Config::default() };
    c.device.threads = 2;
    c
}

fn tight() -> CascadeConfig {
    CascadeConfig { pruning: Pruning::TopK { keep_top_k: 8 }, max_loaded: 12, ..CascadeConfig::default() }
}

fn names(r: &TokenReport) -> Vec<(String, u16)> {
    r.top.iter().map(|e| (e.name.clone(), e.layer)).collect()
}

/// Runs the reference engine and the runtime side by side, token by token, comparing reports
/// and active sets.
async fn assert_matches_reference(pack: &Arc<Pack>, config: &Config, trace: &Matrix, what: &str) -> Vec<TokenReport> {
    let mut reference = build_engine(EngineKind::Reference, pack.clone(), config).unwrap();
    let cascade = Cascade::start(pack.clone(), config).await.unwrap();
    let mut out = Vec::new();
    for t in 0..trace.rows {
        let want = reference.observe(t, trace.row(t)).unwrap();
        let got = cascade.observe(trace.row(t).to_vec()).await.unwrap();
        let ctx = format!("{what}, token {t}");
        assert_eq!(got.index, t, "{ctx}");
        assert_eq!(names(&got), names(&want), "{ctx}: top list");
        for (a, b) in got.top.iter().zip(&want.top) {
            assert!((a.logit - b.logit).abs() < 1e-4, "{ctx}: {} {} vs {}", a.name, a.logit, b.logit);
        }
        assert_eq!(cascade.active().await.unwrap(), reference.active(), "{ctx}: active set");
        assert_eq!((got.children, got.loaded, got.unloaded), (want.children, want.loaded, want.unloaded), "{ctx}");
        out.push(got);
    }
    cascade.shutdown().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_mode_matches_the_reference_under_every_policy() {
    let (_dir, pack, trace) = tiny();
    for (what, cascade) in [
        ("threshold/top_k", tight()),
        (
            "decompose/global_top_k",
            CascadeConfig {
                expansion: Expansion::Decompose { top_k: 4, max_depth: 3 },
                pruning: Pruning::GlobalTopK { keep: 4 },
                hide_decomposed_parents: true,
                ..CascadeConfig::default()
            },
        ),
        (
            "threshold/cold",
            CascadeConfig {
                pruning: Pruning::Cold { unload_threshold: 0.2 },
                max_loaded: 10,
                ..CascadeConfig::default()
            },
        ),
        ("threshold/none", CascadeConfig { pruning: Pruning::None, ..CascadeConfig::default() }),
    ] {
        let reports = assert_matches_reference(&pack, &config(cascade), &trace, what).await;
        assert!(reports.iter().map(|r| r.loaded).sum::<usize>() > 0, "{what}: the trace must load children");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_smaller_than_the_working_set_still_gives_correct_reports() {
    let (_dir, pack, trace) = tiny();
    let probe = pack.layout().byte_len() as u64;
    let mut c = config(tight());
    // The CPU kernel scores active probes in the cache, so a cache that cannot hold all
    // twelve that may be active is refused, naming the key and the size it needs.
    c.runtime.cache_bytes = 3 * probe;
    match Cascade::start(pack.clone(), &c).await {
        Err(e @ RuntimeError::Start(StartError::CacheTooSmall { .. })) => {
            let m = e.to_string();
            assert!(
                m.contains("runtime.cache_bytes")
                    && m.contains("cascade.max_loaded")
                    && m.contains(&(12 * probe).to_string()),
                "{m}"
            )
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a cache of 3 probes with max_loaded = 12 was accepted"),
    }
    // Exactly the cap: the 60-probe pack still churns the cache, and reports stay right.
    c.runtime.cache_bytes = 12 * probe;
    let reports = assert_matches_reference(&pack, &c, &trace, "cache of max_loaded").await;
    assert!(reports.iter().any(|r| r.loaded > 3));
    // The tch arena copies probes out of the cache, so it takes any cache. Room for three
    // probes while twelve can be active: constant eviction and re-reading.
    c.device.cpu_kernel = CpuKernel::Torch;
    c.runtime.cache_bytes = 3 * probe;
    let reports = assert_matches_reference(&pack, &c, &trace, "small cache").await;
    assert!(reports.iter().any(|r| r.loaded > 3));
    // And a budget below a single probe: nothing is cached, everything still works.
    c.runtime.cache_bytes = pack.layout().byte_len() as u64 / 2;
    assert_matches_reference(&pack, &c, &trace, "tiny cache").await;
    // A resident store of 14 rows for the 60-probe pack (12 can be active): warm probes are
    // evicted and copied in again from a small cache, and the reports stay right.
    let row = probe_cascade::runtime::scoring::torch::row_bytes(pack.hidden_dim(), tch::Kind::Float) as u64;
    c.device.store_bytes = 14 * row;
    c.runtime.cache_bytes = 3 * probe;
    let reports = assert_matches_reference(&pack, &c, &trace, "small store").await;
    let distinct: std::collections::HashSet<_> = reports.iter().flat_map(|r| r.scored_ids.iter().copied()).collect();
    assert!(distinct.len() > 14, "the trace needs more probes than the store holds: {}", distinct.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_and_thread_readers_give_identical_bytes_and_reports() {
    let (_dir, pack, trace) = tiny();
    let shards: Vec<_> = pack.shards().iter().map(|s| s.path.clone()).collect();
    let mut all = Vec::new();
    for kind in [ReaderKind::IoUring, ReaderKind::Threads] {
        let (tx, rx) = flume::unbounded();
        let reader = match start_reader(kind, shards.clone(), 8, 2, tx) {
            Ok(r) => r,
            Err(e) if kind == ReaderKind::IoUring => {
                eprintln!("SKIPPED io_uring half: the kernel refuses io_uring here ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(reader.kind(), kind);
        for id in pack.hierarchy().ids() {
            reader.submit(ReadRequest::for_probe(&pack, ProbeId::sole(id), Vec::new())).unwrap();
        }
        let mut got = vec![Vec::new(); pack.len()];
        for _ in 0..pack.len() {
            let c = rx.recv_async().await.unwrap();
            let bytes = c.result.unwrap();
            pack.check_crc(c.id, &bytes).unwrap();
            got[c.id.index()] = bytes;
        }
        all.push(got);
    }
    assert_eq!(all[0], all[1]);
    for (i, bytes) in all[0].iter().enumerate() {
        assert_eq!(bytes, &pack.read_probe(ProbeId(i as u32)).unwrap(), "probe {i}");
    }
    let mut reports = Vec::new();
    for kind in [ReaderKind::IoUring, ReaderKind::Threads] {
        let mut c = config(tight());
        c.runtime.reader = kind;
        let cascade = Cascade::start(pack.clone(), &c).await.unwrap();
        assert_eq!(cascade.reader(), kind);
        let mut r = Vec::new();
        for t in 0..trace.rows {
            r.push(cascade.observe(trace.row(t).to_vec()).await.unwrap().top);
        }
        cascade.shutdown().await;
        reports.push(r);
    }
    assert_eq!(reports[0], reports[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_on_one_probe_issue_one_read() {
    let (_dir, pack, _) = tiny();
    let settings = CacheSettings {
        budget_bytes: 1 << 30,
        queue_depth: 8,
        reader: ReaderKind::Auto,
        fallback_threads: 2,
        faults: Faults::none(),
    };
    let cache = WeightCache::spawn(WeightCache::new(pack.clone(), &settings).unwrap());
    let id = ProbeId(7);
    // Both requests are in the mailbox before the read can complete.
    let (a, b, c) =
        tokio::join!(cache.ask(Get(vec![id, id])), cache.ask(Get(vec![id])), cache.ask(Get(vec![ProbeId(8)])));
    let (b, a, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let stats = cache.ask(Stats).await.unwrap();
    // Probe 7 was asked for three times while (at most) one read of it could be in flight:
    // the other two either joined that read or, if it had already landed, hit the cache.
    assert_eq!(stats.reads, 2, "one read for probe 7, one for probe 8: {stats:?}");
    assert_eq!(stats.merged + stats.hits, 2, "{stats:?}");
    assert!(stats.merged >= 1, "the repeat inside one request joins the read: {stats:?}");
    let want = pack.read_probe(id).unwrap();
    for got in [&a[0], &b[0], &b[1]] {
        assert_eq!(&got.as_ref().unwrap()[..], &want[..]);
    }
    assert_eq!(&c[0].as_ref().unwrap()[..], &pack.read_probe(ProbeId(8)).unwrap()[..]);
    // Now cached: a hit, no read.
    let hits = stats.hits;
    cache.ask(Get(vec![id])).await.unwrap();
    let stats = cache.ask(Stats).await.unwrap();
    assert_eq!((stats.reads, stats.hits), (2, hits + 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_work_in_flight_answers_every_request() {
    use futures::stream::{FuturesUnordered, StreamExt};
    let (_dir, pack, trace) = tiny();
    let cascade = Cascade::start(pack.clone(), &config(tight())).await.unwrap();
    let mut requests: FuturesUnordered<_> = (0..trace.rows).map(|t| cascade.observe(trace.row(t).to_vec())).collect();
    // One poll sends every request into the coordinator's mailbox; then shut down while they run.
    let mut results = Vec::new();
    if let std::task::Poll::Ready(Some(r)) = futures::poll!(requests.next()) {
        results.push(r);
    }
    let drain = async {
        while let Some(r) = requests.next().await {
            results.push(r);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(drain, cascade.shutdown()) })
        .await
        .expect("no request may hang");
    assert_eq!(results.len(), trace.rows, "every request gets an answer");
    for r in &results {
        assert!(r.is_ok(), "a request queued before shutdown is finished, not dropped: {:?}", r.as_ref().err());
    }
    let mut indices: Vec<usize> = results.iter().map(|r| r.as_ref().unwrap().index).collect();
    indices.sort();
    assert_eq!(indices, (0..trace.rows).collect::<Vec<_>>());
    assert!(matches!(cascade.observe(trace.row(0).to_vec()).await, Err(RuntimeError::ShutDown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_probe_fails_its_token_and_the_rest_keep_working() {
    let (dir, _, trace) = tiny();
    // Corrupt one layer-1 probe that the trace's tokens will want.
    let clean = Arc::new(Pack::open(dir.path()).unwrap());
    let mut reference = build_engine(EngineKind::Reference, clean.clone(), &config(tight())).unwrap();
    let mut victim = None;
    for t in 0..trace.rows {
        let before = reference.active();
        reference.observe(t, trace.row(t)).unwrap();
        if let Some(new) =
            reference.active().into_iter().find(|c| !before.contains(c) && clean.hierarchy().layer(*c) == 1)
        {
            victim = Some(new);
            break;
        }
    }
    let victim = victim.expect("the trace activates some layer-1 probe");
    let label = clean.hierarchy().label(victim);
    let loc = clean.location(ProbeId::sole(victim));
    let path = clean.shard_of(ProbeId::sole(victim)).path.clone();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[loc.offset as usize + 10] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let pack = Arc::new(Pack::open(dir.path()).unwrap());

    let cascade = Cascade::start(pack.clone(), &config(tight())).await.unwrap();
    let (mut errors, mut ok_after_error) = (0, 0);
    for t in 0..trace.rows {
        match cascade.observe(trace.row(t).to_vec()).await {
            Ok(_) if errors > 0 => ok_after_error += 1,
            Ok(_) => {}
            Err(e) => {
                let s = e.to_string();
                assert!(s.contains(&format!("token {t}")) && s.contains(&label) && s.contains("checksum"), "{s}");
                assert_eq!(e.token(), Some(t));
                errors += 1;
            }
        }
    }
    assert!(errors > 0, "the corrupt probe {label} was needed");
    assert!(ok_after_error > 0, "tokens that do not need it still work");
    cascade.shutdown().await;

    // Pipelined: with a long budget the read fails inside the token (an error for it); with a
    // zero budget it fails late and the next report lists it. Either way nothing stays pending.
    for budget in [5_000_000, 0] {
        let mut c = config(tight());
        c.runtime.mode = probe_cascade::config::Mode::Pipelined;
        c.runtime.latency_budget_us = budget;
        c.runtime.prefetch_hint_margin = 0.0;
        let cascade = Cascade::start(pack.clone(), &c).await.unwrap();
        let mut seen = 0;
        for t in 0..trace.rows {
            match cascade.observe(trace.row(t).to_vec()).await {
                Ok(r) => seen += r.failed_loads.iter().filter(|f| f.contains(&label)).count(),
                Err(e) => {
                    assert!(e.to_string().contains(&label), "{e}");
                    seen += 1;
                }
            }
            tokio::time::timeout(Duration::from_secs(10), cascade.settle()).await.expect("loads settle").unwrap();
        }
        assert!(seen > 0, "budget {budget}: the failed load of {label} must be reported");
        cascade.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_hidden_states_are_errors_naming_the_token() {
    let (_dir, pack, trace) = tiny();
    let cascade = Cascade::start(pack.clone(), &config(tight())).await.unwrap();
    cascade.observe(trace.row(0).to_vec()).await.unwrap();
    let e = cascade.observe(vec![0.0; 31]).await.unwrap_err();
    assert!(e.to_string().contains("token 1") && e.to_string().contains("D=32"), "{e}");
    let mut h = trace.row(2).to_vec();
    h[4] = f32::INFINITY;
    let e = cascade.observe(h).await.unwrap_err();
    assert!(e.to_string().contains("token 2") && e.to_string().contains("[4] is inf"), "{e}");
    assert_eq!(cascade.observe(trace.row(3).to_vec()).await.unwrap().index, 3);
    cascade.shutdown().await;
}

/// The stores a tensor can lie on here: the CPU store (`device.cpu_kernel = "torch"`), and
/// cuda:0 where a GPU is present.
fn store_devices() -> Vec<(&'static str, tch::Device)> {
    let mut out = vec![("cpu", tch::Device::Cpu)];
    if tch::Cuda::device_count() > 0 {
        out.push(("cuda:0", tch::Device::Cuda(0)));
    }
    out
}

fn store_config(device: &str, cascade: CascadeConfig) -> Config {
    let mut c = config(cascade);
    c.device.device = device.into();
    c.device.cpu_kernel = CpuKernel::Torch;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tensor_on_the_store_device_is_scored_where_it_lies_as_its_values_are() {
    use probe_cascade::config::Normalization;
    use probe_cascade::engine::Hidden;
    use probe_cascade::runtime::{Runtime, SessionOptions};
    let (_dir, pack, trace) = tiny();
    for (name, device) in store_devices() {
        for (kind, normalization) in
            [(tch::Kind::Float, None), (tch::Kind::BFloat16, None), (tch::Kind::Float, Some(Normalization::LayerNorm))]
        {
            let cascade = CascadeConfig { normalization, ..tight() };
            let config = store_config(name, cascade);
            let ctx = format!("{name}, {kind:?}, {normalization:?}");
            let rt = Runtime::start(pack.clone(), &config).await.unwrap();
            assert_eq!(rt.store_device(), Some(device), "{ctx}");
            // Two sessions per run: one given tensors, one given the same values in host memory.
            let (on_device, on_host) = (
                rt.open_session(SessionOptions::default()).await.unwrap(),
                rt.open_session(SessionOptions::default()).await.unwrap(),
            );
            for t in 0..trace.rows {
                let x = tch::Tensor::from_slice(trace.row(t)).to_kind(kind).to_device(device);
                let values = Vec::<f32>::try_from(x.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu)).unwrap();
                let (got, want) =
                    futures::future::join(on_device.observe(Hidden::tensor(x, None)), on_host.observe(values)).await;
                let (got, want) = (got.unwrap(), want.unwrap());
                let ctx = format!("{ctx}, token {t}");
                assert_eq!(names(&got), names(&want), "{ctx}: top list");
                for (a, b) in got.top.iter().zip(&want.top) {
                    assert!((a.logit - b.logit).abs() < 1e-5, "{ctx}: {} {} vs {}", a.name, a.logit, b.logit);
                }
                assert_eq!((got.children, got.loaded, got.unloaded), (want.children, want.loaded, want.unloaded));
            }
            // Bad tensors are refused with what is wrong, and the session goes on.
            let d = pack.hidden_dim();
            let mut bad = trace.row(0).to_vec();
            bad[5] = f32::NAN;
            let asks = [
                (tch::Tensor::from_slice(&bad), "[5] is NaN"),
                (tch::Tensor::zeros([d as i64 - 1], (tch::Kind::Float, tch::Device::Cpu)), "D=32"),
                (tch::Tensor::zeros([2, d as i64 / 2], (tch::Kind::Float, tch::Device::Cpu)), "D=32"),
                (tch::Tensor::zeros([d as i64], (tch::Kind::Int64, tch::Device::Cpu)), "dtype Int64"),
            ];
            for (x, says) in asks {
                let e = on_device.observe(Hidden::tensor(x.to_device(device), None)).await.unwrap_err();
                assert!(e.to_string().contains(says), "{ctx}: {e}");
            }
            assert!(on_device.observe(trace.row(1).to_vec()).await.is_ok(), "{ctx}");
            // Each session's states were scored where they were given: the steps mixed the two.
            let st = rt.step_stats().await.unwrap().traffic.store.unwrap();
            assert!(st.states_in_place >= trace.rows as u64, "{ctx}: {st:?}");
            assert!(st.states_sent >= trace.rows as u64, "{ctx}: {st:?}");
            on_device.close().await;
            on_host.close().await;
            rt.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tensor_given_to_the_cpu_kernel_is_read_in_host_memory() {
    use probe_cascade::engine::Hidden;
    use probe_cascade::runtime::{Runtime, SessionOptions};
    let (_dir, pack, trace) = tiny();
    let rt = Runtime::start(pack.clone(), &config(tight())).await.unwrap();
    assert_eq!(rt.store_device(), None);
    let (a, b) = (
        rt.open_session(SessionOptions::default()).await.unwrap(),
        rt.open_session(SessionOptions::default()).await.unwrap(),
    );
    for t in 0..8 {
        let got = a.observe(Hidden::tensor(tch::Tensor::from_slice(trace.row(t)), None)).await.unwrap();
        let want = b.observe(trace.row(t).to_vec()).await.unwrap();
        assert_eq!(names(&got), names(&want), "token {t}");
        assert_eq!(
            got.top.iter().map(|e| e.logit).collect::<Vec<_>>(),
            want.top.iter().map(|e| e.logit).collect::<Vec<_>>()
        );
    }
    let e = a.observe(Hidden::tensor(tch::Tensor::zeros([3], (tch::Kind::Float, tch::Device::Cpu)), None)).await;
    assert!(e.unwrap_err().to_string().contains("D=32"));
    a.close().await;
    b.close().await;
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_mode_reports_in_flight_children_and_catches_up() {
    let (_dir, pack, trace) = tiny();
    let mut c = config(tight());
    c.runtime.mode = probe_cascade::config::Mode::Pipelined;
    c.runtime.prefetch_hint_margin = 0.0;
    // Nothing is resident in RAM, so every new child is a read: the tch arena, which copies
    // probes out of the cache, allows a cache that small.
    c.device.cpu_kernel = CpuKernel::Torch;
    c.runtime.cache_bytes = 0;
    let cascade = Cascade::start(pack.clone(), &c).await.unwrap();
    let mut in_flight = 0;
    for t in 0..trace.rows {
        let r = cascade.observe(trace.row(t).to_vec()).await.unwrap();
        in_flight += r.in_flight.len();
        assert!(r.failed_loads.is_empty());
        cascade.settle().await.unwrap();
    }
    assert!(in_flight > 0, "children must be reported in flight");
    assert!(cascade.cache_stats().await.unwrap().reads > 0);
    cascade.shutdown().await;

    // A latency budget long enough for every read makes pipelined mode exact.
    c.runtime.latency_budget_us = 5_000_000;
    let pipelined = Cascade::start(pack.clone(), &c).await.unwrap();
    let mut reference = build_engine(EngineKind::Reference, pack.clone(), &config(tight())).unwrap();
    for t in 0..trace.rows {
        let got = pipelined.observe(trace.row(t).to_vec()).await.unwrap();
        let want = reference.observe(t, trace.row(t)).unwrap();
        assert!(got.in_flight.is_empty(), "token {t}: {:?}", got.in_flight);
        assert_eq!(names(&got), names(&want), "token {t}");
    }
    pipelined.shutdown().await;
}

/// `settle` promises that no load is in flight when it returns. On the resident store a
/// hint is read from the cache by a task of its own and then copied in: settle waits for it,
/// so nothing is read or copied in after it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_waits_for_hints_on_their_way_to_the_resident_store() {
    let (_dir, pack, trace) = tiny();
    let mut c = config(tight());
    c.device.cpu_kernel = CpuKernel::Torch;
    // Every hint is a read: nothing stays in RAM.
    c.runtime.cache_bytes = 0;
    c.runtime.prefetch_hint_margin = 1.0;
    let cascade = Cascade::start(pack.clone(), &c).await.unwrap();
    for t in 0..trace.rows {
        cascade.observe(trace.row(t).to_vec()).await.unwrap();
        cascade.settle().await.unwrap();
        let (cache, store) = (cascade.cache_stats().await.unwrap(), cascade.weight_traffic().await.unwrap().store);
        assert_eq!(cache.in_flight, 0, "token {t}: a read is in flight after settle");
        tokio::time::sleep(Duration::from_millis(2)).await;
        let (later, store_later) =
            (cascade.cache_stats().await.unwrap(), cascade.weight_traffic().await.unwrap().store);
        assert_eq!(later.reads, cache.reads, "token {t}: the cache read after settle returned");
        let prefetched = |s: &Option<probe_cascade::types::StoreStats>| s.as_ref().unwrap().prefetched;
        assert_eq!(prefetched(&store_later), prefetched(&store), "token {t}: a hint was copied in after settle");
    }
    let store = cascade.weight_traffic().await.unwrap().store.unwrap();
    assert!(store.prefetched > 0, "the trace hints probes into the store: {store:?}");
    cascade.shutdown().await;
}

/// The CUDA path: the same cascade with `device = "cuda:0"` must report what the CPU
/// reference reports. Skips (saying so) where libtorch sees no GPU, which includes every build
/// against the CPU-only libtorch that `make` provisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_runtime_matches_the_cpu_reference_when_a_gpu_is_present() {
    if tch::Cuda::device_count() == 0 {
        eprintln!("SKIPPED: libtorch sees no CUDA device");
        return;
    }
    let (_dir, pack, trace) = tiny();
    let cpu = config(tight());
    let mut gpu = cpu.clone();
    gpu.device.device = "cuda:0".into();
    let mut reference = build_engine(EngineKind::Reference, pack.clone(), &cpu).unwrap();
    let cascade = Cascade::start(pack.clone(), &gpu).await.unwrap();
    for t in 0..trace.rows {
        let want = reference.observe(t, trace.row(t)).unwrap();
        let got = cascade.observe(trace.row(t).to_vec()).await.unwrap();
        assert_eq!(names(&got), names(&want), "token {t}");
        for (a, b) in got.top.iter().zip(&want.top) {
            assert!((a.logit - b.logit).abs() < 1e-3, "token {t}: {} {} vs {}", a.name, a.logit, b.logit);
        }
    }
    cascade.shutdown().await;
}

/// Prefetches (hints of near-threshold children) into a small store, so that warm rows are
/// evicted and rows being prefetched are soon read or rewritten: on the CPU store here, and on
/// cuda:0 where a GPU is present, where a `make build-gpu` build copies them on a side stream,
/// ordered before the rounds that meet their rows. The reports stay the CPU reference's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetches_into_a_small_store_keep_the_reports_of_the_cpu_reference() {
    use probe_cascade::runtime::scoring::torch::row_bytes;
    let (_dir, pack, trace) = tiny();
    let cpu = config(tight());
    for (name, _) in store_devices() {
        let mut store = store_config(name, tight());
        store.runtime.prefetch_hint_margin = 0.5;
        let base = probe_cascade::policy::base_set(pack.hierarchy(), &store.cascade).unwrap().len();
        let rows = base + store.cascade.max_loaded + 8;
        store.device.store_bytes = (rows * row_bytes(pack.hidden_dim(), tch::Kind::Float)) as u64;
        let mut reference = build_engine(EngineKind::Reference, pack.clone(), &cpu).unwrap();
        let rt = probe_cascade::runtime::Runtime::start(pack.clone(), &store).await.unwrap();
        let session = rt.open_session(Default::default()).await.unwrap();
        for t in 0..trace.rows {
            let want = reference.observe(t, trace.row(t)).unwrap();
            let got = session.observe(trace.row(t).to_vec()).await.unwrap();
            assert_eq!(names(&got), names(&want), "{name}, token {t}");
            for (a, b) in got.top.iter().zip(&want.top) {
                assert!((a.logit - b.logit).abs() < 1e-3, "{name}, token {t}: {} {} vs {}", a.name, a.logit, b.logit);
            }
            // Let hints land between some tokens, and not between others.
            if t % 3 == 0 {
                session.settle().await.unwrap();
            }
        }
        let st = rt.step_stats().await.unwrap().traffic.store.unwrap();
        assert!(st.prefetched > 0 && st.evictions > 0, "{name}: {st:?}");
        session.close().await;
        rt.shutdown().await;
    }
}

/// CUDA graphs (a `make build-gpu` build, `device.cuda_graphs`) replay what eager rounds
/// score: the same tokens on cuda:0 through four sessions at once (so that rounds batch
/// several hidden states, and buckets are met in varying order), with graphs on and off,
/// token by token. Skips where libtorch sees no GPU or the build has no graphs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_graph_rounds_score_what_eager_rounds_score_when_a_gpu_is_present() {
    if tch::Cuda::device_count() == 0 || !cfg!(feature = "cuda-graphs") {
        eprintln!("SKIPPED: no CUDA device, or a build without the cuda-graphs feature");
        return;
    }
    use probe_cascade::runtime::{Runtime, SessionOptions};
    let (_dir, pack, trace) = tiny();
    let mut eager = config(tight());
    eager.device.device = "cuda:0".into();
    eager.device.cuda_graphs = false;
    let mut graphs = eager.clone();
    graphs.device.cuda_graphs = true;
    let mut runs = Vec::new();
    for config in [&eager, &graphs] {
        let rt = Runtime::start(pack.clone(), config).await.unwrap();
        let mut sessions = Vec::new();
        for _ in 0..4 {
            sessions.push(rt.open_session(SessionOptions::default()).await.unwrap());
        }
        let mut reports = Vec::new();
        for t in 0..trace.rows {
            // Session s sees token (t + 7s): four different streams in each step.
            let asks = sessions
                .iter()
                .enumerate()
                .map(|(s, session)| session.observe(trace.row((t + 7 * s) % trace.rows).to_vec()));
            reports.push(futures::future::try_join_all(asks).await.unwrap());
        }
        let path = rt.step_stats().await.unwrap().traffic.path;
        for s in sessions {
            s.close().await;
        }
        rt.shutdown().await;
        runs.push((path, reports));
    }
    let ((eager_path, eager), (graph_path, graphs)) = (&runs[0], &runs[1]);
    assert!(!eager_path.contains("graphs") && graph_path.contains("CUDA graphs"), "{eager_path} / {graph_path}");
    for (t, (want, got)) in eager.iter().zip(graphs).enumerate() {
        for (s, (w, g)) in want.iter().zip(got).enumerate() {
            let ctx = format!("token {t}, session {s}");
            assert_eq!(names(g), names(w), "{ctx}: top list");
            for (a, b) in g.top.iter().zip(&w.top) {
                assert!((a.logit - b.logit).abs() < 1e-4, "{ctx}: {} {} vs {}", a.name, a.logit, b.logit);
            }
            assert_eq!((g.children, g.loaded, g.unloaded), (w.children, w.loaded, w.unloaded), "{ctx}");
        }
    }
}
