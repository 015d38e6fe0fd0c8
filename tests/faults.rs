//! The fault matrix (docs/reliability.md, "Faults"): every injected fault × every way of
//! running a stream. Each cell checks three things:
//!
//! 1. every request is answered within a deadline, with a report or an error that names what
//!    failed (the probe's concept, or the actor);
//! 2. what did not need the failed probe is served as if nothing had happened: with 8
//!    sessions, the sessions whose clean run never scored the probe get reports bit-identical
//!    to that clean run; a single stream answers later tokens again (unless the fault broke it
//!    by design, which its errors must then say);
//! 3. afterwards nothing is held: no session, no slot, no read in flight; the cache within
//!    its budget and no larger than the clean run's; the process back to its thread count.
//!
//! One `#[test]` runs the whole matrix, in order, so that the thread counts are the runtime's
//! own. `FAULT_MATRIX=path` writes the matrix as markdown.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use probe_cascade::config::{Config, Mode};
use probe_cascade::engine::TokenReport;
use probe_cascade::pack::{ConceptId, ProbeId};
use probe_cascade::runtime::cache::CacheStats;
use probe_cascade::runtime::faults::{FaultPlan, Faults, PanicSite, ReadFault};
use probe_cascade::runtime::reader::ReaderKind;
use probe_cascade::runtime::{Cascade, Runtime, RuntimeError, SessionOptions};

const TOKENS: usize = 40;
const SESSIONS: usize = 8;
/// Longer than any answer may take here (the slowest cell reads every probe 1–50 ms late).
const DEADLINE: Duration = Duration::from_secs(30);

use common::Streams as Fixture;

fn fixture() -> Fixture {
    common::streams(TOKENS)
}

fn config(mode: Mode) -> Config {
    let mut c = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/realtime.toml")).unwrap();
    c.runtime.mode = mode;
    c.runtime.cache_bytes = 64 << 20;
    // A short budget, so that pipelined mode both scores children in time and defers some.
    c.runtime.latency_budget_us = if mode == Mode::Pipelined { 2_000 } else { 0 };
    c
}

/// Session `s`'s stream: trace `s % 4` from offset `3 s`, wrapping.
fn hidden(f: &Fixture, s: usize, t: usize) -> Vec<f32> {
    let trace = &f.traces[s % f.traces.len()];
    trace.row((3 * s + t) % trace.rows).to_vec()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Run {
    Exact,
    Pipelined,
    Sessions,
}

impl Run {
    fn name(self) -> &'static str {
        match self {
            Run::Exact => "exact",
            Run::Pipelined => "pipelined",
            Run::Sessions => "8 sessions",
        }
    }
    fn streams(self) -> usize {
        if self == Run::Sessions {
            SESSIONS
        } else {
            1
        }
    }
}

/// A token's report reduced to what must match bit for bit.
type Outcome = (Vec<(String, u32)>, Vec<ConceptId>);

fn outcome(r: &TokenReport) -> Outcome {
    (r.top.iter().map(|e| (e.name.clone(), e.logit.to_bits())).collect(), r.scored_ids.clone())
}

/// Whether two answers are the same report: bit for bit on the kernel; on the tch store the
/// same concepts, with logits within rounding (libtorch's sums depend on the step's batch).
fn same(a: &TokenReport, b: &TokenReport, store: bool) -> bool {
    if !store {
        return outcome(a) == outcome(b);
    }
    let close = a.top.iter().zip(&b.top).all(|(x, y)| x.name == y.name && (x.logit - y.logit).abs() < 1e-3);
    close && a.top.len() == b.top.len() && a.scored_ids == b.scored_ids
}

/// Each stream's answers, token by token.
type Answers = Vec<Vec<Result<TokenReport, RuntimeError>>>;

/// What is left once every stream has closed.
#[derive(Debug, Default, Clone)]
struct After {
    sessions: usize,
    held: usize,
    in_flight: u64,
    cache_bytes: u64,
    cache_budget: u64,
    threads_before: usize,
    threads_after: usize,
    reader: Option<ReaderKind>,
}

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
}

