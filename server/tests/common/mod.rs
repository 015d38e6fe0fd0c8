#![allow(dead_code)]
//! Shared by the service's tests: a small real pack with traces, a server on a loopback port
//! or a Unix socket, and gRPC clients for both.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use probe_cascade::engine::TokenReport;
use probe_cascade::npy::Matrix;
use probe_cascade::pack::{DType, Pack};
use probe_cascade::synth::{concept_geometry, synth_trace, write_synth_pack, SynthParams, TraceParams};
use probe_cascade_server::auth::BearerToken;
use probe_cascade_server::proto::v1 as pb;
use probe_cascade_server::proto::v1::probe_cascade_client::ProbeCascadeClient;
use probe_cascade_server::{ServeOptions, Server};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

pub const TOKENS: usize = 40;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub pack: Arc<Pack>,
    pub traces: Vec<Matrix>,
}

impl Fixture {
    pub fn pack_dir(&self) -> PathBuf {
        self.dir.path().join("pack")
    }

    /// Writes `text` as the config file and returns its path.
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pack_dir = dir.path().join("pack");
    let params = SynthParams { concepts: 300, hidden_dim: 128, dtype: DType::Bf16, ..SynthParams::demo() };
    write_synth_pack(&pack_dir, &params, |_| {}).unwrap();
    let pack = Arc::new(Pack::open(&pack_dir).unwrap());
    let geometry = concept_geometry(&pack, |_| {}).unwrap();
    let traces = (0..4)
        .map(|seed| {
            let base = if seed % 2 == 0 { TraceParams::default() } else { TraceParams::busy() };
            synth_trace(&pack, &geometry, &TraceParams { tokens: TOKENS, seed, ..base })
        })
        .collect();
    Fixture { dir, pack, traces }
}

/// The realtime preset, with `extra` TOML appended.
pub fn realtime(extra: &str) -> String {
    let base = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/realtime.toml")).unwrap();
    format!("{base}\n{extra}")
}

/// A server for the fixture's pack on a loopback port (and a Unix socket, if asked), with
/// `config` as its file.
pub async fn serve(f: &Fixture, config: &str, unix: bool, token: Option<&str>) -> Server {
    let options = ServeOptions {
        pack: f.pack_dir(),
        config: Some(f.config(config)),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: unix.then(|| f.dir.path().join("serve.sock")),
        http: Some("127.0.0.1:0".parse().unwrap()),
        token: token.map(|t| BearerToken::new(t).unwrap()).unwrap_or_default(),
    };
    probe_cascade_server::start(options).await.unwrap()
}

pub async fn tcp_client(server: &Server) -> ProbeCascadeClient<Channel> {
    let url = format!("http://{}", server.grpc_addr().unwrap());
    ProbeCascadeClient::connect(url).await.unwrap()
}

pub async fn unix_client(path: &Path) -> ProbeCascadeClient<Channel> {
    let path = path.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .unwrap();
    ProbeCascadeClient::new(channel)
}

/// A session stream: send hidden states on `tx`, read answers from `rx`.
pub struct Stream {
    pub tx: mpsc::Sender<pb::SessionRequest>,
    pub rx: tonic::Streaming<pb::SessionResponse>,
    pub id: u64,
}

pub fn open_msg(options: pb::SessionOptions) -> pb::SessionRequest {
    pb::SessionRequest { kind: Some(pb::session_request::Kind::Open(options)), text: None }
}

pub fn hidden_msg(h: pb::HiddenState) -> pb::SessionRequest {
    pb::SessionRequest { kind: Some(pb::session_request::Kind::Hidden(h)), text: None }
}

pub async fn try_open(
    client: &mut ProbeCascadeClient<Channel>,
    options: pb::SessionOptions,
) -> Result<Stream, tonic::Status> {
    let (tx, rx) = mpsc::channel(1024);
    tx.send(open_msg(options)).await.unwrap();
    let mut rx = client.session(ReceiverStream::new(rx)).await?.into_inner();
    match rx.message().await?.and_then(|m| m.kind) {
        Some(pb::session_response::Kind::Opened(o)) => Ok(Stream { tx, rx, id: o.session_id }),
        other => panic!("expected `opened`, got {other:?}"),
    }
}

pub async fn open(client: &mut ProbeCascadeClient<Channel>, options: pb::SessionOptions) -> Stream {
    try_open(client, options).await.unwrap()
}

impl Stream {
    pub async fn send(&self, h: pb::HiddenState) {
        self.tx.send(hidden_msg(h)).await.unwrap();
    }

    /// The next answer (panics on a stream error or end).
    pub async fn result(&mut self) -> pb::TokenResult {
        match self.rx.message().await.unwrap().and_then(|m| m.kind) {
            Some(pb::session_response::Kind::Result(r)) => r,
            other => panic!("expected a result, got {other:?}"),
        }
    }
}

pub fn report(r: &pb::TokenResult) -> &pb::Report {
    match &r.outcome {
        Some(pb::token_result::Outcome::Report(rep)) => rep,
        other => panic!("token {}: expected a report, got {other:?}", r.seq),
    }
}

pub fn error(r: &pb::TokenResult) -> &pb::Error {
    match &r.outcome {
        Some(pb::token_result::Outcome::Error(e)) => e,
        other => panic!("token {}: expected an error, got {other:?}", r.seq),
    }
}

/// What must match bit for bit: the top list (concept, logit bits) and the counts.
pub type Outcome = (Vec<(u32, u32)>, [u32; 6]);

pub fn wire_outcome(r: &pb::Report) -> Outcome {
    let top = r.top.iter().map(|d| (d.concept_id, d.logit.to_bits())).collect();
    (top, [r.children, r.loaded, r.unloaded, r.skipped_by_cap, r.scored, r.active])
}

pub fn local_outcome(r: &TokenReport) -> Outcome {
    let top = r.top.iter().map(|e| (e.id.0, e.logit.to_bits())).collect();
    let c = |n: usize| n as u32;
    (top, [c(r.children), c(r.loaded), c(r.unloaded), c(r.skipped_by_cap), c(r.scored), c(r.active)])
}

/// The HTTP port's `path`, as (status, body).
pub async fn http_get(server: &Server, path: &str, bearer: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.http_addr().unwrap()).await.unwrap();
    let auth = bearer.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{auth}connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, dechunk(&body))
}

/// A chunked HTTP/1.1 body, joined (axum chunks bodies of unknown length).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    if out.is_empty() {
        body.to_string()
    } else {
        out
    }
}
