//! `probe-cascade serve` as a process: flags from environment variables, SIGHUP rereading the
//! config (a bad file kept out, a fixed key refused by name in the log), SIGTERM draining
//! every hidden state in flight and exiting 0, and start-up errors that name the thing.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use probe_cascade::npy;
use probe_cascade_server::convert::encode_f32;
use probe_cascade_server::proto::v1 as pb;
use probe_cascade_server::proto::v1::probe_cascade_client::ProbeCascadeClient;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_probe-cascade"))
}

struct Fixture {
    dir: tempfile::TempDir,
    pack: PathBuf,
    trace: npy::Matrix,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("pack");
    let trace = dir.path().join("trace.npy");
    assert!(bin().args(["pack", "synth", "--preset", "tiny", "--out"]).arg(&pack).status().unwrap().success());
    let synth = bin().args(["trace", "synth", "--tokens", "50", "--pack"]).arg(&pack).arg("--out").arg(&trace).status();
    assert!(synth.unwrap().success());
    let trace = npy::read(&trace).unwrap();
    Fixture { dir, pack, trace }
}

fn realtime() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/realtime.toml")).unwrap()
}

struct Served {
    child: Child,
    grpc: String,
    http: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Starts `serve` with every setting in environment variables; waits for its `serving` line.
fn serve(f: &Fixture, config: &Path, token_file: &Path) -> Served {
    let mut child = bin()
        .arg("serve")
        .env("PROBE_CASCADE_PACK", &f.pack)
        .env("PROBE_CASCADE_CONFIG", config)
        .env("PROBE_CASCADE_LISTEN", "127.0.0.1:0")
        .env("PROBE_CASCADE_HTTP", "127.0.0.1:0")
        .env("PROBE_CASCADE_TOKEN_FILE", token_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
            .to_string()
    };
    let (grpc, http) = (field("grpc"), field("http"));
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut pipe = child.stderr.take().unwrap();
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    Served { child, grpc, http, stderr }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Waits until /metrics shows `sample` (up to 10 s).
fn wait_for_metric(addr: &str, sample: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if http_get(addr, "/metrics").lines().any(|l| l.starts_with(sample)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no {sample} in /metrics within 10 s:\n{}", http_get(addr, "/metrics"));
}

type Client = ProbeCascadeClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

async fn client(addr: &str) -> Client {
    let channel = tonic::transport::Endpoint::try_from(format!("http://{addr}")).unwrap().connect().await.unwrap();
    fn bearer(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", "Bearer tok-123".parse().unwrap());
        Ok(req)
    }
    ProbeCascadeClient::with_interceptor(channel, bearer as fn(_) -> _)
}

struct Stream {
    tx: tokio::sync::mpsc::Sender<pb::SessionRequest>,
    rx: tonic::Streaming<pb::SessionResponse>,
}

async fn open(client: &mut Client) -> Stream {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tx.send(pb::SessionRequest { kind: Some(pb::session_request::Kind::Open(Default::default())), text: None })
        .await
        .unwrap();
    let mut rx = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    rx.message().await.unwrap().unwrap();
    Stream { tx, rx }
}

impl Stream {
    async fn send(&self, row: &[f32]) {
        let msg = pb::SessionRequest { kind: Some(pb::session_request::Kind::Hidden(encode_f32(row))), text: None };
        self.tx.send(msg).await.unwrap();
    }

    async fn next(&mut self) -> Result<pb::TokenResult, tonic::Status> {
        match self.rx.message().await?.and_then(|m| m.kind) {
            Some(pb::session_response::Kind::Result(r)) => Ok(r),
            other => panic!("{other:?}"),
        }
    }

    async fn top_len(&mut self, row: &[f32]) -> usize {
        self.send(row).await;
        match self.next().await.unwrap().outcome {
            Some(pb::token_result::Outcome::Report(r)) => r.top.len(),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_config_and_sigterm_drains_what_is_in_flight() {
    let f = fixture();
    let config = f.dir.path().join("serve.toml");
    let token = f.dir.path().join("token");
    std::fs::write(&token, "tok-123\n").unwrap();
    let text = realtime().replace("report_top_k = 10", "report_top_k = 6");
    std::fs::write(&config, &text).unwrap();
    let mut served = serve(&f, &config, &token);
    let mut c = client(&served.grpc).await;
    let mut s = open(&mut c).await;
    let row = |t: usize| f.trace.row(t % f.trace.rows).to_vec();
    assert_eq!(s.top_len(&row(0)).await, 6);

    // A live key: applied from the next token.
    std::fs::write(&config, text.replace("report_top_k = 6", "report_top_k = 2")).unwrap();
    signal(&served.child, libc::SIGHUP);
    wait_for_metric(&served.http, "probe_cascade_config_reloads_total{result=\"applied\"} 1");
    assert_eq!(s.top_len(&row(1)).await, 2);
    // Not a config: kept out, and the log says why.
    std::fs::write(&config, "[cascade]\nreport_top_k = \"many\"\n").unwrap();
    signal(&served.child, libc::SIGHUP);
    wait_for_metric(&served.http, "probe_cascade_config_reloads_total{result=\"invalid\"} 1");
    assert_eq!(s.top_len(&row(2)).await, 2);
    // A key that cannot change live: refused, named in the log.
    std::fs::write(&config, text.replace("pool_slots = 512", "pool_slots = 600")).unwrap();
    signal(&served.child, libc::SIGHUP);
    wait_for_metric(&served.http, "probe_cascade_config_reloads_total{result=\"refused\"} 1");
    assert_eq!(s.top_len(&row(3)).await, 2);
    let log = served.stderr.lock().unwrap().clone();
    assert!(log.contains("serve.toml") && log.contains("report_top_k"), "{log}");
    assert!(log.contains("`runtime.pool_slots` cannot change while serving"), "{log}");

    // SIGTERM with hidden states in flight: each one read is answered, in order, then the
    // stream ends UNAVAILABLE and the process exits 0.
    for t in 0..40 {
        s.send(&row(t)).await;
    }
    let first = s.next().await.unwrap();
    signal(&served.child, libc::SIGTERM);
    let mut answered = vec![first.seq];
    let end = loop {
        match s.next().await {
            Ok(r) => {
                assert!(matches!(r.outcome, Some(pb::token_result::Outcome::Report(_))), "{r:?}");
                answered.push(r.seq);
            }
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end}");
    let want: Vec<u64> = (answered[0]..answered[0] + answered.len() as u64).collect();
    assert_eq!(answered, want, "answers in order, none skipped");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "serve did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}\n{}", served.stderr.lock().unwrap());
}

#[test]
fn start_up_errors_name_the_file_the_key_and_the_address() {
    let f = fixture();
    let bad = f.dir.path().join("bad.toml");
    std::fs::write(&bad, "[serve]\nstream_queue = 0\n").unwrap();
    let run = |args: &[&str]| {
        let out = bin().arg("serve").arg("--pack").arg(&f.pack).args(args).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["--config", bad.to_str().unwrap(), "--no-http", "--listen", "127.0.0.1:0"]);
    assert!(e.contains("bad.toml") && e.contains("serve.stream_queue"), "{e}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = run(&["--listen", &addr, "--no-http"]);
    assert!(e.contains(&addr) && e.contains("gRPC"), "{e}");
    let e = run(&["--token-file", "/nonexistent/token", "--no-http"]);
    assert!(e.contains("/nonexistent/token"), "{e}");
    let out = bin().args(["serve", "--pack", "/nonexistent/pack", "--no-http"]).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("/nonexistent/pack"), "{e}");
}

/// Connects, sends `request`, and resets the connection (SO_LINGER 0) without reading.
fn send_and_reset(addr: &str, request: &[u8]) {
    use std::os::fd::AsRawFd;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let _ = s.write_all(request);
}

/// Writing to a peer that has reset its connection must fail that write, not raise SIGPIPE
/// in the server (the command line gives other commands SIGPIPE's default action).
#[test]
fn peers_that_reset_their_connections_do_not_kill_the_server() {
    let f = fixture();
    let config = f.dir.path().join("serve.toml");
    std::fs::write(&config, realtime()).unwrap();
    let token = f.dir.path().join("token");
    std::fs::write(&token, "tok-123").unwrap();
    let mut served = serve(&f, &config, &token);
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    for i in 0..100 {
        send_and_reset(&served.grpc, preface);
        send_and_reset(&served.http, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n");
        // A plain close (FIN) too: the server's first write draws a reset, its next one EPIPE.
        let mut s = std::net::TcpStream::connect(&served.grpc).unwrap();
        let _ = s.write_all(preface);
        if i % 2 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(served.child.try_wait().unwrap().is_none(), "serve died: {}", served.stderr.lock().unwrap());
    assert!(http_get(&served.http, "/healthz").contains("200 OK"));
    signal(&served.child, libc::SIGTERM);
    assert!(served.child.wait().unwrap().success());
}