/// Threads of a stopped runtime exit a little after it stops: wait for the count to settle.
async fn threads_back_to(before: usize) -> usize {
    for _ in 0..1000 {
        if threads() <= before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    threads()
}

async fn answer<F: std::future::Future<Output = Result<TokenReport, RuntimeError>>>(
    what: String,
    f: F,
) -> Result<TokenReport, RuntimeError> {
    tokio::time::timeout(DEADLINE, f).await.unwrap_or_else(|_| panic!("{what} was not answered within {DEADLINE:?}"))
}

/// The cache's figures once the speculative reads (prefetch hints) still landing after the
/// sessions closed have finished, as they must (within the deadline).
async fn reads_landed(rt: &Runtime) -> Result<CacheStats, RuntimeError> {
    let mut cache = rt.cache_stats().await?;
    let t0 = std::time::Instant::now();
    while cache.in_flight > 0 && t0.elapsed() < DEADLINE {
        tokio::time::sleep(Duration::from_millis(5)).await;
        cache = rt.cache_stats().await?;
    }
    Ok(cache)
}

/// Runs `run` with `faults`, every stream back to back (8 sessions: each token of all of them
/// in one `observe_batch`), then closes everything and reads what is left.
async fn drive(
    f: &Fixture,
    run: Run,
    faults: Faults,
    reader: ReaderKind,
    store: bool,
) -> Result<(Answers, After), RuntimeError> {
    let threads_before = threads();
    let mode = if run == Run::Pipelined { Mode::Pipelined } else { Mode::Exact };
    let mut cfg = config(mode);
    cfg.runtime.reader = reader;
    if store {
        cfg.device.cpu_kernel = probe_cascade::config::CpuKernel::Torch;
    }
    let mut answers: Answers = (0..run.streams()).map(|_| Vec::new()).collect();
    let mut after = After { threads_before, cache_budget: cfg.runtime.cache_bytes, ..Default::default() };
    if run == Run::Sessions {
        let rt = Runtime::start_with_faults(f.pack.clone(), &cfg, faults).await?;
        after.reader = Some(rt.reader());
        let mut sessions = Vec::new();
        for _ in 0..SESSIONS {
            sessions.push(rt.open_session(SessionOptions::default()).await?);
        }
        for t in 0..TOKENS {
            let items = sessions.iter().enumerate().map(|(s, sess)| (sess.id(), hidden(f, s, t))).collect();
            let got = tokio::time::timeout(DEADLINE, rt.observe_batch(items))
                .await
                .unwrap_or_else(|_| panic!("token {t} of the sessions was not answered"));
            for (s, r) in got.into_iter().enumerate() {
                answers[s].push(r);
            }
        }
        for s in sessions {
            s.close().await;
        }
        let steps = rt.step_stats().await?;
        let cache = reads_landed(&rt).await?;
        (after.sessions, after.held) = (steps.sessions, steps.held_probes);
        (after.in_flight, after.cache_bytes) = (cache.in_flight, cache.resident_bytes);
        rt.shutdown().await;
    } else {
        let cascade = Cascade::start_with_faults(f.pack.clone(), &cfg, faults).await?;
        after.reader = Some(cascade.reader());
        for t in 0..TOKENS {
            let r = answer(format!("token {t}"), cascade.observe(hidden(f, 0, t))).await;
            answers[0].push(r);
            // Pipelined mode's late loads land in the generation gap, as in a real loop.
            if mode == Mode::Pipelined {
                tokio::time::sleep(Duration::from_micros(300)).await;
            }
        }
        tokio::time::timeout(DEADLINE, cascade.settle()).await.expect("the stream settles").ok();
        let cache = cascade.cache_stats().await?;
        (after.in_flight, after.cache_bytes) = (cache.in_flight, cache.resident_bytes);
        cascade.shutdown().await;
    }
    after.threads_after = threads_back_to(threads_before).await;
    Ok((answers, after))
}

/// One row of the matrix: a fault, what it is injected at, and how its errors must read.
struct Row {
    name: &'static str,
    plan: fn(ConceptId) -> FaultPlan,
    /// Phrases of which a request's error must contain one (besides the concept's name).
    names: &'static [&'static str],
    /// The fault breaks the stream that hits it, on purpose (its later tokens say so): in
    /// which runs.
    breaks: &'static [Run],
    /// It fires once: a speculative read (a prefetch hint) may absorb it unseen.
    once: bool,
    reader: ReaderKind,
    /// Runs on the tch backend's resident store (`device.cpu_kernel = "torch"`, an
    /// accelerator's path on the CPU), against clean runs on it.
    store: bool,
}

