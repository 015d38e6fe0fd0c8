use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;
use probe_cascade::import::headspace::import_headspace;
use probe_cascade::import::{import_hatcat, ImportOptions, Phase};
use probe_cascade::pack::{ConceptId, DType, Pack, ProbeId};
use probe_cascade::synth::{write_synth_pack, SynthParams};

use super::progress::bar;

#[derive(Subcommand)]
pub enum PackCommand {
    /// Write a deterministic synthetic pack (same seed, byte-identical files).
    Synth {
        /// `demo` (~1,000 concepts, 14 roots, 5 layers, D=2560, bf16) or `tiny` (for tests).
        #[arg(long, default_value = "demo")]
        preset: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Number of concepts.
        #[arg(long)]
        concepts: Option<usize>,
        /// Number of root (layer 0) concepts.
        #[arg(long)]
        roots: Option<usize>,
        /// Number of layers.
        #[arg(long)]
        layers: Option<usize>,
        /// Mean children per parent (default: whatever fills the layers).
        #[arg(long)]
        branching: Option<f64>,
        /// Hidden-state width D.
        #[arg(long)]
        dim: Option<usize>,
        /// f32 or bf16.
        #[arg(long)]
        dtype: Option<DType>,
        /// Probes per shard file.
        #[arg(long)]
        probes_per_shard: Option<usize>,
    },
    /// Print concepts per layer, branching, bytes and dtype.
    Inspect { dir: PathBuf },
    /// Check every probe's checksum, shape and values; exit non-zero on any defect.
    Verify { dir: PathBuf },
    /// Import a headspace lens pack as it is on disk (layer{N}/<Concept>@L<m>.pt and
    /// <Concept>.pt probe files, probe_calibration.json, the bundled hierarchy/) into a v2 pack
    /// of lenses; every probe is checked to score like the original (docs/headspace.md).
    ImportHeadspace {
        /// The headspace pack's directory.
        dir: PathBuf,
        /// The new pack's directory.
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the pack: f32 keeps every source exactly, bf16 halves the bytes.
        #[arg(long, default_value = "f32")]
        dtype: DType,
        /// Probes per shard file.
        #[arg(long, default_value_t = 256)]
        probes_per_shard: usize,
    },
    /// Import a HatCat pack (layer{N}.json hierarchy files and torch.save probe files) without
    /// Python; every probe is checked to score like the original before the pack is written.
    ImportHatcat {
        /// Directory of layer{N}.json files (and an optional hierarchy.json).
        hierarchy_dir: PathBuf,
        /// Directory of probe files: layer{N}/{Name}.pt, layer{N}/{Name}_classifier.pt or
        /// {Name}_classifier.pt.
        lenses_dir: PathBuf,
        /// The new pack's directory.
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the pack: f32 keeps every source exactly, bf16 halves the bytes.
        #[arg(long, default_value = "f32")]
        dtype: DType,
        /// Import the good probes and list the bad ones instead of stopping at the first.
        #[arg(long)]
        skip_bad: bool,
        /// Probes per shard file.
        #[arg(long, default_value_t = 256)]
        probes_per_shard: usize,
    },
}

