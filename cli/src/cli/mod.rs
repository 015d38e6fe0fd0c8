//! Command-line front end. Library errors become anyhow reports here, and only here.

mod bench;
mod engines;
mod measure;
mod pack;
mod parquet;
mod plot;
mod progress;
mod run;
mod serve;
mod soak;
mod trace;
mod tune;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "probe-cascade", version, about = "Cascades of concept probes over an LLM's hidden states")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make, inspect and verify probe packs.
    #[command(subcommand)]
    Pack(pack::PackCommand),
    /// Make hidden-state traces.
    #[command(subcommand)]
    Trace(trace::TraceCommand),
    /// Run the cascade over a trace and print a line per token; or over many recordings, each a
    /// session, into a Parquet dataset (--traces DIR_OR_GLOB --parquet OUT_DIR).
    Run(run::RunArgs),
    /// Run every engine on the same pack and trace; write bench.md and bench.json.
    Bench(bench::BenchArgs),
    /// Sweep a grid of configs on a trace: latency against what each misses (vs the exhaustive
    /// oracle), a Pareto plot, and the config an objective picks.
    Tune(tune::TuneArgs),
    /// Many sessions on one runtime for a long run, sampling memory, descriptors, threads and
    /// cache and slot occupancy: soak.csv, soak.md and a plot.
    Soak(soak::SoakArgs),
    /// Serve sessions over gRPC (TCP or a Unix socket), with metrics and health over HTTP.
    Serve(serve::ServeArgs),
    /// This CPU's model and features, and the CPU kernel paths it can run.
    Cpu,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Like other Unix tools, end quietly when the reader of stdout goes away (`| head`):
    // Rust ignores SIGPIPE, and `println!` would then panic on the broken pipe. Not `serve`:
    // there a write to a socket whose peer has gone must fail that write (EPIPE), not kill
    // the server.
    if !matches!(cli.command, Command::Serve(_)) {
        // SAFETY: restoring the default disposition of a signal, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_tracing();
    let result = match cli.command {
        Command::Pack(cmd) => pack::run(cmd),
        Command::Trace(cmd) => trace::run(cmd),
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Tune(args) => tune::run(args),
        Command::Soak(args) => soak::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Cpu => {
            println!("cpu: {}", probe_cascade::kernel::CpuInfo::detect());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, joined by ": ", leaving out a cause whose text is already there:
/// the library's errors name their source in their own message where a caller that prints only
/// the top (Python, gRPC) needs it, and the chain would say it twice.
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

/// Quiet by default: INFO carries only start/finish lines; RUST_LOG=debug shows per-stage spans.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