fn rows() -> Vec<Row> {
    vec![
        Row {
            name: "EIO",
            plan: |x| FaultPlan::new().read(ProbeId::sole(x), ReadFault::Eio, None),
            names: &["os error 5"],
            breaks: &[],
            once: false,
            reader: ReaderKind::Auto,
            store: false,
        },
        Row {
            name: "EIO, once",
            plan: |x| FaultPlan::new().read(ProbeId::sole(x), ReadFault::Eio, Some(1)),
            names: &["os error 5"],
            breaks: &[],
            once: true,
            reader: ReaderKind::Auto,
            store: false,
        },
        Row {
            name: "short read",
            plan: |x| FaultPlan::new().read(ProbeId::sole(x), ReadFault::Short, None),
            names: &["returned"],
            breaks: &[],
            once: false,
            reader: ReaderKind::Auto,
            store: false,
        },
        Row {
            name: "CRC corruption",
            plan: |x| FaultPlan::new().read(ProbeId::sole(x), ReadFault::Corrupt, None),
            names: &["checksum mismatch"],
            breaks: &[],
            once: false,
            reader: ReaderKind::Auto,
            store: false,
        },
        Row {
            name: "every read 1–50 ms late",
            plan: |_| FaultPlan::new().slow_reads(Duration::from_millis(1), Duration::from_millis(50)),
            names: &[],
            breaks: &[],
            once: false,
            reader: ReaderKind::Auto,
            store: false,
        },
        Row {
            name: "io_uring refused",
            plan: |_| FaultPlan::new().refuse_io_uring(),
            names: &[],
            breaks: &[],
            once: false,
            reader: ReaderKind::Auto,
            store: false,
        },
        Row {
            name: "panic in the coordinator",
            plan: |x| FaultPlan::new().panic(PanicSite::Coordinator, ProbeId::sole(x), Some(1)),
            names: &["coordinator", "panicked"],
            breaks: &[Run::Exact, Run::Pipelined, Run::Sessions],
            once: true,
            reader: ReaderKind::Auto,
            store: false,
        },
        Row {
            name: "panic in the cache",
            plan: |x| FaultPlan::new().panic(PanicSite::Cache, ProbeId::sole(x), None),
            names: &["cache actor", "panicked"],
            breaks: &[],
            once: false,
            reader: ReaderKind::Auto,
            store: false,
        },
        Row {
            name: "panic in the scoring thread",
            plan: |x| FaultPlan::new().panic(PanicSite::Scoring, ProbeId::sole(x), None),
            names: &["panicked"],
            // Every stream scores on the step scheduler, whose scoring only reads the slots:
            // the token fails, the stream goes on.
            breaks: &[],
            once: false,
            reader: ReaderKind::Auto,
            store: false,
        },
        Row {
            name: "scoring fails mid-step",
            plan: |x| FaultPlan::new().fail_step(ProbeId::sole(x), None),
            names: &["scoring step failed"],
            breaks: &[],
            once: false,
            reader: ReaderKind::Auto,
            store: false,
        },
        Row {
            name: "copy into the device store fails",
            plan: |x| FaultPlan::new().fail_upload(ProbeId::sole(x), None),
            names: &["resident store"],
            breaks: &[],
            once: false,
            reader: ReaderKind::Auto,
            store: true,
        },
        Row {
            name: "copy into the device store fails, once",
            plan: |x| FaultPlan::new().fail_upload(ProbeId::sole(x), Some(1)),
            names: &["resident store"],
            breaks: &[],
            once: true,
            reader: ReaderKind::Auto,
            store: true,
        },
    ]
}

/// A cell's figures, for the matrix.
struct Cell {
    requests: usize,
    reports: usize,
    errors: usize,
    failed_loads: usize,
    /// Streams that never needed the probe, and how many of them matched the clean run.
    others: (usize, usize),
    clean_cache: u64,
}

/// The probe to fail: a child (not a base probe) that the clean runs score, in as few of the
/// 8 sessions as possible but in session 0 (the single stream), so that most sessions never
/// need it.
fn target(f: &Fixture, clean: &Answers) -> ConceptId {
    let base = f.pack.hierarchy().layer_members(0);
    let needs = |s: usize, id: ConceptId| clean[s].iter().any(|r| r.as_ref().unwrap().scored_ids.contains(&id));
    let candidates =
        clean[0].iter().flat_map(|r| r.as_ref().unwrap().scored_ids.clone()).filter(|id| !base.contains(&id.0));
    candidates.min_by_key(|&id| ((0..SESSIONS).filter(|&s| needs(s, id)).count(), id.0)).expect("a child")
}