pub fn run(cmd: PackCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PackCommand::Synth { preset, out, seed, concepts, roots, layers, branching, dim, dtype, probes_per_shard } => {
            let Some(mut p) = SynthParams::preset(&preset) else {
                bail!("unknown preset `{preset}` (expected demo or tiny)");
            };
            p.seed = seed;
            p.concepts = concepts.unwrap_or(p.concepts);
            p.roots = roots.unwrap_or(p.roots);
            p.layers = layers.unwrap_or(p.layers);
            p.branching = branching.or(p.branching);
            p.hidden_dim = dim.unwrap_or(p.hidden_dim);
            p.dtype = dtype.unwrap_or(p.dtype);
            p.probes_per_shard = probes_per_shard.unwrap_or(p.probes_per_shard);
            if p.concepts == 0 || p.hidden_dim == 0 || p.roots == 0 || p.layers == 0 {
                bail!("--concepts, --roots, --layers and --dim must all be at least 1");
            }
            if p.branching.is_some_and(|b| !(b.is_finite() && b > 0.0)) {
                bail!("--branching must be a positive number");
            }
            let progress = bar(p.concepts, "synth");
            let manifest = write_synth_pack(&out, &p, |n| progress.set_position(n as u64))
                .with_context(|| format!("writing the pack to {}", out.display()))?;
            progress.finish_and_clear();
            println!(
                "wrote {}: {} concepts, D={}, {}, {} shards",
                out.display(),
                manifest.concepts.len(),
                manifest.hidden_dim,
                manifest.dtype,
                manifest.shards.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        PackCommand::ImportHatcat { hierarchy_dir, lenses_dir, out, dtype, skip_bad, probes_per_shard } => {
            let options = ImportOptions { dtype, skip_bad, probes_per_shard: probes_per_shard.max(1) };
            let progress = bar(0, "check");
            let summary = import_hatcat(&hierarchy_dir, &lenses_dir, &out, &options, import_progress(&progress));
            progress.finish_and_clear();
            println!("{}", summary.with_context(|| format!("importing {}", hierarchy_dir.display()))?);
            Ok(ExitCode::SUCCESS)
        }
        PackCommand::ImportHeadspace { dir, out, dtype, probes_per_shard } => {
            let options = ImportOptions { dtype, skip_bad: false, probes_per_shard: probes_per_shard.max(1) };
            let progress = bar(0, "check");
            let summary = import_headspace(&dir, &out, &options, import_progress(&progress));
            progress.finish_and_clear();
            println!("{}", summary.with_context(|| format!("importing {}", dir.display()))?);
            Ok(ExitCode::SUCCESS)
        }
        PackCommand::Inspect { dir } => {
            let pack = Pack::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
            inspect(&pack);
            Ok(ExitCode::SUCCESS)
        }
        PackCommand::Verify { dir } => {
            let pack = Pack::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
            let progress = bar(pack.probe_count(), "verify");
            let defects = pack.verify(|n| progress.set_position(n as u64));
            progress.finish_and_clear();
            if defects.is_empty() {
                println!(
                    "{}: {} probes verified (checksums, shapes, finite values)",
                    dir.display(),
                    pack.probe_count()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                for d in &defects {
                    println!("defect: {d}");
                }
                println!("{}: {} of {} probes are defective", dir.display(), defects.len(), pack.len());
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

fn inspect(pack: &Pack) {
    let h = pack.hierarchy();
    let layout = pack.layout();
    println!("pack       {}", pack.dir().display());
    println!("concepts   {}", pack.len());
    println!("hidden_dim {}", pack.hidden_dim());
    println!("dtype      {}", pack.dtype());
    println!("input norm {:?}", pack.input_normalization());
    println!("format     v{}", pack.format_version());
    if pack.format_version() > 1 {
        let calibrated = (0..pack.probe_count() as u32).filter(|&p| pack.quantiles(ProbeId(p)).is_some()).count();
        println!(
            "lenses     {} probes over model layers {:?}, {calibrated} calibrated",
            pack.probe_count(),
            pack.model_layers()
        );
        for simplex in pack.simplexes() {
            let poles: Vec<&str> = simplex.poles.iter().map(|(p, _)| p.as_str()).collect();
            let layer = simplex.poles.first().map_or(0, |(_, id)| pack.probe(*id).model_layer);
            println!("simplex    {} (always on): poles {}, model layer {layer}", simplex.name, poles.join(", "));
        }
        if pack.concept_calibrated() {
            println!(
                "reported   through concept calibration: {} of {} lenses have statistics, the others report 0.5",
                pack.concept_calibration_count(),
                pack.len()
            );
        }
    }
    println!(
        "bytes      {} per probe, {:.1} MB in all, {} shards",
        layout.byte_len(),
        (layout.byte_len() * pack.probe_count()) as f64 / 1e6,
        pack.shards().len()
    );
    let multi_parent = h.ids().filter(|&id| h.parents(id).len() > 1).count();
    println!("dag        {multi_parent} concepts with several parents");
    println!("layer  concepts  parents  children/parent (mean, max)  leaves");
    for layer in 0..h.layer_count() as u16 {
        let members = h.layer_members(layer);
        let kids: Vec<usize> = members.iter().map(|&c| h.children(ConceptId(c)).len()).collect();
        let parents = kids.iter().filter(|&&k| k > 0).count();
        let mean = if parents == 0 { 0.0 } else { kids.iter().sum::<usize>() as f64 / parents as f64 };
        println!(
            "{layer:>5}  {:>8}  {:>7}  {:>14.2} {:>5}  {:>13}",
            members.len(),
            parents,
            mean,
            kids.iter().max().unwrap_or(&0),
            kids.len() - parents
        );
    }
}

/// An import's progress on `progress`: which pass, and how far.
fn import_progress(progress: &indicatif::ProgressBar) -> impl FnMut(Phase, usize, usize) + '_ {
    move |phase, done, total| {
        let what = match phase {
            Phase::Checking => "check",
            Phase::Writing => "write",
        };
        if progress.message() != what {
            progress.set_message(what);
        }
        progress.set_length(total as u64);
        progress.set_position(done as u64);
    }
}
