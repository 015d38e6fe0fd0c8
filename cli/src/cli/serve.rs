//! `probe-cascade serve`: the network service (probe-cascade-server). Every flag has an
//! environment-variable twin, as TGI's and TEI's launchers do.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use probe_cascade_server::auth::BearerToken;
use probe_cascade_server::ServeOptions;

#[derive(Args)]
pub struct ServeArgs {
    /// The probe pack to serve.
    #[arg(long, env = "PROBE_CASCADE_PACK")]
    pack: PathBuf,
    /// The config file; reread on SIGHUP. Without one, the defaults (and nothing to reload).
    #[arg(long, env = "PROBE_CASCADE_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC over TCP (default 127.0.0.1:50051 when --unix is not given either). Port 0 picks one.
    #[arg(long, env = "PROBE_CASCADE_LISTEN")]
    listen: Option<SocketAddr>,
    /// gRPC over a Unix socket at this path.
    #[arg(long, env = "PROBE_CASCADE_UNIX")]
    unix: Option<PathBuf>,
    /// HTTP for /metrics, /healthz, /readyz, /v1/pack and /v1/sessions.
    #[arg(long, env = "PROBE_CASCADE_HTTP", default_value = "127.0.0.1:9464")]
    http: SocketAddr,
    /// No HTTP port.
    #[arg(long, env = "PROBE_CASCADE_NO_HTTP", conflicts_with = "http")]
    no_http: bool,
    /// Require `authorization: Bearer <token>`, with the token read from this file.
    #[arg(long, env = "PROBE_CASCADE_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The bearer token itself (prefer --token-file: a flag shows in `ps`).
    #[arg(long, env = "PROBE_CASCADE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let token = match (&args.token_file, &args.token) {
        (Some(path), _) => BearerToken::from_file(path)?,
        (None, Some(t)) => BearerToken::new(t).map_err(|e| anyhow::anyhow!("--token / PROBE_CASCADE_TOKEN: {e}"))?,
        (None, None) => BearerToken::none(),
    };
    let options = ServeOptions {
        pack: args.pack,
        config: args.config,
        listen: args.listen,
        unix: args.unix,
        http: (!args.no_http).then_some(args.http),
        token,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("probe-cascade-serve")
        .enable_all()
        .build()
        .context("starting tokio")?;
    let drained = rt.block_on(probe_cascade_server::run(options))?;
    if !drained.in_time {
        eprintln!("serve: the drain grace time ran out with work in flight");
    }
    Ok(ExitCode::SUCCESS)
}
