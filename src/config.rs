//! Configuration files (TOML). Every knob of the cascade, the device and the runtime lives
//! here; unknown keys, wrong types and out-of-range values are errors naming the key and file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::pack::{DType, InputNormalization};
use crate::types::ReaderKind;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{key}` {message}")]
    Invalid { path: PathBuf, key: &'static str, message: String },
    /// The config is valid on its own but does not fit the pack (the message names the key).
    #[error("{message}")]
    AgainstPack { key: &'static str, message: String },
}

/// A value that does not fit its key, found in a JSON document (a dict config, session
/// overrides): names the key's full path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{key}`: {message}")]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

/// Deserializes `value`, found at `root` (`""` for a whole config), naming the full key path
/// of what is wrong.
pub fn from_json<T: serde::de::DeserializeOwned>(value: &serde_json::Value, root: &str) -> Result<T, KeyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let key = match (root, path.as_str()) {
            (_, ".") => root.to_string(),
            ("", _) => path,
            _ => format!("{root}.{path}"),
        };
        KeyError { key, message: e.inner().to_string() }
    })
}

/// The `[cascade]` table of the config document `raw` with its top-level keys replaced by
/// `overrides` (a session's options), checked.
pub fn cascade_with(
    raw: &serde_json::Value,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<CascadeConfig, KeyError> {
    let mut cascade = raw.get("cascade").cloned().unwrap_or_else(|| serde_json::Value::Object(Default::default()));
    let table =
        cascade.as_object_mut().ok_or_else(|| KeyError { key: "cascade".into(), message: "must be a table".into() })?;
    for (k, v) in overrides {
        table.insert(k.clone(), v.clone());
    }
    from_json(&cascade, "cascade")
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub cascade: CascadeConfig,
    #[serde(default)]
    pub device: DeviceConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// `probe-cascade serve`'s limits; ignored in-process.
    #[serde(default)]
    pub serve: ServeConfig,
}

/// The network service's limits and lifecycle (docs/serving.md). Every refusal names its key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// The largest gRPC message accepted, in bytes (a D=2560 f32 hidden state is 10 KB).
    pub max_message_bytes: usize,
    /// Hidden states one stream may have unanswered; beyond it a token is refused.
    pub stream_queue: usize,
    /// A token not answered within this many ms gets a deadline error (0: no deadline).
    pub request_deadline_ms: u64,
    /// Items in one `ObserveBatch` call.
    pub max_batch_items: usize,
    /// A session opened by `OpenSession` is closed after this many ms without a call.
    pub idle_session_ms: u64,
    /// On SIGTERM/SIGINT: how long queued work may take before the server exits anyway.
    pub drain_grace_ms: u64,
    /// Live-view events (`GET /v1/sessions/{id}/events`): how many a session keeps for viewers
    /// that reconnect, and how many a viewer may fall behind before it is dropped.
    pub viewer_buffer: usize,
    /// Live-view viewers one session may have at once; one more is refused (429).
    pub max_viewers: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 << 20,
            stream_queue: 64,
            request_deadline_ms: 30_000,
            max_batch_items: 1024,
            idle_session_ms: 300_000,
            drain_grace_ms: 10_000,
            viewer_buffer: 256,
            max_viewers: 32,
        }
    }
}

/// The per-token algorithm (docs/cascade-semantics.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CascadeConfig {
    /// Layers whose probes are always active.
    pub base_layers: Vec<u16>,
    /// Input normalization; when absent, whatever the pack's manifest says.
    pub normalization: Option<Normalization>,
    pub expansion: Expansion,
    pub pruning: Pruning,
    /// Hard cap on the active set, under every policy.
    pub max_loaded: usize,
    /// Concepts reported per token.
    pub report_top_k: usize,
    /// Drop from the report any parent decomposed this token.
    pub hide_decomposed_parents: bool,
    /// Watch profiles (`[[cascade.watch]]`): each token's report carries an alert for every
    /// concept scored that token, in a watched subtree, at or above the profile's threshold.
    pub watch: Vec<WatchProfile>,
}

/// The most watch profiles one cascade may carry.
pub const MAX_WATCH_PROFILES: usize = 256;