fn check_cell(f: &Fixture, row: &Row, run: Run, x: ConceptId, clean: &Answers, got: &Answers, after: &After) -> Cell {
    let label = f.pack.hierarchy().label(x);
    let cell = format!("{} × {}", row.name, run.name());
    let mut cell_figures = Cell { requests: 0, reports: 0, errors: 0, failed_loads: 0, others: (0, 0), clean_cache: 0 };
    for (s, stream) in got.iter().enumerate() {
        assert_eq!(stream.len(), TOKENS, "{cell}: session {s} got an answer per token");
        let needs = clean[s].iter().any(|r| r.as_ref().unwrap().scored_ids.contains(&x));
        let mut first_error = None;
        for (t, r) in stream.iter().enumerate() {
            cell_figures.requests += 1;
            match r {
                Ok(r) => {
                    cell_figures.reports += 1;
                    cell_figures.failed_loads += r.failed_loads.len();
                    for why in &r.failed_loads {
                        println!("{cell}: session {s} token {t}: failed load: {why}");
                        assert!(why.contains(&label), "{cell}: a failed load names {label}: {why}");
                    }
                }
                Err(e) => {
                    cell_figures.errors += 1;
                    first_error.get_or_insert(t);
                    let text = e.to_string();
                    if cell_figures.errors <= 2 {
                        println!("{cell}: session {s} token {t}: {text}");
                    }
                    let named = text.contains(&label) || row.names.iter().any(|n| text.contains(n));
                    assert!(named, "{cell}: session {s} token {t}: the error names {label} or the fault: {text}");
                    assert!(
                        needs || run != Run::Sessions,
                        "{cell}: session {s} never needed {label} but failed: {text}"
                    );
                }
            }
        }
        if run == Run::Sessions && !needs {
            cell_figures.others.0 += 1;
            let same =
                stream.iter().zip(&clean[s]).all(|(a, b)| same(a.as_ref().unwrap(), b.as_ref().unwrap(), row.store));
            assert!(same, "{cell}: session {s}, which never needed {label}, gets the clean run's reports");
            cell_figures.others.1 += same as usize;
        }
        if let Some(t0) = first_error {
            if row.breaks.contains(&run) {
                assert!(stream[t0..].iter().all(|r| r.is_err()), "{cell}: a broken stream stays broken");
            } else if t0 + 1 < TOKENS {
                // Served again after the fault: some later token gets a report.
                assert!(stream[t0 + 1..].iter().any(|r| r.is_ok()), "{cell}: session {s} is served after its error");
            }
        }
    }
    assert_eq!((after.sessions, after.held, after.in_flight), (0, 0, 0), "{cell}: nothing held afterwards: {after:?}");
    assert!(after.cache_bytes <= after.cache_budget, "{cell}: the cache stays within its budget");
    assert!(after.threads_after <= after.threads_before, "{cell}: threads back to {}: {after:?}", after.threads_before);
    cell_figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_matrix() {
    // The injected panics are expected: keep them out of the output (others still print).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.to_string().contains("injected fault") {
            default_hook(info)
        }
    }));
    let f = fixture();
    io_uring_refused_when_asked_for_by_name_is_a_named_error(&f).await;
    let runs = [Run::Exact, Run::Pipelined, Run::Sessions];
    let (mut clean, mut clean_store) = (Vec::new(), Vec::new());
    for run in runs {
        clean.push(drive(&f, run, Faults::none(), ReaderKind::Auto, false).await.unwrap());
        clean_store.push(drive(&f, run, Faults::none(), ReaderKind::Auto, true).await.unwrap());
    }
    let x = target(&f, &clean[2].0);
    let label = f.pack.hierarchy().label(x);
    let needing =
        (0..SESSIONS).filter(|&s| clean[2].0[s].iter().any(|r| r.as_ref().unwrap().scored_ids.contains(&x))).count();
    println!("faults at probe {} ({label}), which {needing} of {SESSIONS} sessions' clean runs score", x.0);
    assert!(needing < SESSIONS, "some sessions never need the failed probe");

    let mut table = vec![
        "| fault | mode | fired | requests | reports | errors | failed loads in reports | sessions without the probe, as clean | after: sessions, slots, reads in flight | cache after (clean) | threads after (before) |".to_string(),
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|".to_string(),
    ];
    for row in rows() {
        for (i, run) in runs.into_iter().enumerate() {
            let plan = Arc::new((row.plan)(x));
            let (got, after) = drive(&f, run, Faults::plan(plan.clone()), row.reader, row.store).await.unwrap();
            let clean = if row.store { &clean_store } else { &clean };
            let fired = plan.fired();
            // Pipelined mode's path through the hierarchy depends on what lands in time, so
            // whether it meets the probe at all depends on the machine's load: its cells check
            // every answer, but not that the fault fired or showed.
            let timed = run == Run::Pipelined;
            assert!(fired > 0 || timed, "{} × {}: the fault fired", row.name, run.name());
            let mut cell = check_cell(&f, &row, run, x, &clean[i].0, &got, &after);
            cell.clean_cache = clean[i].1.cache_bytes;
            if row.names.is_empty() {
                // Nothing failed: exact answers are the clean run's, bit for bit.
                assert_eq!(cell.errors + cell.failed_loads, 0, "{} × {}: nothing fails", row.name, run.name());
                if run != Run::Pipelined {
                    for (s, stream) in got.iter().enumerate() {
                        for (a, b) in stream.iter().zip(&clean[i].0[s]) {
                            assert_eq!(outcome(a.as_ref().unwrap()), outcome(b.as_ref().unwrap()), "{}", row.name);
                        }
                    }
                }
            } else if !row.once && !timed {
                assert!(cell.errors + cell.failed_loads > 0, "{} × {}: the fault shows", row.name, run.name());
            }
            if row.name == "io_uring refused" {
                assert_eq!(after.reader, Some(ReaderKind::Threads), "auto falls back to threads");
            }
            let others = if run == Run::Sessions {
                format!("{} of {}", cell.others.1, cell.others.0)
            } else if row.breaks.contains(&run) && cell.errors > 0 {
                "— (one stream: broken, says so)".into()
            } else {
                "— (one stream: served after)".into()
            };
            let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
            table.push(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {}, {}, {} | {} ({}) | {} ({}) |",
                row.name,
                run.name(),
                fired,
                cell.requests,
                cell.reports,
                cell.errors,
                cell.failed_loads,
                others,
                after.sessions,
                after.held,
                after.in_flight,
                mb(after.cache_bytes),
                mb(cell.clean_cache),
                after.threads_after,
                after.threads_before,
            ));
        }
    }
    for (i, run) in runs.into_iter().enumerate() {
        let (requests, reports, errors, after) = closed_in_flight(&f, run).await;
        let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
        table.push(format!(
            "| closed with tokens in flight | {} | — | {requests} | {reports} | {errors} | 0 | {} | {}, {}, {} | {} ({}) | {} ({}) |",
            run.name(),
            if run == Run::Sessions { "5 of 5 untouched sessions served" } else { "— (one stream)" },
            after.sessions,
            after.held,
            after.in_flight,
            if run == Run::Sessions { mb(after.cache_bytes) } else { "gone with the stream".into() },
            mb(clean[i].1.cache_bytes),
            after.threads_after,
            after.threads_before,
        ));
    }
    let table = table.join("\n");
    println!("{table}");
    if let Ok(path) = std::env::var("FAULT_MATRIX") {
        std::fs::write(path, format!("{table}\n")).unwrap();
    }
}

