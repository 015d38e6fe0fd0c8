//! What the network adds: one session's tokens back to back, in-process against a session
//! stream over loopback TCP and over a Unix socket (and one-item ObserveBatch calls), for a
//! D=2560 f32 hidden state, and the TCP stream again with 8 live viewers reading its events
//! (`GET /v1/sessions/{id}/events`); then throughput with 1, 8 and 32 concurrent client streams.
//!
//! The server runs in this process on its own tokio runtime (its own threads), the clients on
//! another; the bytes cross the kernel's loopback or Unix socket as they would between two
//! processes. Modes alternate in blocks (ABAB...) so that drift hits all alike, and every mode
//! replays the same tokens in the same order, so that each session does the same cascade work;
//! medians.
//!
//!     cargo bench -p probe-cascade-server --bench serve [-- --tokens N --blocks B --out FILE]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use probe_cascade::config::Config;
use probe_cascade::kernel::CpuInfo;
use probe_cascade::npy::Matrix;
use probe_cascade::pack::{DType, Pack};
use probe_cascade::synth::{concept_geometry, synth_trace, write_synth_pack, SynthParams, TraceParams};
use probe_cascade_server::convert::encode_f32;
use probe_cascade_server::proto::v1 as pb;
use probe_cascade_server::proto::v1::probe_cascade_client::ProbeCascadeClient;
use probe_cascade_server::ServeOptions;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// Live viewers of the watched session.
const VIEWERS: usize = 8;

struct Args {
    tokens: usize,
    blocks: usize,
    out: Option<PathBuf>,
    /// serve.request_deadline_ms (None: the default).
    deadline_ms: Option<u64>,
}

fn args() -> Args {
    let mut a = Args { tokens: 200, blocks: 6, out: None, deadline_ms: None };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--tokens" => a.tokens = it.next().and_then(|v| v.parse().ok()).expect("--tokens N"),
            "--blocks" => a.blocks = it.next().and_then(|v| v.parse().ok()).expect("--blocks B"),
            "--out" => a.out = it.next().map(PathBuf::from),
            "--deadline-ms" => a.deadline_ms = it.next().and_then(|v| v.parse().ok()),
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

async fn unix_channel(path: PathBuf) -> Channel {
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .unwrap()
}

struct Stream {
    id: u64,
    tx: mpsc::Sender<pb::SessionRequest>,
    rx: tonic::Streaming<pb::SessionResponse>,
}

async fn open(client: &mut ProbeCascadeClient<Channel>) -> Stream {
    let (tx, rx) = mpsc::channel(64);
    tx.send(pb::SessionRequest { kind: Some(pb::session_request::Kind::Open(Default::default())), text: None })
        .await
        .unwrap();
    let mut rx = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let id = match rx.message().await.unwrap().and_then(|m| m.kind) {
        Some(pb::session_response::Kind::Opened(o)) => o.session_id,
        other => panic!("{other:?}"),
    };
    Stream { id, tx, rx }
}

/// A live viewer of session `id`: reads its server-sent events as they come, on a task of its
/// own, and counts them (`data:` lines). Returns once the server has subscribed it.
async fn viewer(http: std::net::SocketAddr, id: u64, seen: Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    let req = format!("GET /v1/sessions/{id}/events HTTP/1.1\r\nhost: localhost\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    // The response head and the `: subscribed` comment come first.
    while !String::from_utf8_lossy(&head).contains("subscribed") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the server closed the events stream");
        head.extend_from_slice(&buf[..n]);
    }
    tokio::spawn(async move {
        let mut tail = Vec::new();
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            tail.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&tail);
            let events = text.matches("\ndata: ").count();
            let keep = text.rfind("\ndata: ").map_or(0, |i| i + 1);
            seen.fetch_add(events, std::sync::atomic::Ordering::Relaxed);
            tail.drain(..keep.min(tail.len()));
        }
    });
}

impl Stream {
    /// The transport's floor: the same 10 KB message with no dtype, answered by an error
    /// before the runtime is asked.
    async fn rejected(&mut self, row: &[f32]) {
        let mut h = encode_f32(row);
        h.dtype = 0;
        self.tx
            .send(pb::SessionRequest { kind: Some(pb::session_request::Kind::Hidden(h)), text: None })
            .await
            .unwrap();
        match self.rx.message().await.unwrap().and_then(|m| m.kind) {
            Some(pb::session_response::Kind::Result(pb::TokenResult {
                outcome: Some(pb::token_result::Outcome::Error(_)),
                ..
            })) => {}
            other => panic!("{other:?}"),
        }
    }

    /// One token: send, wait for its answer.
    async fn observe(&mut self, row: &[f32]) {
        let msg = pb::SessionRequest { kind: Some(pb::session_request::Kind::Hidden(encode_f32(row))), text: None };
        self.tx.send(msg).await.unwrap();
        match self.rx.message().await.unwrap().and_then(|m| m.kind) {
            Some(pb::session_response::Kind::Result(pb::TokenResult {
                outcome: Some(pb::token_result::Outcome::Report(_)),
                ..
            })) => {}
            other => panic!("{other:?}"),
        }
    }
}

