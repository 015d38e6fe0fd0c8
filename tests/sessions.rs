//! Many sessions on one runtime: every session's reports must be bit-identical to the same
//! stream run alone (a `Cascade` of its own), whatever the number of sessions, their traces
//! and offsets, the arrival interleaving, `observe_batch` compositions, sessions opening and
//! closing mid-run, and their configs. A dedicated test checks that no hidden state is ever
//! scored into another session's report.

mod common;

use std::path::Path;
use std::sync::Arc;

use probe_cascade::config::{Config, Mode};
use probe_cascade::engine::{prepare_hidden, TokenReport};
use probe_cascade::kernel::{reference_logit, ProbeRef};
use probe_cascade::npy::Matrix;
use probe_cascade::pack::{ConceptId, Pack, ProbeId};
use probe_cascade::runtime::{Cascade, Runtime, RuntimeError, SessionOptions};
use rand::{Rng, SeedableRng};

const TOKENS: usize = 48;

use common::Streams as Fixture;

fn fixture() -> Fixture {
    common::streams(TOKENS)
}

fn config(name: &str) -> Config {
    Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("config/{name}.toml"))).unwrap()
}

/// What a token's report must equal: the top list with each logit's bits, the counts, and
/// the active set after it.
type Outcome = (Vec<(String, u16, u32)>, [usize; 5], Vec<ConceptId>);

fn outcome(r: &TokenReport, active: Vec<ConceptId>) -> Outcome {
    let top = r.top.iter().map(|e| (e.name.clone(), e.layer, e.logit.to_bits())).collect();
    (top, [r.children, r.loaded, r.unloaded, r.scored, r.active], active)
}

/// Hidden state `t` of a stream that starts at `offset` of `trace` and wraps around.
fn row(trace: &Matrix, offset: usize, t: usize) -> Vec<f32> {
    trace.row((offset + t) % trace.rows).to_vec()
}

/// The stream alone, on a cascade of its own.
async fn alone(pack: &Arc<Pack>, config: &Config, trace: &Matrix, offset: usize) -> Vec<Outcome> {
    let cascade = Cascade::start(pack.clone(), config).await.unwrap();
    let mut out = Vec::new();
    for t in 0..TOKENS {
        let r = cascade.observe(row(trace, offset, t)).await.unwrap();
        out.push(outcome(&r, cascade.active().await.unwrap()));
    }
    cascade.shutdown().await;
    out
}

fn assert_outcomes(ctx: &str, want: &[Outcome], got: &[Outcome]) {
    assert_eq!(want.len(), got.len(), "{ctx}: token count");
    for (t, (w, g)) in want.iter().zip(got).enumerate() {
        assert_eq!(w, g, "{ctx}: token {t} differs from the stream run alone");
    }
}