/// `reader = "io_uring"` where io_uring is refused: start-up fails, naming the reader.
async fn io_uring_refused_when_asked_for_by_name_is_a_named_error(f: &Fixture) {
    let mut cfg = config(Mode::Exact);
    cfg.runtime.reader = ReaderKind::IoUring;
    let faults = Faults::plan(Arc::new(FaultPlan::new().refuse_io_uring()));
    let e = Runtime::start_with_faults(f.pack.clone(), &cfg, faults).await.err().expect("refused");
    assert!(e.to_string().contains("starting the probe reader"), "{e}");
    assert!(e.to_string().contains("os error 38"), "{e}");
}

/// Requests in flight when their stream goes away: a `Cascade` shut down, a session closed, a
/// session dropped without closing, and callers that gave up on their requests. Each request
/// is answered (a report, or an error saying the stream is gone), the other sessions go on,
/// and nothing is left held. Returns requests, reports, errors and what is left.
async fn closed_in_flight(f: &Fixture, run: Run) -> (usize, usize, usize, After) {
    const QUEUED: usize = 12;
    let threads_before = threads();
    let mode = if run == Run::Pipelined { Mode::Pipelined } else { Mode::Exact };
    let cfg = config(mode);
    let mut after = After { threads_before, cache_budget: cfg.runtime.cache_bytes, ..Default::default() };
    let gone = ["has shut down", "is not open", "did not answer"];
    let named = |e: &RuntimeError| gone.iter().any(|g| e.to_string().contains(g));
    let (mut requests, mut reports, mut errors) = (0, 0, 0);
    let mut tally = |r: Result<TokenReport, RuntimeError>, what: &str| {
        requests += 1;
        match r {
            Ok(_) => reports += 1,
            Err(e) => {
                assert!(named(&e), "{what}: the error says the stream is gone: {e}");
                errors += 1;
            }
        }
    };
    if run == Run::Sessions {
        let rt = Runtime::start(f.pack.clone(), &cfg).await.unwrap();
        let mut sessions = Vec::new();
        for _ in 0..SESSIONS {
            sessions.push(Some(rt.open_session(SessionOptions::default()).await.unwrap()));
        }
        let ids: Vec<_> = sessions.iter().map(|s| s.as_ref().unwrap().id()).collect();
        let mut tasks = Vec::new();
        for t in 0..QUEUED {
            for (s, &id) in ids.iter().enumerate() {
                let (rt, h) = (rt.clone(), hidden(f, s, t));
                tasks.push((s, tokio::spawn(async move { rt.observe_batch(vec![(id, h)]).await.pop().unwrap() })));
            }
        }
        // Session 0 closes, session 1 is dropped, session 2's callers give up: all mid-flight.
        tokio::task::yield_now().await;
        let closing = sessions[0].take().unwrap().close();
        drop(sessions[1].take());
        let (abandoned, kept): (Vec<_>, Vec<_>) = tasks.into_iter().partition(|(s, _)| *s == 2);
        abandoned.iter().for_each(|(_, t)| t.abort());
        closing.await;
        for (s, task) in kept {
            let r = tokio::time::timeout(DEADLINE, task).await.expect("answered in time").expect("no panic");
            if s > 2 {
                assert!(r.is_ok(), "session {s}, still open, is served: {:?}", r.err());
            }
            tally(r, &format!("session {s}"));
        }
        for s in sessions.into_iter().flatten() {
            s.close().await;
        }
        let steps = rt.step_stats().await.unwrap();
        let cache = reads_landed(&rt).await.unwrap();
        (after.sessions, after.held) = (steps.sessions, steps.held_probes);
        (after.in_flight, after.cache_bytes) = (cache.in_flight, cache.resident_bytes);
        rt.shutdown().await;
    } else {
        let cascade = Cascade::start(f.pack.clone(), &cfg).await.unwrap();
        // Enough queued that the shutdown lands among them: the ones already queued are
        // answered, the rest are told the stream shut down.
        let tasks: Vec<_> = (0..20 * QUEUED)
            .map(|t| {
                let (c, h) = (cascade.clone(), hidden(f, 0, t));
                tokio::spawn(async move { c.observe(h).await })
            })
            .collect();
        // The first answer, so that the stream is known to be busy when it shuts down.
        let mut tasks = tasks.into_iter();
        let first = tasks.next().unwrap();
        tally(tokio::time::timeout(DEADLINE, first).await.expect("answered in time").expect("no panic"), "token 0");
        cascade.shutdown().await;
        for task in tasks {
            let r = tokio::time::timeout(DEADLINE, task).await.expect("answered in time").expect("no panic");
            tally(r, "the stream");
        }
        // A request after the shutdown is told so.
        tally(cascade.observe(hidden(f, 0, 0)).await, "after the shutdown");
        assert!(cascade.cache_stats().await.is_err(), "the cache is gone with the stream");
    }
    assert_eq!((after.sessions, after.held, after.in_flight), (0, 0, 0), "{}: nothing held: {after:?}", run.name());
    after.threads_after = threads_back_to(threads_before).await;
    assert!(after.threads_after <= threads_before, "{}: threads back to {threads_before}: {after:?}", run.name());
    assert!(errors > 0, "{}: the close caught some requests", run.name());
    assert!(reports > 0, "{}: requests queued before the close were answered", run.name());
    (requests, reports, errors, after)
}