/// Concepts to alert on (docs/cascade-semantics.md, "Alerts"). Watching a concept watches
/// every concept beneath it in the hierarchy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchProfile {
    /// Names the profile in alerts and metrics.
    pub name: String,
    /// Concept names (every layer's concept of that name).
    #[serde(default)]
    pub concepts: Vec<String>,
    /// A file of concept names in headspace's profile format: one per line; blank lines and
    /// lines starting with `#` are skipped. A relative path is relative to the working
    /// directory, as on headspace's command line. Adds to `concepts`.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Alert at or above this score; when absent, the pack's default (0.5 on a pack of raw
    /// probes).
    #[serde(default)]
    pub threshold: Option<f32>,
}

impl WatchProfile {
    /// Every concept name the profile lists, its file's included.
    pub fn all_concepts(&self) -> Result<Vec<String>, ConfigError> {
        let mut out = self.concepts.clone();
        if let Some(path) = &self.file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.clone(), source })?;
            out.extend(parse_profile_text(&text));
        }
        Ok(out)
    }
}

/// headspace's profile text format: one concept name per line, blank lines and `#` comments
/// skipped, surrounding whitespace trimmed.
pub fn parse_profile_text(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()
}

impl Default for CascadeConfig {
    /// The seed's real-time configuration.
    fn default() -> Self {
        Self {
            base_layers: vec![0],
            normalization: None,
            expansion: Expansion::Threshold { load_threshold: 0.3 },
            pruning: Pruning::TopK { keep_top_k: 30 },
            max_loaded: 500,
            report_top_k: 10,
            hide_decomposed_parents: false,
            watch: Vec::new(),
        }
    }
}