/// A stream: which trace, from which offset, with which options.
#[derive(Clone)]
struct Stream {
    trace: usize,
    offset: usize,
    config: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_match_each_stream_run_alone() {
    let f = fixture();
    let base = config("realtime");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut alone_cache: std::collections::HashMap<(usize, usize, &str), Vec<Outcome>> = Default::default();
    for n in [1usize, 2, 5, 8, 16] {
        // Distinct traces, and the same trace at different offsets; two configs mixed.
        let streams: Vec<Stream> = (0..n)
            .map(|i| Stream {
                trace: i % f.traces.len(),
                offset: (i / f.traces.len()) * 5,
                config: if i % 3 == 2 { "decompose" } else { "realtime" },
            })
            .collect();
        for s in &streams {
            let key = (s.trace, s.offset, s.config);
            if let std::collections::hash_map::Entry::Vacant(e) = alone_cache.entry(key) {
                e.insert(alone(&f.pack, &config(s.config), &f.traces[s.trace], s.offset).await);
            }
        }
        let runtime = Runtime::start(f.pack.clone(), &base).await.unwrap();
        let mut tasks = Vec::new();
        for s in streams.clone() {
            let options = SessionOptions { cascade: Some(config(s.config).cascade), ..Default::default() };
            let session = runtime.open_session(options).await.unwrap();
            let trace = f.traces[s.trace].clone();
            let pauses: Vec<u64> = (0..TOKENS).map(|_| rng.random_range(0..3)).collect();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for (t, pause) in pauses.into_iter().enumerate() {
                    // Random arrival interleavings: some tokens wait a little first.
                    for _ in 0..pause {
                        tokio::task::yield_now().await;
                    }
                    let r = session.observe(row(&trace, s.offset, t)).await.unwrap();
                    assert_eq!(r.index, t, "each session numbers its own tokens");
                    out.push(outcome(&r, session.active().await.unwrap()));
                }
                session.close().await;
                out
            }));
        }
        for (i, (task, s)) in tasks.into_iter().zip(&streams).enumerate() {
            let got = task.await.unwrap();
            let ctx = format!("{n} sessions, session {i} (trace {}, offset {}, {})", s.trace, s.offset, s.config);
            assert_outcomes(&ctx, &alone_cache[&(s.trace, s.offset, s.config)], &got);
        }
        let stats = runtime.step_stats().await.unwrap();
        eprintln!(
            "{n} sessions: {} steps for {} requests (up to {} per step), {:.1} union probes per step",
            stats.steps,
            stats.requests,
            stats.max_step,
            stats.union_probes as f64 / stats.steps.max(1) as f64
        );
        assert_eq!((stats.sessions, stats.held_refs), (0, 0), "closed sessions hold nothing");
        assert_eq!(stats.traffic.install_bytes_copied + stats.traffic.move_bytes_copied, 0);
        runtime.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_batch_compositions_and_sessions_opening_and_closing_mid_run() {
    let f = fixture();
    let config = config("realtime");
    let runtime = Runtime::start(f.pack.clone(), &config).await.unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    // Six streams; each opens at some step and some close early.
    let opens = [0usize, 0, 3, 10, 17, 25];
    let closes = [TOKENS + 40, 30, TOKENS + 40, 40, TOKENS + 40, TOKENS + 40];
    let mut want = Vec::new();
    for i in 0..opens.len() {
        want.push(alone(&f.pack, &config, &f.traces[i % 4], i * 3).await);
    }
    let mut sessions: Vec<Option<probe_cascade::runtime::Session>> = (0..opens.len()).map(|_| None).collect();
    let mut got: Vec<Vec<Outcome>> = vec![Vec::new(); opens.len()];
    let mut shared_seen = false;
    for step in 0..TOKENS + 30 {
        for i in 0..opens.len() {
            if step == opens[i] {
                sessions[i] = Some(runtime.open_session(SessionOptions::default()).await.unwrap());
            }
            if step == closes[i] {
                sessions[i].take().unwrap().close().await;
            }
        }
        // A random composition of the open sessions that still have tokens to go.
        let batch: Vec<usize> = (0..opens.len())
            .filter(|&i| sessions[i].is_some() && got[i].len() < TOKENS && rng.random_bool(0.8))
            .collect();
        if batch.is_empty() {
            continue;
        }
        let items = batch
            .iter()
            .map(|&i| (sessions[i].as_ref().unwrap().id(), row(&f.traces[i % 4], i * 3, got[i].len())))
            .collect();
        let reports = runtime.observe_batch(items).await;
        for (&i, r) in batch.iter().zip(reports) {
            let s = sessions[i].as_ref().unwrap();
            got[i].push(outcome(&r.unwrap(), s.active().await.unwrap()));
        }
        let stats = runtime.step_stats().await.unwrap();
        shared_seen |= stats.held_probes < stats.held_refs;
    }
    for i in 0..opens.len() {
        let n = got[i].len();
        assert!(n >= 13, "session {i} ran {n} tokens");
        assert_outcomes(&format!("session {i} (opened at step {})", opens[i]), &want[i][..n], &got[i]);
    }
    assert!(shared_seen, "sessions share resident probes (the base layer) instead of holding copies");
    let stats = runtime.step_stats().await.unwrap();
    assert!(stats.max_step >= 3, "observe_batch steps are batched: {stats:?}");
    // Closed and unknown sessions are named.
    let closed = sessions.iter().flatten().count();
    assert_eq!(runtime.sessions().len(), closed);
    let unknown = probe_cascade::runtime::SessionId(999);
    let r = runtime.observe_batch(vec![(unknown, vec![0.0; 128])]).await;
    assert!(matches!(&r[0], Err(RuntimeError::UnknownSession(id)) if *id == unknown), "{r:?}");
    assert!(r[0].as_ref().unwrap_err().to_string().contains("session 999"));
    runtime.shutdown().await;
}

