//! Starting, serving, reloading and draining. `start` binds everything and returns a
//! [`Server`] (tests use it in-process); `run` adds the signals: SIGHUP rereads the config,
//! SIGTERM or SIGINT drains and returns.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use probe_cascade::pack::Pack;
use probe_cascade::runtime::Runtime;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::service::Routes;

use crate::auth::BearerToken;
use crate::proto::v1 as pb;
use crate::proto::v1::probe_cascade_server::ProbeCascadeServer;
use crate::service::Service;
use crate::state::{Live, ReloadOutcome, State};
use crate::ServeError;

/// Where to serve, and what.
#[derive(Clone)]
pub struct ServeOptions {
    pub pack: PathBuf,
    /// The config file (reread on SIGHUP); None: the defaults, and nothing to reload.
    pub config: Option<PathBuf>,
    /// gRPC over TCP. With neither this nor `unix`, 127.0.0.1:50051.
    pub listen: Option<SocketAddr>,
    /// gRPC over a Unix socket.
    pub unix: Option<PathBuf>,
    /// HTTP (metrics, health, views); None: none.
    pub http: Option<SocketAddr>,
    pub token: BearerToken,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// A running server.
pub struct Server {
    state: Arc<State>,
    grpc_addr: Option<SocketAddr>,
    unix: Option<PathBuf>,
    http_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<(), ServeError>>>,
    health: tonic_health::server::HealthReporter,
}

/// What a drain did.
#[derive(Debug)]
pub struct Drained {
    /// Everything in flight was answered within `serve.drain_grace_ms`.
    pub in_time: bool,
    pub elapsed: Duration,
}

fn bind_error(what: &'static str, addr: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ServeError {
    move |source| ServeError::Bind { what, addr: addr.to_string(), source }
}

/// Opens the pack, starts the runtime, binds every listener and starts serving.
pub async fn start(options: ServeOptions) -> Result<Server, ServeError> {
    let live = match &options.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| probe_cascade::config::ConfigError::Io { path: path.clone(), source })?;
            Live::parse(&text, path)?
        }
        None => Live::parse("", Path::new("(defaults)"))?,
    };
    let pack = Pack::open(&options.pack).map_err(|source| ServeError::Pack { path: options.pack.clone(), source })?;
    let runtime = Runtime::start(Arc::new(pack), &live.config).await?;
    let limit = live.config.serve.max_message_bytes;
    let state = Arc::new(State::new(runtime, live, options.config.clone()));
    crate::metrics::handle().map_err(ServeError::Setup)?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ProbeCascadeServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Setup(format!("gRPC reflection: {e}")))?;
    let service = ProbeCascadeServer::new(Service { state: state.clone() })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let token = options.token.clone();
    let service = tonic::service::interceptor::InterceptedService::new(service, move |req: tonic::Request<()>| {
        match token.check(req.metadata().get("authorization").map(|v| v.as_bytes())) {
            Ok(()) => Ok(req),
            Err(why) => {
                crate::metrics::error("unauthenticated");
                Err(tonic::Status::unauthenticated(why))
            }
        }
    });
    let routes = Routes::new(service).add_service(health_service).add_service(reflection);

    let (stop, _) = watch::channel(false);
    let stopped = |stop: &watch::Sender<bool>| {
        let mut rx = stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = Vec::new();
    let listen = match (&options.listen, &options.unix) {
        (None, None) => Some(DEFAULT_LISTEN.parse().expect("a socket address")),
        (l, _) => *l,
    };
    let mut grpc_addr = None;
    if let Some(addr) = listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_error("gRPC on", addr))?;
        grpc_addr = Some(listener.local_addr().map_err(bind_error("gRPC on", addr))?);
        // No Nagle: a report is one small write that must leave at once (with Nagle and the
        // peer's delayed ACK, a unary answer waited 40 ms). The builder's `tcp_nodelay` only
        // applies to listeners it binds itself.
        let incoming = TcpListenerStream::new(listener).map(|conn| {
            conn.inspect(|c| {
                let _ = c.set_nodelay(true);
            })
        });
        tasks.push(spawn_grpc(incoming, routes.clone(), limit, stopped(&stop)));
    }
    if let Some(path) = &options.unix {
        remove_stale_socket(path)?;
        let listener =
            tokio::net::UnixListener::bind(path).map_err(bind_error("gRPC on the Unix socket", path.display()))?;
        tasks.push(spawn_grpc(UnixListenerStream::new(listener), routes.clone(), limit, stopped(&stop)));
    }
    let mut http_addr = None;
    if let Some(addr) = options.http {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_error("HTTP on", addr))?;
        http_addr = Some(listener.local_addr().map_err(bind_error("HTTP on", addr))?);
        let app = crate::http::router(state.clone(), options.token.clone());
        let shutdown = stopped(&stop);
        tasks.push(tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(|e| ServeError::Setup(format!("the HTTP server failed: {e}")))
        }));
    }
    for addr in [grpc_addr, http_addr].into_iter().flatten() {
        if !addr.ip().is_loopback() && !options.token.is_set() {
            tracing::warn!("serving on {addr}, beyond loopback, without a bearer token (--token-file)");
        }
    }
    tasks.push(tokio::spawn(reap_idle_sessions(state.clone(), stopped(&stop))));
    tasks.push(tokio::spawn(tick_deadlines(state.clone(), stopped(&stop))));
    Ok(Server { state, grpc_addr, unix: options.unix.clone(), http_addr, stop, tasks, health })
}

