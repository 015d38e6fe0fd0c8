//! Prometheus metrics, every name prefixed `probe_cascade_` (docs/serving.md lists them).
//! Events are recorded where they happen through the `metrics` facade; the runtime's own
//! counters (cache, steps, slots) are read at scrape time, so nothing is counted twice.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use probe_cascade::engine::TokenReport;
use probe_cascade::runtime::cache::CacheStats;
use probe_cascade::runtime::steps::STEP_SIZE_BOUNDS;
use probe_cascade::runtime::StepStats;

pub const TOKENS: &str = "probe_cascade_tokens_total";
pub const ERRORS: &str = "probe_cascade_errors_total";
pub const SESSIONS_OPENED: &str = "probe_cascade_sessions_opened_total";
pub const SESSIONS_CLOSED: &str = "probe_cascade_sessions_closed_total";
pub const SESSIONS_OPEN: &str = "probe_cascade_sessions_open";
pub const STAGE_SECONDS: &str = "probe_cascade_stage_seconds";
pub const REQUEST_SECONDS: &str = "probe_cascade_request_seconds";
pub const BATCH_ITEMS: &str = "probe_cascade_batch_items";
pub const REPLIES_DROPPED: &str = "probe_cascade_replies_dropped_total";
pub const RELOADS: &str = "probe_cascade_config_reloads_total";
pub const STEP_SIZE: &str = "probe_cascade_step_size";
pub const ALERTS: &str = "probe_cascade_alerts_total";
pub const VIEWERS: &str = "probe_cascade_viewers";
pub const VIEWERS_DROPPED: &str = "probe_cascade_viewers_dropped_total";

/// Distinct profile names that get a series of their own; alerts of later names are counted
/// under `profile="(other)"`, so clients naming profiles freely cannot grow the metrics.
pub const MAX_ALERT_SERIES: usize = probe_cascade::config::MAX_WATCH_PROFILES;
static ALERT_SERIES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Seconds buckets for latencies: 10 µs to 10 s.
const SECONDS_BUCKETS: [f64; 13] = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 1e-1, 1.0, 10.0];
const ITEMS_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use (one per process: servers
/// started in one test process share it).
pub fn handle() -> Result<&'static PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_ITEMS.into()), &ITEMS_BUCKETS))
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| format!("installing the Prometheus recorder: {e}"))
                .inspect(|_| describe())
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn describe() {
    describe_counter!(TOKENS, "Hidden states answered with a report.");
    describe_counter!(ERRORS, "Requests answered with an error, by kind.");
    describe_counter!(ALERTS, "Watch profile alerts raised, by profile.");
    describe_counter!(SESSIONS_OPENED, "Sessions opened.");
    describe_counter!(SESSIONS_CLOSED, "Sessions closed (by the client, a disconnect, idleness or drain).");
    describe_gauge!(SESSIONS_OPEN, "Sessions open now.");
    describe_histogram!(STAGE_SECONDS, Unit::Seconds, "Time in each stage of a token, and in all (stage=\"total\").");
    describe_histogram!(REQUEST_SECONDS, Unit::Seconds, "Time from a hidden state's arrival to its answer.");
    describe_histogram!(BATCH_ITEMS, "Items in one ObserveBatch call.");
    describe_counter!(REPLIES_DROPPED, "Answers not delivered because the client had gone.");
    describe_counter!(RELOADS, "Config reloads (SIGHUP), by result.");
    describe_gauge!(VIEWERS, "Live-event viewers connected now (GET /v1/sessions/{id}/events).");
    describe_counter!(VIEWERS_DROPPED, "Live-event viewers dropped for falling serve.viewer_buffer events behind.");
    describe_counter!("probe_cascade_cache_hits_total", "Probe lookups the RAM cache answered.");
    describe_counter!("probe_cascade_cache_misses_total", "Probe lookups that needed a read.");
    describe_counter!("probe_cascade_cache_evictions_total", "Probes evicted from the RAM cache.");
    describe_counter!("probe_cascade_cache_read_bytes_total", Unit::Bytes, "Bytes read from the pack.");
    describe_counter!("probe_cascade_cache_read_errors_total", "Probe reads that failed.");
    describe_gauge!("probe_cascade_cache_resident_bytes", Unit::Bytes, "Bytes of probes in the RAM cache.");
    describe_gauge!("probe_cascade_cache_entries", "Probes in the RAM cache.");
    describe_gauge!("probe_cascade_reads_in_flight", "Probe reads issued and not completed.");
    describe_counter!("probe_cascade_steps_total", "Scoring steps (kernel calls).");
    describe_counter!("probe_cascade_step_requests_total", "Scoring requests served by steps.");
    describe_gauge!("probe_cascade_kernel_seconds", Unit::Seconds, "Time in the kernel, summed since start.");
    describe_counter!("probe_cascade_requests_skipped_closed_total", "Scoring requests whose caller had gone.");
    describe_gauge!("probe_cascade_slots_held_probes", "Distinct probes held in the sessions' slots.");
    describe_gauge!("probe_cascade_slots_held_refs", "Slot references the sessions hold.");
    describe_gauge!("probe_cascade_store_rows", "Rows of the resident store (the tch backend; device.store_bytes).");
    describe_gauge!("probe_cascade_store_resident", "Probes resident in the store.");
    describe_gauge!("probe_cascade_store_pinned", "Resident probes pinned by sessions or base layers.");
    describe_counter!("probe_cascade_store_uploads_total", "Probes copied into the store.");
    describe_counter!("probe_cascade_store_hits_total", "Installs that found their probe resident.");
    describe_counter!("probe_cascade_store_evictions_total", "Warm probes evicted from the store.");
    describe_counter!("probe_cascade_weight_bytes_copied_total", Unit::Bytes, "Weight bytes copied by installs.");
}