/// Each reported logit is, bit for bit, the kernel's scalar model of that probe on *this*
/// session's own hidden state: if a step ever mixed up hidden states, some logit would be
/// another session's. The traces are distinct, so a mix-up cannot hide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hidden_state_is_scored_into_another_sessions_report() {
    let f = fixture();
    for mode in [Mode::Exact, Mode::Pipelined] {
        let mut config = config("realtime");
        config.runtime.mode = mode;
        let runtime = Runtime::start(f.pack.clone(), &config).await.unwrap();
        let normalization = config.cascade.normalization_for(f.pack.input_normalization());
        let mut tasks = Vec::new();
        for i in 0..8usize {
            let session = runtime.open_session(SessionOptions::default()).await.unwrap();
            let trace = f.traces[i % 4].clone();
            let offset = i / 4 * 7;
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for t in 0..TOKENS {
                    let hidden = row(&trace, offset, t);
                    let r = session.observe(hidden.clone()).await.unwrap();
                    out.push((hidden, r));
                }
                session.close().await;
                out
            }));
        }
        let layout = f.pack.layout();
        let mut checked = 0;
        for (i, task) in tasks.into_iter().enumerate() {
            for (t, (hidden, report)) in task.await.unwrap().into_iter().enumerate() {
                let x = prepare_hidden(t, &hidden, f.pack.hidden_dim(), normalization).unwrap();
                for e in &report.top {
                    let bytes = f.pack.read_probe(ProbeId::sole(e.id)).unwrap();
                    let ranges = layout.ranges(&f.pack.tensor_offsets(ProbeId::sole(e.id)));
                    let want = reference_logit(&ProbeRef { bytes: &bytes, ranges: &ranges }, layout.dtype, &x);
                    assert_eq!(e.logit.to_bits(), want.to_bits(), "{mode:?}: session {i} token {t} {}", e.name);
                    checked += 1;
                }
            }
        }
        assert!(checked > 8 * TOKENS * 5, "{checked} logits checked");
        runtime.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_options_and_shutdown_give_named_errors_and_answer_everything_queued() {
    let f = fixture();
    let mut config = config("realtime");
    config.runtime.max_sessions = 2;
    let runtime = Runtime::start(f.pack.clone(), &config).await.unwrap();
    let a = runtime.open_session(SessionOptions::default()).await.unwrap();
    let b = runtime.open_session(SessionOptions::default()).await.unwrap();
    let err = runtime.open_session(SessionOptions::default()).await.err().unwrap();
    assert!(err.to_string().contains("runtime.max_sessions = 2"), "{err}");
    // Closing (or dropping) a session frees its place.
    b.close().await;
    let c = runtime.open_session(SessionOptions::default()).await.unwrap();
    drop(c);
    let c = runtime.open_session(SessionOptions::default()).await.unwrap();
    // Bad options name the key.
    let mut cascade = config.cascade.clone();
    cascade.max_loaded = 0;
    let err =
        runtime.open_session(SessionOptions { cascade: Some(cascade), ..Default::default() }).await.err().unwrap();
    assert!(err.to_string().contains("cascade.max_loaded"), "{err}");
    let mut cascade = config.cascade.clone();
    cascade.base_layers = vec![42];
    let err =
        runtime.open_session(SessionOptions { cascade: Some(cascade), ..Default::default() }).await.err().unwrap();
    assert!(err.to_string().contains("42"), "{err}");
    // A bad hidden state fails that token only, naming it.
    let err = a.observe(vec![0.0; 7]).await.unwrap_err();
    assert!(err.to_string().contains("token 0"), "{err}");
    let mut nan = vec![0.0; 128];
    nan[3] = f32::NAN;
    let r = runtime.observe_batch(vec![(a.id(), nan), (c.id(), f.traces[0].row(0).to_vec())]).await;
    assert!(r[0].is_err() && r[1].is_ok(), "{r:?}");
    // Shutdown answers every request already queued.
    let a = Arc::new(a);
    let queued: Vec<_> = (0..10)
        .map(|t| {
            let (a, h) = (a.clone(), f.traces[1].row(t).to_vec());
            tokio::spawn(async move { a.observe(h).await })
        })
        .collect();
    tokio::task::yield_now().await;
    runtime.shutdown().await;
    for q in queued {
        match q.await.unwrap() {
            Ok(_) | Err(RuntimeError::ShutDown) => {}
            Err(e) => panic!("a queued request got {e}"),
        }
    }
    assert!(matches!(a.observe(f.traces[0].row(0).to_vec()).await, Err(RuntimeError::ShutDown)));
    assert!(runtime.open_session(SessionOptions::default()).await.is_err());
}