/// Serves the gRPC routes on one listener (TCP or Unix) until `shutdown`.
fn spawn_grpc<I, IO, IE>(
    incoming: I,
    routes: Routes,
    limit: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<Result<(), ServeError>>
where
    I: futures::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let server = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(name_the_size_limit(limit)))
        .add_routes(routes);
    tokio::spawn(async move { server.serve_with_incoming_shutdown(incoming, shutdown).await.map_err(ServeError::from) })
}

/// tonic refuses an oversized request itself, before any handler, with OUT_OF_RANGE and a
/// message that gives the byte limit but not its key. This rewrites that refusal (a
/// headers-only response) into RESOURCE_EXHAUSTED naming `serve.max_message_bytes`, as every
/// other limit is named; streams map the same error themselves (service.rs).
fn name_the_size_limit<B>(limit: usize) -> impl Fn(http::Response<B>) -> http::Response<B> + Clone {
    move |mut response| {
        let headers = response.headers_mut();
        let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
            && headers.get("grpc-message").is_some_and(|m| {
                String::from_utf8_lossy(m.as_bytes()).replace("%20", " ").contains("message length too large")
            });
        if too_large {
            let found = String::from_utf8_lossy(headers["grpc-message"].as_bytes()).replace("%20", " ");
            let message = format!("serve.max_message_bytes = {limit}: {found}").replace('%', "%25");
            if let Ok(value) = http::HeaderValue::from_str(&message) {
                headers.insert("grpc-status", http::HeaderValue::from_static("8"));
                headers.insert("grpc-message", value);
            }
        }
        response
    }
}

/// A socket file left by an earlier run is removed; any other file at the path is an error.
fn remove_stale_socket(path: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(bind_error("removing", path.display()))
        }
        Ok(_) => Err(ServeError::Setup(format!("--unix {}: the path exists and is not a socket", path.display()))),
        Err(_) => Ok(()),
    }
}

/// Closes `OpenSession` sessions idle for longer than `serve.idle_session_ms`.
async fn reap_idle_sessions(state: Arc<State>, stop: impl std::future::Future<Output = ()>) -> Result<(), ServeError> {
    tokio::pin!(stop);
    loop {
        let period = Duration::from_millis((state.live().config.serve.idle_session_ms / 4).clamp(10, 1000));
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(period) => {}
        }
        for id in state.idle_sessions() {
            tracing::info!("{id}: closed after serve.idle_session_ms without a call");
            state.close(id, None).await;
        }
    }
}

/// The one timer behind every token's deadline and every held viewer event (see `State::ticks`).
async fn tick_deadlines(state: Arc<State>, stop: impl std::future::Future<Output = ()>) -> Result<(), ServeError> {
    tokio::pin!(stop);
    let mut interval = tokio::time::interval(crate::state::TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = interval.tick() => {
                state.ticks.notify_waiters();
                state.release_held_events();
            }
        }
    }
}

impl Server {
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_deref()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    pub async fn reload(&self) -> ReloadOutcome {
        self.state.reload().await
    }

    /// Drains: no new sessions or calls; every stream answers the hidden states it has read
    /// and closes with UNAVAILABLE; calls in flight finish; then every session closes, the
    /// listeners stop and the runtime shuts down. Gives up waiting after `serve.drain_grace_ms`.
    pub async fn drain(self) -> Drained {
        let started = std::time::Instant::now();
        let grace = Duration::from_millis(self.state.live().config.serve.drain_grace_ms);
        self.state.start_drain();
        self.health.set_not_serving::<ProbeCascadeServer<Service>>().await;
        let in_time = tokio::time::timeout(grace, self.state.idle()).await.is_ok();
        if !in_time {
            tracing::warn!("drain: work still in flight after serve.drain_grace_ms = {}; stopping", grace.as_millis());
        }
        self.state.close_all().await;
        let _ = self.stop.send(true);
        let left = grace.saturating_sub(started.elapsed()).max(Duration::from_millis(100));
        for task in self.tasks {
            match tokio::time::timeout(left, task).await {
                Ok(Ok(Err(e))) => tracing::error!("drain: {e}"),
                Ok(_) => {}
                Err(_) => tracing::warn!("drain: a listener did not stop in time"),
            }
        }
        self.state.runtime.shutdown().await;
        if let Some(path) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
        Drained { in_time, elapsed: started.elapsed() }
    }
}

/// Serves until SIGTERM or SIGINT, then drains. SIGHUP rereads the config file. Prints one
/// line, `serving grpc=… unix=… http=…`, to stdout once every listener is bound.
pub async fn run(options: ServeOptions) -> Result<Drained, ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let signal = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| ServeError::Setup(format!("installing the {name} handler: {e}")))
    };
    let (mut hup, mut term, mut int) = (
        signal(SignalKind::hangup(), "SIGHUP")?,
        signal(SignalKind::terminate(), "SIGTERM")?,
        signal(SignalKind::interrupt(), "SIGINT")?,
    );
    let server = start(options).await?;
    let show = |a: Option<String>| a.unwrap_or_else(|| "-".into());
    // Not println!: with stdout gone (a closed pipe) that would panic; the server goes on.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "serving grpc={} unix={} http={}",
        show(server.grpc_addr().map(|a| a.to_string())),
        show(server.unix_path().map(|p| p.display().to_string())),
        show(server.http_addr().map(|a| a.to_string())),
    );
    let _ = out.flush();
    drop(out);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let outcome = server.reload().await;
                tracing::debug!(?outcome, "SIGHUP");
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("draining");
    let drained = server.drain().await;
    tracing::info!("drained in {:?} (everything answered: {})", drained.elapsed, drained.in_time);
    Ok(drained)
}
