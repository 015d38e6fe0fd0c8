use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use probe_cascade::pack::Pack;
use probe_cascade::synth::{concept_geometry, synth_trace, TraceParams};

use super::progress::bar;

#[derive(Subcommand)]
pub enum TraceCommand {
    /// Write a synthetic T×D float32 .npy trace of hidden states for a pack.
    Synth {
        #[arg(long)]
        pack: PathBuf,
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// `demo` (a calm trace: a few children per token) or `busy` (about as many children
        /// per token as the seed's own table, with bursts).
        #[arg(long, value_enum, default_value = "demo")]
        preset: TracePreset,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TracePreset {
    Demo,
    Busy,
}

pub fn run(cmd: TraceCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TraceCommand::Synth { pack, tokens, out, seed, preset } => {
            let pack = Pack::open(&pack).context("opening the pack")?;
            let progress = bar(pack.len(), "geometry");
            let geometry = concept_geometry(&pack, |n| progress.set_position(n as u64))?;
            progress.finish_and_clear();
            let base = match preset {
                TracePreset::Demo => TraceParams::default(),
                TracePreset::Busy => TraceParams::busy(),
            };
            let params = TraceParams { tokens, seed, ..base };
            let trace = synth_trace(&pack, &geometry, &params);
            probe_cascade::npy::write(&out, &trace)?;
            let unreachable = geometry.iter().filter(|g| g.firing_strength.is_none()).count();
            println!(
                "wrote {} ({} tokens × D={}){}",
                out.display(),
                trace.rows,
                trace.cols,
                if unreachable > 0 {
                    format!("; {unreachable} concepts never fire and are left out")
                } else {
                    String::new()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