/// Sessions on the tch backend's resident store (an accelerator's path, here on the CPU with
/// `device.cpu_kernel = "torch"`): each session's reports match its stream run alone (within
/// rounding: libtorch's sums are not batch-invariant), a probe several sessions use is copied
/// into the store once and a probe activated again is not copied again, pruning moves no
/// bytes, and sessions reserve nothing: 32 open at once with the shipped limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_the_resident_store_match_each_stream_and_copy_each_probe_once() {
    let f = fixture();
    let mut config = config("realtime");
    config.device.cpu_kernel = probe_cascade::config::CpuKernel::Torch;
    config.cascade.max_loaded = 60;
    config.runtime.pool_slots = 200;
    let mut want = Vec::new();
    for i in 0..3 {
        want.push(alone(&f.pack, &config, &f.traces[i], 0).await);
    }
    let runtime = Runtime::start(f.pack.clone(), &config).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..3usize {
        let session = runtime.open_session(SessionOptions::default()).await.unwrap();
        let trace = f.traces[i].clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for t in 0..TOKENS {
                let r = session.observe(row(&trace, 0, t)).await.unwrap();
                out.push(outcome(&r, session.active().await.unwrap()));
            }
            (session, out)
        }));
    }
    let mut sessions = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let (session, got) = task.await.unwrap();
        for (t, (w, g)) in want[i].iter().zip(&got).enumerate() {
            let names = |o: &Outcome| o.0.iter().map(|(n, l, _)| (n.clone(), *l)).collect::<Vec<_>>();
            assert_eq!(names(w), names(g), "session {i} token {t}: top lists");
            for ((name, _, a), (_, _, b)) in w.0.iter().zip(&g.0) {
                let (a, b) = (f32::from_bits(*a), f32::from_bits(*b));
                assert!((a - b).abs() < 1e-3, "session {i} token {t} {name}: {a} vs {b}");
            }
            assert_eq!((&w.1, &w.2), (&g.1, &g.2), "session {i} token {t}: counts and active set");
        }
        sessions.push(session);
    }
    let stats = runtime.step_stats().await.unwrap();
    assert!(stats.held_probes < stats.held_refs, "shared probes are resident once: {stats:?}");
    assert!(stats.traffic.path.contains("torch store"));
    assert_eq!(stats.traffic.move_bytes_copied, 0, "pruning moves pins, never bytes");
    // The default store holds the whole pack: each probe was copied in at most once, however
    // often the sessions activated it, and nothing was evicted.
    let store = stats.traffic.store.expect("the tch backend reports its store");
    assert_eq!(store.rows, f.pack.len());
    assert!(store.uploads as usize <= f.pack.len() && store.evictions == 0, "{store:?}");
    assert!(store.hits > store.uploads, "activations mostly found their probe resident: {store:?}");
    assert!(store.prefetched > 0, "near-threshold children were copied in ahead: {store:?}");
    assert_eq!(stats.traffic.install_bytes_copied, store.uploads * f.pack.layout().byte_len() as u64);
    // No reservation: 29 more sessions (32 in all) open under the shipped limits.
    for _ in 0..29 {
        sessions.push(runtime.open_session(SessionOptions::default()).await.unwrap());
    }
    assert_eq!(runtime.step_stats().await.unwrap().sessions, 32);
    drop(sessions);
    runtime.shutdown().await;
}