impl CascadeConfig {
    /// The configured normalization, or the one the pack's manifest asks for.
    pub fn normalization_for(&self, pack: InputNormalization) -> Normalization {
        self.normalization.unwrap_or_else(|| pack.into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    None,
    LayerNorm,
}

impl From<InputNormalization> for Normalization {
    fn from(n: InputNormalization) -> Self {
        match n {
            InputNormalization::None => Normalization::None,
            InputNormalization::LayerNorm => Normalization::LayerNorm,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Expansion {
    /// The seed: children of every probe with p > load_threshold, once per token.
    Threshold { load_threshold: f32 },
    /// The later variant: up to max_depth rounds decomposing the top_k undecomposed concepts.
    Decompose {
        top_k: usize,
        #[serde(default = "default_max_depth")]
        max_depth: usize,
    },
    /// Every probe of the pack, every token: the cascade becomes the exhaustive oracle (with
    /// `pruning = "none"`). Sensible for small packs; `max_loaded` must cover the pack.
    Exhaustive,
}

fn default_max_depth() -> usize {
    5
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Pruning {
    /// The seed's aggressive pruning: base plus the best (keep_top_k − base) others.
    TopK {
        keep_top_k: usize,
    },
    /// Base plus the `keep` best-scoring probes of the token, base or not.
    GlobalTopK {
        keep: usize,
    },
    /// Over max_loaded only: drop non-base probes below unload_threshold, lowest first.
    Cold {
        unload_threshold: f32,
    },
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Dtype the probes are computed in (`f32`, or `bf16` where the device has fast bf16).
    pub compute_dtype: DType,
    /// Threads for tensor math; 0 means one per core.
    pub threads: usize,
    /// How the CPU scores probes: `auto` (the kernel, with the best instruction set this CPU
    /// has), `scalar`, `avx2` or `avx512` (the kernel on that path), or `torch` (libtorch on
    /// an arena the probes are copied into).
    pub cpu_kernel: CpuKernel,
    /// Bytes of the tch backend's resident store (an accelerator, or `cpu_kernel = "torch"`):
    /// probes are copied into it once, in the compute dtype, and stay until their room is
    /// needed. 0: the whole pack where it fits in half the free memory of the device (RAM
    /// for the CPU), else that half.
    pub store_bytes: u64,
    /// Replay the store's sparse scoring rounds as CUDA graphs, one per (probes, hidden
    /// states) bucket, where the build has the `cuda-graphs` feature (`make build-gpu`) and
    /// the device is CUDA; `false` scores every round eagerly. Ignored elsewhere.
    pub cuda_graphs: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            compute_dtype: DType::F32,
            threads: 0,
            cpu_kernel: CpuKernel::Auto,
            store_bytes: 0,
            cuda_graphs: true,
        }
    }
}

/// `device.cpu_kernel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuKernel {
    #[default]
    Auto,
    Scalar,
    Avx2,
    Avx512,
    Torch,
}

impl CpuKernel {
    /// The kernel path this forces (`None`: the best available, or not the kernel at all).
    pub fn isa(self) -> Option<crate::kernel::Isa> {
        use crate::kernel::Isa;
        match self {
            CpuKernel::Scalar => Some(Isa::Scalar),
            CpuKernel::Avx2 => Some(Isa::Avx2),
            CpuKernel::Avx512 => Some(Isa::Avx512),
            CpuKernel::Auto | CpuKernel::Torch => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CpuKernel::Auto => "auto",
            CpuKernel::Scalar => "scalar",
            CpuKernel::Avx2 => "avx2",
            CpuKernel::Avx512 => "avx512",
            CpuKernel::Torch => "torch",
        }
    }
}

impl std::fmt::Display for CpuKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the math runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda(usize),
}

impl DeviceConfig {
    pub fn kind(&self) -> Result<DeviceKind, String> {
        match self.device.as_str() {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceKind::Cuda)
                .ok_or_else(|| format!("is `{other}`; expected `cpu` or `cuda:N`")),
        }
    }
}

/// Sizes for the actor runtime: every cache, queue and pool is bounded from here.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Byte budget of the host-RAM cache of probe weights.
    pub cache_bytes: u64,
    /// Probe slots in the device arena.
    pub pool_slots: usize,
    /// io_uring reads in flight at once.
    pub prefetch_queue_depth: usize,
    /// Threads of the blocking-read fallback where io_uring is unavailable.
    pub fallback_io_threads: usize,
    /// Speculative prefetch of the children of parents scoring within this margin under the
    /// load threshold (0 disables it).
    pub prefetch_hint_margin: f32,
    /// Requests that may wait for the runtime at once.
    pub request_queue: usize,
    /// `exact` (reports wait for children) or `pipelined` (reports from what is resident).
    pub mode: Mode,
    /// `auto` (io_uring, else threads), `io_uring` or `threads`.
    pub reader: ReaderKind,
    /// Pipelined mode: children that land within this many microseconds still count for the
    /// token that asked for them.
    pub latency_budget_us: u64,
    /// Accelerators only: bytes of the pinned host buffer (and its device twin) through which a
    /// token's installs travel in one transfer. Tokens installing more take several transfers.
    pub staging_bytes: u64,
    /// Sessions (streams) that may be open on one `Runtime` at once.
    pub max_sessions: usize,
    /// Sessions: how long a step waits after its first request for others to join it
    /// (microseconds; 0: a step takes what is waiting and starts at once).
    pub batch_window_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Exact,
    Pipelined,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_bytes: 1 << 30,
            pool_slots: 512,
            prefetch_queue_depth: 32,
            fallback_io_threads: 2,
            prefetch_hint_margin: 0.1,
            request_queue: 64,
            mode: Mode::Exact,
            reader: ReaderKind::Auto,
            latency_budget_us: 0,
            staging_bytes: 64 << 20,
            max_sessions: 64,
            batch_window_us: 0,
        }
    }
}