/// One answered token: its report's stage times and its time in the server.
pub fn token(report: &TokenReport, in_server: Duration) {
    counter!(TOKENS).increment(1);
    let s = &report.stages;
    for (stage, d) in [
        ("initial_scoring", s.initial_scoring),
        ("expansion_lookup", s.expansion_lookup),
        ("loading", s.loading),
        ("new_scoring", s.new_scoring),
        ("pruning", s.pruning),
        ("sorting", s.sorting),
        ("total", report.elapsed),
    ] {
        histogram!(STAGE_SECONDS, "stage" => stage).record(d.as_secs_f64());
    }
    histogram!(REQUEST_SECONDS).record(in_server.as_secs_f64());
    if !report.alerts.is_empty() {
        let mut seen = ALERT_SERIES.lock().expect("alert series lock");
        for a in &report.alerts {
            counter!(ALERTS, "profile" => alert_series(&mut seen, &a.profile)).increment(1);
        }
    }
}

/// The `profile` label for alerts of `profile`: its own name among the first
/// [`MAX_ALERT_SERIES`] names seen, `(other)` after.
fn alert_series(seen: &mut Vec<String>, profile: &str) -> String {
    if !seen.iter().any(|p| p == profile) {
        if seen.len() >= MAX_ALERT_SERIES {
            return "(other)".to_string();
        }
        seen.push(profile.to_string());
    }
    profile.to_string()
}

pub fn error(kind: &'static str) {
    counter!(ERRORS, "kind" => kind).increment(1);
}

/// The runtime's counters, read at scrape time; then the text.
pub fn render(cache: Option<&CacheStats>, steps: Option<&StepStats>, open_sessions: usize) -> String {
    gauge!(SESSIONS_OPEN).set(open_sessions as f64);
    if let Some(c) = cache {
        counter!("probe_cascade_cache_hits_total").absolute(c.hits);
        counter!("probe_cascade_cache_misses_total").absolute(c.misses);
        counter!("probe_cascade_cache_evictions_total").absolute(c.evictions);
        counter!("probe_cascade_cache_read_bytes_total").absolute(c.bytes_read);
        counter!("probe_cascade_cache_read_errors_total").absolute(c.read_errors);
        gauge!("probe_cascade_cache_resident_bytes").set(c.resident_bytes as f64);
        gauge!("probe_cascade_cache_entries").set(c.entries as f64);
        gauge!("probe_cascade_reads_in_flight").set(c.in_flight as f64);
    }
    if let Some(s) = steps {
        counter!("probe_cascade_steps_total").absolute(s.steps);
        counter!("probe_cascade_step_requests_total").absolute(s.requests);
        gauge!("probe_cascade_kernel_seconds").set(s.kernel_ns as f64 * 1e-9);
        counter!("probe_cascade_requests_skipped_closed_total").absolute(s.skipped_closed);
        gauge!("probe_cascade_slots_held_probes").set(s.held_probes as f64);
        gauge!("probe_cascade_slots_held_refs").set(s.held_refs as f64);
        counter!("probe_cascade_weight_bytes_copied_total").absolute(s.traffic.install_bytes_copied);
        if let Some(st) = &s.traffic.store {
            gauge!("probe_cascade_store_rows").set(st.rows as f64);
            gauge!("probe_cascade_store_resident").set(st.resident as f64);
            gauge!("probe_cascade_store_pinned").set(st.pinned as f64);
            counter!("probe_cascade_store_uploads_total").absolute(st.uploads);
            counter!("probe_cascade_store_hits_total").absolute(st.hits);
            counter!("probe_cascade_store_evictions_total").absolute(st.evictions);
        }
    }
    let mut text = match handle() {
        Ok(h) => h.render(),
        Err(e) => format!("# {e}\n"),
    };
    if let Some(s) = steps {
        text.push_str(&step_size_histogram(s));
    }
    text
}

/// The step scheduler's step sizes as a Prometheus histogram: the scheduler counts them in
/// fixed buckets, which the facade cannot take as they are.
fn step_size_histogram(s: &StepStats) -> String {
    let mut out = format!("# HELP {STEP_SIZE} Requests (tokens of any session) scored in one step.\n");
    out.push_str(&format!("# TYPE {STEP_SIZE} histogram\n"));
    let mut cumulative = 0;
    for (i, bound) in STEP_SIZE_BOUNDS.iter().enumerate() {
        cumulative += s.step_sizes[i];
        out.push_str(&format!("{STEP_SIZE}_bucket{{le=\"{bound}\"}} {cumulative}\n"));
    }
    out.push_str(&format!("{STEP_SIZE}_bucket{{le=\"+Inf\"}} {}\n", s.steps));
    out.push_str(&format!("{STEP_SIZE}_sum {}\n{STEP_SIZE}_count {}\n", s.requests, s.steps));
    out
}

pub fn batch_items(n: usize) {
    histogram!(BATCH_ITEMS).record(n as f64);
}

/// A live-event viewer connected (+1) or left (-1).
pub fn viewers(delta: f64) {
    gauge!(VIEWERS).increment(delta);
}

/// A live-event viewer dropped for falling behind.
pub fn viewer_dropped() {
    counter!(VIEWERS_DROPPED).increment(1);
}

/// Answers that could not be delivered: the client had gone.
pub fn dropped(n: usize) {
    counter!(REPLIES_DROPPED).increment(n as u64);
}