/// A resident store too small for what a token needs fails that token, naming
/// `device.store_bytes` and what is left, and the session goes on from where it was; a session
/// whose base layers cannot be pinned is refused the same way; a store that cannot even hold
/// the runtime's base layers does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_resident_store_fails_only_what_does_not_fit_and_names_device_store_bytes() {
    let f = fixture();
    let mut config = config("realtime");
    config.device.cpu_kernel = probe_cascade::config::CpuKernel::Torch;
    let base = probe_cascade::policy::base_set(f.pack.hierarchy(), &config.cascade).unwrap();
    let row_bytes = probe_cascade::runtime::scoring::torch::row_bytes(f.pack.hidden_dim(), tch::Kind::Float) as u64;
    config.device.store_bytes = (base.len() as u64 - 1) * row_bytes;
    let err = Runtime::start(f.pack.clone(), &config).await.err().unwrap();
    assert!(err.to_string().contains("device.store_bytes"), "{err}");
    // Room for the base layers and two more probes.
    config.device.store_bytes = (base.len() as u64 + 2) * row_bytes;
    let runtime = Runtime::start(f.pack.clone(), &config).await.unwrap();
    let session = runtime.open_session(SessionOptions::default()).await.unwrap();
    let mut failed = 0;
    for t in 0..TOKENS {
        match session.observe(row(&f.traces[0], 0, t)).await {
            Ok(_) => {}
            Err(e) => {
                assert!(e.to_string().contains("device.store_bytes"), "token {t}: {e}");
                failed += 1;
            }
        }
        let active = session.active().await.unwrap();
        assert!(active.len() <= base.len() + 2, "token {t}: the store bounds the active set");
    }
    assert!(failed > 0, "some token needed more than two children");
    let store = runtime.step_stats().await.unwrap().traffic.store.unwrap();
    assert!(store.resident <= store.rows && store.rows == base.len() + 2, "{store:?}");
    // A session with one more base layer cannot pin it: refused, naming the key.
    let mut cascade = config.cascade.clone();
    cascade.base_layers.push(1);
    let options = SessionOptions { cascade: Some(cascade), ..Default::default() };
    let err = runtime.open_session(options).await.err().unwrap();
    assert!(matches!(err, RuntimeError::StoreLimit(_)), "{err}");
    assert!(err.to_string().contains("device.store_bytes"), "{err}");
    // The first session still serves.
    session
        .observe(row(&f.traces[1], 0, 0))
        .await
        .map(|_| ())
        .or_else(|e| if e.to_string().contains("device.store_bytes") { Ok(()) } else { Err(e) })
        .unwrap();
    drop(session);
    runtime.shutdown().await;
}

/// Regression: `close().await` returned before the step scheduler freed the session's slots
/// (kameo reports an actor stopped before it drops its state, and the slots went with the
/// state), so stats read right after a close still counted the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_session_holds_nothing_once_close_returns() {
    let f = fixture();
    let rt = Runtime::start(f.pack.clone(), &config("realtime")).await.unwrap();
    for round in 0..20 {
        let session = rt.open_session(SessionOptions::default()).await.unwrap();
        for t in 0..3 {
            session.observe(row(&f.traces[round % 4], round, t)).await.unwrap();
        }
        session.close().await;
        let stats = rt.step_stats().await.unwrap();
        assert_eq!((stats.sessions, stats.held_probes), (0, 0), "round {round}: nothing held after close");
    }
    rt.shutdown().await;
}