fn main() {
    let a = args();
    let dir = tempfile::tempdir().unwrap();
    let pack_dir = dir.path().join("pack");
    // D = 2560 (the width the target names); 300 concepts keep the pack small to write.
    let params = SynthParams { concepts: 300, hidden_dim: 2560, dtype: DType::Bf16, ..SynthParams::demo() };
    eprintln!("writing a {}-concept D=2560 bf16 pack...", params.concepts);
    write_synth_pack(&pack_dir, &params, |_| {}).unwrap();
    let pack = Arc::new(Pack::open(&pack_dir).unwrap());
    let geometry = concept_geometry(&pack, |_| {}).unwrap();
    let trace: Matrix = synth_trace(&pack, &geometry, &TraceParams { tokens: 256, seed: 7, ..TraceParams::default() });
    let mut config_text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/realtime.toml"))
        .unwrap()
        .replace("threads = 0", "threads = 1");
    if let Some(ms) = a.deadline_ms {
        config_text.push_str(&format!("\n[serve]\nrequest_deadline_ms = {ms}\n"));
    }
    let config_path = dir.path().join("bench.toml");
    std::fs::write(&config_path, &config_text).unwrap();
    let _ = Config::load(&config_path).unwrap();

    let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let options = ServeOptions {
        pack: pack_dir.clone(),
        config: Some(config_path),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: Some(dir.path().join("bench.sock")),
        http: Some("127.0.0.1:0".parse().unwrap()),
        token: Default::default(),
    };
    let server = server_rt.block_on(probe_cascade_server::start(options)).unwrap();
    let runtime = server.state().runtime.clone();
    let (tcp_addr, unix_path) = (server.grpc_addr().unwrap(), server.unix_path().unwrap().to_path_buf());
    let http_addr = server.http_addr().unwrap();

    let client_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut out = String::new();
    out.push_str(&format!("cpu: {}\n\n", CpuInfo::detect()));
    client_rt.block_on(async {
        let tcp =
            Channel::from_shared(format!("http://{tcp_addr}")).unwrap().tcp_nodelay(true).connect().await.unwrap();
        let unix = unix_channel(unix_path.clone()).await;
        let mut tcp_client = ProbeCascadeClient::new(tcp);
        let mut unix_client = ProbeCascadeClient::new(unix);
        let local = runtime.open_session(Default::default()).await.unwrap();
        let mut tcp_stream = open(&mut tcp_client).await;
        let mut unix_stream = open(&mut unix_client).await;
        // The same path as `tcp_stream`, on a session that 8 viewers watch.
        let mut watched = open(&mut tcp_client).await;
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..VIEWERS {
            viewer(http_addr, watched.id, seen.clone()).await;
        }
        let batch_id = tcp_client.open_session(pb::SessionOptions::default()).await.unwrap().into_inner().session_id;
        let modes = [
            "in-process",
            "stream over TCP",
            "stream over Unix socket",
            "ObserveBatch (1 item) over TCP",
            "stream over TCP, rejected before the runtime (transport floor)",
            "stream over TCP, 8 live viewers",
        ];
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        let mut wall: Vec<f64> = vec![0.0; modes.len()];
        let mut counts = vec![0usize; modes.len()];
        // Warm up every path (caches, connections).
        for t in 0..32 {
            let row = trace.row(t % trace.rows);
            local.observe(row.to_vec()).await.unwrap();
            tcp_stream.observe(row).await;
            unix_stream.observe(row).await;
            watched.observe(row).await;
        }
        // Every path replays the same tokens in the same order (block b: tokens b·N..(b+1)·N of
        // the trace), so that each path's session does the same cascade work and the paths
        // differ only in how the tokens travel.
        for block in 0..a.blocks {
            for m in 0..modes.len() {
                // Alternate the order of modes from block to block (AB, BA, ...).
                let m = if block % 2 == 0 { m } else { modes.len() - 1 - m };
                let start_block = Instant::now();
                for i in 0..a.tokens {
                    let row = trace.row((block * a.tokens + i) % trace.rows);
                    let s = Instant::now();
                    match m {
                        0 => {
                            local.observe(row.to_vec()).await.unwrap();
                        }
                        1 => tcp_stream.observe(row).await,
                        2 => unix_stream.observe(row).await,
                        4 => tcp_stream.rejected(row).await,
                        5 => watched.observe(row).await,
                        _ => {
                            let item = pb::BatchItem {
                                session_id: batch_id,
                                hidden: Some(encode_f32(row)),
                                layers: Vec::new(),
                                text: None,
                            };
                            let r = tcp_client.observe_batch(pb::BatchRequest { items: vec![item] }).await.unwrap();
                            assert!(matches!(
                                r.get_ref().results[0].outcome,
                                Some(pb::token_result::Outcome::Report(_))
                            ));
                        }
                    }
                    samples[m].push(s.elapsed().as_secs_f64() * 1e6);
                }
                wall[m] += start_block.elapsed().as_secs_f64();
                counts[m] += a.tokens;
            }
        }
        let base_p50 = quantile(&mut samples[0].clone(), 0.5);
        let tcp_p50 = quantile(&mut samples[1].clone(), 0.5);
        out.push_str(&format!(
            "## One session, back-to-back tokens (D=2560 f32 on the wire, {} tokens × {} blocks per mode)\n\n",
            a.tokens, a.blocks
        ));
        out.push_str("| path | p50 µs | p95 µs | added p50 µs | tokens/s |\n|---|---:|---:|---:|---:|\n");
        for (m, name) in modes.iter().enumerate() {
            let p50 = quantile(&mut samples[m], 0.5);
            let p95 = quantile(&mut samples[m], 0.95);
            let added = match m {
                0 | 4 => "—".to_string(),
                _ => format!("{:+.0}", p50 - base_p50),
            };
            out.push_str(&format!("| {name} | {p50:.0} | {p95:.0} | {added} | {:.0} |\n", counts[m] as f64 / wall[m]));
        }
        // Every token of the watched session reached every viewer.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let want = VIEWERS * (32 + counts[5]);
        let got = seen.load(std::sync::atomic::Ordering::Relaxed);
        out.push_str(&format!(
            "\n{VIEWERS} viewers: {:+.0} µs p50 over the same stream without viewers; {got} of {want} events delivered\n",
            quantile(&mut samples[5].clone(), 0.5) - tcp_p50
        ));
        // What a token's publishing costs the session's task with 8 viewers (after its answer
        // is sent): one serialization and 8 queue sends of a real report.
        let log = probe_cascade_server::events::EventLog::new(256, VIEWERS);
        let mut queues: Vec<_> = (0..VIEWERS).map(|_| log.subscribe(None).unwrap()).collect();
        let report = local.observe(trace.row(0).to_vec()).await.unwrap();
        let mut publish_us = Vec::with_capacity(2000);
        let mut bytes = 0;
        for i in 0..2000 {
            let mut r = report.clone();
            r.index = i;
            let s = Instant::now();
            log.publish(&r, Some(" token"), pack.hierarchy());
            publish_us.push(s.elapsed().as_secs_f64() * 1e6);
            for q in &mut queues {
                while let Ok(e) = q.try_recv() {
                    bytes = e.data.len();
                }
            }
        }
        out.push_str(&format!(
            "publishing one token to {VIEWERS} viewers: {:.1} µs p50, {:.1} µs p95 ({bytes}-byte event, {} concepts)\n",
            quantile(&mut publish_us.clone(), 0.5),
            quantile(&mut publish_us, 0.95),
            report.top.len()
        ));
        local.close().await;

        // Throughput: N streams, each closed-loop (next token after its answer).
        out.push_str("\n## Concurrent client streams over TCP (closed loop, each stream its own session)\n\n");
        out.push_str(
            "| streams | tokens | tokens/s | p50 µs | p99 µs | mean step size |\n|---|---:|---:|---:|---:|---:|\n",
        );
        for streams in [1usize, 8, 32] {
            let per_stream = (a.tokens * 4 / streams).max(20);
            let before = runtime.step_stats().await.unwrap();
            let start = Instant::now();
            let mut tasks = Vec::new();
            for k in 0..streams {
                let mut client = tcp_client.clone();
                let trace = trace.clone();
                tasks.push(tokio::spawn(async move {
                    let mut s = open(&mut client).await;
                    let mut lat = Vec::with_capacity(per_stream);
                    for i in 0..per_stream {
                        let t0 = Instant::now();
                        s.observe(trace.row((k * 37 + i) % trace.rows)).await;
                        lat.push(t0.elapsed().as_secs_f64() * 1e6);
                    }
                    lat
                }));
            }
            let mut lat = Vec::new();
            for task in tasks {
                lat.extend(task.await.unwrap());
            }
            let secs = start.elapsed().as_secs_f64();
            let after = runtime.step_stats().await.unwrap();
            let steps = (after.steps - before.steps).max(1) as f64;
            let requests = (after.requests - before.requests) as f64;
            let n = lat.len();
            out.push_str(&format!(
                "| {streams} | {n} | {:.0} | {:.0} | {:.0} | {:.2} |\n",
                n as f64 / secs,
                quantile(&mut lat, 0.5),
                quantile(&mut lat, 0.99),
                requests / steps
            ));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    print!("{out}");
    if let Some(path) = a.out {
        std::fs::write(path, &out).unwrap();
    }
    server_rt.block_on(server.drain());
}