/// A watch list's own checks (the pack's are `policy::Watch::compile`'s): names, thresholds,
/// and something to watch.
pub fn check_watch(watch: &[WatchProfile]) -> Result<(), String> {
    if watch.len() > MAX_WATCH_PROFILES {
        return Err(format!("has {} profiles; at most {MAX_WATCH_PROFILES}", watch.len()));
    }
    for (i, w) in watch.iter().enumerate() {
        if w.name.trim().is_empty() {
            return Err(format!("profile {i} has no name"));
        }
        if watch[..i].iter().any(|o| o.name == w.name) {
            return Err(format!("two profiles are named {:?}", w.name));
        }
        if let Some(t) = w.threshold.filter(|t| !(0.0..=1.0).contains(t)) {
            return Err(format!("profile {:?}: threshold = {t} is outside [0, 1]", w.name));
        }
        if w.concepts.is_empty() && w.file.is_none() {
            return Err(format!("profile {:?} lists no concepts and no file", w.name));
        }
    }
    Ok(())
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        config.validate(path)?;
        Ok(config)
    }

    /// [`Config::load`], and the document itself as JSON ([`Config::parse_document`]).
    pub fn load_document(path: &Path) -> Result<(Self, serde_json::Value), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        Self::parse_document(&text, path)
    }

    /// [`Config::parse`], and the document itself as JSON: what session overrides apply on top
    /// of, and what a dataset's manifest records.
    pub fn parse_document(text: &str, path: &Path) -> Result<(Self, serde_json::Value), ConfigError> {
        let config = Self::parse(text, path)?;
        let raw = toml::from_str::<serde_json::Value>(text)
            .map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        Ok((config, raw))
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, message: String| Err(ConfigError::Invalid { path: path.into(), key, message });
        let c = &self.cascade;
        if c.base_layers.is_empty() {
            return bad("cascade.base_layers", "must name at least one layer".into());
        }
        match c.expansion {
            Expansion::Threshold { load_threshold } if !(0.0..1.0).contains(&load_threshold) => {
                return bad(
                    "cascade.expansion.threshold.load_threshold",
                    format!("= {load_threshold} is outside [0, 1)"),
                );
            }
            Expansion::Decompose { top_k: 0, .. } => {
                return bad("cascade.expansion.decompose.top_k", "must be at least 1".into());
            }
            Expansion::Decompose { max_depth, .. } if !(1..=64).contains(&max_depth) => {
                return bad("cascade.expansion.decompose.max_depth", format!("= {max_depth} is outside 1..=64"));
            }
            _ => {}
        }
        match c.pruning {
            Pruning::TopK { keep_top_k: 0 } => {
                return bad("cascade.pruning.top_k.keep_top_k", "must be at least 1".into())
            }
            Pruning::Cold { unload_threshold } if !(0.0..=1.0).contains(&unload_threshold) => {
                return bad("cascade.pruning.cold.unload_threshold", format!("= {unload_threshold} is outside [0, 1]"));
            }
            _ => {}
        }
        if c.max_loaded == 0 {
            return bad("cascade.max_loaded", "must be at least 1".into());
        }
        if c.report_top_k == 0 {
            return bad("cascade.report_top_k", "must be at least 1".into());
        }
        if let Err(message) = check_watch(&c.watch) {
            return bad("cascade.watch", message);
        }
        if let Err(message) = self.device.kind() {
            return bad("device.device", message);
        }
        if self.device.threads > 1024 {
            return bad("device.threads", format!("= {} is more than 1024", self.device.threads));
        }
        let r = &self.runtime;
        if r.pool_slots == 0 {
            return bad("runtime.pool_slots", "must be at least 1".into());
        }
        if !(1..=4096).contains(&r.prefetch_queue_depth) {
            return bad("runtime.prefetch_queue_depth", format!("= {} is outside 1..=4096", r.prefetch_queue_depth));
        }
        if !(1..=256).contains(&r.fallback_io_threads) {
            return bad("runtime.fallback_io_threads", format!("= {} is outside 1..=256", r.fallback_io_threads));
        }
        if !(0.0..=1.0).contains(&r.prefetch_hint_margin) {
            return bad("runtime.prefetch_hint_margin", format!("= {} is outside [0, 1]", r.prefetch_hint_margin));
        }
        if r.max_sessions == 0 {
            return bad("runtime.max_sessions", "must be at least 1".into());
        }
        if r.batch_window_us > 100_000 {
            return bad("runtime.batch_window_us", format!("= {} is over 100000 (0.1 s)", r.batch_window_us));
        }
        if r.request_queue == 0 {
            return bad("runtime.request_queue", "must be at least 1".into());
        }
        if r.pool_slots < c.max_loaded {
            let message = format!(
                "= {} is below cascade.max_loaded = {}: every active probe needs a slot",
                r.pool_slots, c.max_loaded
            );
            return bad("runtime.pool_slots", message);
        }
        if r.latency_budget_us > 10_000_000 {
            return bad("runtime.latency_budget_us", format!("= {} is more than 10 s", r.latency_budget_us));
        }
        if !(1 << 20..=1 << 36).contains(&r.staging_bytes) {
            return bad("runtime.staging_bytes", format!("= {} is outside 1 MiB..=64 GiB", r.staging_bytes));
        }
        let s = &self.serve;
        if !(1024..=1 << 30).contains(&s.max_message_bytes) {
            return bad("serve.max_message_bytes", format!("= {} is outside 1 KiB..=1 GiB", s.max_message_bytes));
        }
        if !(1..=65_536).contains(&s.stream_queue) {
            return bad("serve.stream_queue", format!("= {} is outside 1..=65536", s.stream_queue));
        }
        if !(1..=65_536).contains(&s.viewer_buffer) {
            return bad("serve.viewer_buffer", format!("= {} is outside 1..=65536", s.viewer_buffer));
        }
        if !(1..=1024).contains(&s.max_viewers) {
            return bad("serve.max_viewers", format!("= {} is outside 1..=1024", s.max_viewers));
        }
        if !(1..=65_536).contains(&s.max_batch_items) {
            return bad("serve.max_batch_items", format!("= {} is outside 1..=65536", s.max_batch_items));
        }
        if s.request_deadline_ms > 3_600_000 {
            return bad("serve.request_deadline_ms", format!("= {} is more than an hour", s.request_deadline_ms));
        }
        if s.idle_session_ms == 0 {
            return bad("serve.idle_session_ms", "must be at least 1".into());
        }
        if s.drain_grace_ms > 3_600_000 {
            return bad("serve.drain_grace_ms", format!("= {} is more than an hour", s.drain_grace_ms));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("test.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_is_the_seed_realtime_config() {
        let c = parse("").unwrap();
        assert_eq!(c.cascade, CascadeConfig::default());
        assert_eq!(c.cascade.expansion, Expansion::Threshold { load_threshold: 0.3 });
    }

    #[test]
    fn reads_every_policy() {
        let c = parse(
            "[cascade]\nbase_layers = [0, 1]\nnormalization = \"layer_norm\"\npruning = \"none\"\n\
             [cascade.expansion.decompose]\ntop_k = 10\n",
        )
        .unwrap();
        assert_eq!(c.cascade.expansion, Expansion::Decompose { top_k: 10, max_depth: 5 });
        assert_eq!(c.cascade.pruning, Pruning::None);
        assert_eq!(c.cascade.normalization, Some(Normalization::LayerNorm));
        let c = parse("[cascade.pruning.cold]\nunload_threshold = 0.1\n").unwrap();
        assert_eq!(c.cascade.pruning, Pruning::Cold { unload_threshold: 0.1 });
        let c = parse("[cascade.pruning.global_top_k]\nkeep = 10\n").unwrap();
        assert_eq!(c.cascade.pruning, Pruning::GlobalTopK { keep: 10 });
    }

    #[test]
    fn unknown_keys_wrong_types_and_ranges_name_the_key_and_file() {
        let e = parse("[cascade]\nmax_lodaed = 3\n").unwrap_err();
        assert!(e.contains("test.toml") && e.contains("max_lodaed"), "{e}");
        let e = parse("[cascade]\nmax_loaded = \"many\"\n").unwrap_err();
        assert!(e.contains("test.toml") && e.contains("max_loaded"), "{e}");
        let e = parse("[cascade.expansion.threshold]\nload_threshold = 1.5\n").unwrap_err();
        assert!(e.contains("cascade.expansion.threshold.load_threshold") && e.contains("1.5"), "{e}");
        let e = parse("[device]\ndevice = \"tpu\"\n").unwrap_err();
        assert!(e.contains("device.device") && e.contains("tpu"), "{e}");
        let e = parse("[runtime]\nprefetch_queue_depth = 0\n").unwrap_err();
        assert!(e.contains("runtime.prefetch_queue_depth"), "{e}");
        let e = parse("[cascade]\npruning = \"sometimes\"\n").unwrap_err();
        assert!(e.contains("sometimes"), "{e}");
        let e = parse("[cascade.pruning.top_k]\nkeep_top_k = 0\n").unwrap_err();
        assert!(e.contains("cascade.pruning.top_k.keep_top_k"), "{e}");
        let e = parse("[cascade]\nbase_layers = []\n").unwrap_err();
        assert!(e.contains("cascade.base_layers"), "{e}");
        let e = parse("not toml at all [").unwrap_err();
        assert!(e.contains("test.toml"), "{e}");
    }

    #[test]
    fn device_strings() {
        let d = |s: &str| DeviceConfig { device: s.into(), ..Default::default() }.kind();
        assert_eq!(d("cpu"), Ok(DeviceKind::Cpu));
        assert_eq!(d("cuda:1"), Ok(DeviceKind::Cuda(1)));
        assert!(d("cuda:x").is_err());
    }
}