/// What an embedder attaches to a session (the server's per-session facts) lives in the
/// runtime's registry, the one list of open sessions: found while the session is open, gone
/// when it closes; an attachment that owns its own `Session` is dropped at shutdown without
/// deadlocking on the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_live_in_the_runtimes_registry_while_their_session_is_open() {
    struct Facts {
        label: String,
        owned: std::sync::Mutex<Option<probe_cascade::runtime::Session>>,
    }
    let f = fixture();
    let rt = Runtime::start(f.pack.clone(), &config("realtime")).await.unwrap();
    let facts = |label: &str| {
        let label = label.to_string();
        move |id: probe_cascade::runtime::SessionId| {
            Arc::new(Facts { label: format!("{label} {}", id.0), owned: std::sync::Mutex::new(None) })
        }
    };
    let a = rt.open_session_with(SessionOptions::default(), facts("a")).await.unwrap();
    let b = rt.open_session_with(SessionOptions::default(), facts("b")).await.unwrap();
    let plain = rt.open_session(SessionOptions::default()).await.unwrap();
    assert_eq!(rt.attached::<Facts>(a.id()).unwrap().label, format!("a {}", a.id().0));
    assert!(rt.attached::<String>(a.id()).is_none(), "an attachment is found only as its own type");
    assert!(rt.attached::<Facts>(plain.id()).is_none());
    let listed: Vec<_> = rt.attachments::<Facts>().into_iter().map(|(id, f)| (id, f.label.clone())).collect();
    assert_eq!(listed, [(a.id(), format!("a {}", a.id().0)), (b.id(), format!("b {}", b.id().0))]);
    let a_id = a.id();
    a.close().await;
    assert!(rt.attached::<Facts>(a_id).is_none(), "gone with its session");
    assert_eq!(rt.sessions(), vec![b.id(), plain.id()]);
    // b's attachment owns b, as the server's entry owns an `OpenSession` session.
    let b_id = b.id();
    *rt.attached::<Facts>(b_id).unwrap().owned.lock().unwrap() = Some(b);
    tokio::time::timeout(std::time::Duration::from_secs(30), rt.shutdown()).await.expect("shutdown does not deadlock");
    assert!(rt.sessions().is_empty());
    assert!(matches!(plain.observe(row(&f.traces[0], 0, 0)).await, Err(RuntimeError::ShutDown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_session_installs_its_base_set_and_scores_nothing_before_its_first_token() {
    let f = fixture();
    let config = config("realtime");
    let runtime = Runtime::start(f.pack.clone(), &config).await.unwrap();
    let sessions = [
        runtime.open_session(SessionOptions::default()).await.unwrap(),
        runtime.open_session(SessionOptions::default()).await.unwrap(),
    ];
    let stats = runtime.step_stats().await.unwrap();
    let base = sessions[0].active().await.unwrap().len();
    assert!(base > 0 && stats.held_refs >= 2 * base, "both base sets are installed: {stats:?}");
    assert_eq!((stats.steps, stats.logits), (0, 0), "no hidden state yet, so nothing is scored: {stats:?}");
    // The first token scores the base set on its own hidden state, as a session run alone does.
    let want = alone(&f.pack, &config, &f.traces[0], 0).await;
    let r = sessions[0].observe(row(&f.traces[0], 0, 0)).await.unwrap();
    assert_outcomes("the first token after open", &want[..1], &[outcome(&r, sessions[0].active().await.unwrap())]);
    assert!(runtime.step_stats().await.unwrap().logits >= base as u64);
    for s in sessions {
        s.close().await;
    }
    runtime.shutdown().await;
}
