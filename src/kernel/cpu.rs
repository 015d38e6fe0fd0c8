//! What CPU this is, for test output and benchmark reports: model, the features that matter
//! for scoring, and which kernel path runs.

use super::Isa;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CpuInfo {
    /// `model name` from /proc/cpuinfo (or "unknown").
    pub model: String,
    /// Of avx2, fma, avx512f, avx512bw, avx512_bf16, amx_tile: those present.
    pub features: Vec<&'static str>,
    /// Kernel paths this CPU can run, and the one chosen by default.
    pub paths: Vec<Isa>,
    pub default_path: Isa,
    pub logical_cpus: usize,
}

impl CpuInfo {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
        };
        let model = field("model name").unwrap_or_else(|| "unknown".into());
        let flags = field("flags").unwrap_or_default();
        let flags: Vec<&str> = flags.split_whitespace().collect();
        let features = ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile"]
            .into_iter()
            .filter(|f| flags.contains(f))
            .collect();
        Self {
            model,
            features,
            paths: Isa::available(),
            default_path: Isa::best(),
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl std::fmt::Display for CpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<&str> = self.paths.iter().map(|p| p.name()).collect();
        write!(
            f,
            "{} ({} logical CPUs; {}); kernel paths: {}; default: {}",
            self.model,
            self.logical_cpus,
            if self.features.is_empty() { "no AVX".to_string() } else { self.features.join(" ") },
            paths.join(", "),
            self.default_path
        )
    }
}
