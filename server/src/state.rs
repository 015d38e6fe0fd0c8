//! The server's state, one owner for each piece: the [`Runtime`] (pack, cache, scheduler, and
//! the registry of open sessions), and the live config (swapped whole by a reload). What the
//! server knows of a session (how it was opened, so that a reload can reapply its options on
//! the new file; its peer, label and token count) is a [`SessionEntry`] attached to the
//! session's entry in the runtime's registry: one list of open sessions, the runtime's.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use probe_cascade::config::{cascade_with, Config, Mode};
use probe_cascade::engine::TokenReport;
use probe_cascade::runtime::{Runtime, RuntimeError, Session, SessionId, SessionOptions};
use serde::Serialize;
use tokio::sync::watch;

use crate::proto::v1 as pb;

/// The config in force, and the document it came from (session overrides apply on top of
/// its `[cascade]` table).
pub struct Live {
    pub config: Config,
    pub raw: serde_json::Value,
}

impl Live {
    pub fn parse(text: &str, path: &Path) -> Result<Self, probe_cascade::config::ConfigError> {
        let (config, raw) = Config::parse_document(text, path)?;
        Ok(Self { config, raw })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// Bound to a `Session` stream: closed with it.
    Stream,
    /// Opened by `OpenSession`: closed by `CloseSession` or when idle.
    Unary,
}

/// What a session was opened with, as asked (reapplied on every reload).
#[derive(Debug, Clone, Default)]
pub struct Requested {
    pub mode: Option<Mode>,
    pub latency_budget_us: Option<u64>,
    pub cascade: serde_json::Map<String, serde_json::Value>,
    pub label: String,
}

impl Requested {
    /// Reads a message's options, naming the field that is wrong.
    pub fn from_proto(o: &pb::SessionOptions) -> Result<Self, String> {
        let mode = match o.mode.as_deref() {
            None | Some("") => None,
            Some("exact") => Some(Mode::Exact),
            Some("pipelined") => Some(Mode::Pipelined),
            Some(other) => {
                return Err(format!("session options: `mode` = {other:?} is not \"exact\" or \"pipelined\""))
            }
        };
        let cascade = if o.cascade_json.trim().is_empty() {
            Default::default()
        } else {
            match serde_json::from_str::<serde_json::Value>(&o.cascade_json) {
                Ok(serde_json::Value::Object(map)) => map,
                Ok(_) => return Err("session options: `cascade_json` must be a JSON object of [cascade] keys".into()),
                Err(e) => return Err(format!("session options: `cascade_json` is not JSON: {e}")),
            }
        };
        if o.label.len() > 256 {
            return Err(format!("session options: `label` is {} bytes, over the limit of 256", o.label.len()));
        }
        Ok(Self { mode, latency_budget_us: o.latency_budget_us, cascade, label: o.label.clone() })
    }

    /// The runtime's options for this session under `live`.
    pub fn options(&self, live: &Live) -> Result<SessionOptions, String> {
        let cascade = cascade_with(&live.raw, &self.cascade).map_err(|e| format!("session options: {e}"))?;
        // A profile file is read on the server, and its lines would come back in errors: a
        // client lists its concepts instead.
        if self.cascade.contains_key("watch") {
            if let Some(i) = cascade.watch.iter().position(|w| w.file.is_some()) {
                return Err(format!(
                    "session options: `cascade.watch[{i}].file`: a session opened over the network lists its \
                     concepts in `concepts`; it cannot name a file on the server"
                ));
            }
        }
        Ok(SessionOptions {
            cascade: Some(cascade),
            mode: Some(self.mode.unwrap_or(live.config.runtime.mode)),
            latency_budget_us: Some(self.latency_budget_us.unwrap_or(live.config.runtime.latency_budget_us)),
        })
    }
}

pub struct SessionEntry {
    pub id: SessionId,
    pub kind: SessionKind,
    pub requested: Requested,
    pub opened: SystemTime,
    pub peer: Option<String>,
    pub tokens: AtomicU64,
    /// Milliseconds since the server started, at the last call.
    last_used_ms: AtomicU64,
    /// An `OpenSession` session is owned here; a stream's is owned by its stream task.
    owned: Mutex<Option<Session>>,
    /// Its tokens for live viewers.
    pub events: crate::events::EventLog,
}

impl SessionEntry {
    pub fn touch(&self, state: &State) {
        self.last_used_ms.store(state.now_ms(), Ordering::Relaxed);
    }
}

#[derive(Debug, Serialize)]
pub struct SessionView {
    pub id: u64,
    pub kind: SessionKind,
    pub label: String,
    pub mode: &'static str,
    pub opened_unix_ms: u64,
    pub idle_ms: u64,
    pub tokens: u64,
    pub peer: Option<String>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new file is in force; `sessions` open sessions took it from their next token.
    Applied { changed: Vec<&'static str>, sessions: usize },
    /// Nothing live changed.
    Unchanged,
    /// The file changes keys that cannot change while serving: nothing was applied.
    Refused { keys: Vec<&'static str> },
    /// The file could not be read or is not a valid config: nothing was applied.
    Invalid { message: String },
}

pub struct State {
    pub runtime: Runtime,
    pub config_path: Option<PathBuf>,
    live: RwLock<Arc<Live>>,
    started: Instant,
    draining: AtomicBool,
    /// Set when draining starts: stream tasks stop reading and finish what they hold.
    drain_tx: watch::Sender<bool>,
    /// Streams and batch calls being served; drain waits for none.
    busy: AtomicUsize,
    busy_changed: tokio::sync::Notify,
    /// The reload lock: one reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// Ticks every [`TICK`]: tokens in flight check their deadline on it (see
    /// `service::within`), so that no token registers a timer of its own; each tick also
    /// releases the held viewer events ([`State::release_held_events`]).
    pub ticks: tokio::sync::Notify,
    /// Sessions that may hold a viewer event, for the next tick to release
    /// ([`State::hold_event`]); at most one entry per open session.
    held: Mutex<HashSet<SessionId>>,
}

/// How often deadlines are checked (a token is refused at most this much after its deadline),
/// and the longest a token's event is held for its viewers when the session sends no next token.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(10);

impl State {
    pub fn new(runtime: Runtime, live: Live, config_path: Option<PathBuf>) -> Self {
        Self {
            runtime,
            config_path,
            live: RwLock::new(Arc::new(live)),
            started: Instant::now(),
            draining: AtomicBool::new(false),
            drain_tx: watch::channel(false).0,
            busy: AtomicUsize::new(0),
            busy_changed: tokio::sync::Notify::new(),
            reloading: tokio::sync::Mutex::new(()),
            ticks: tokio::sync::Notify::new(),
            held: Mutex::new(HashSet::new()),
        }
    }

    pub fn live(&self) -> Arc<Live> {
        self.live.read().expect("live config lock").clone()
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }

    /// Marks a stream or call as being served until the guard drops.
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::SeqCst);
        BusyGuard(self.clone())
    }

    /// Opens a session with `requested` under the live config.
    pub async fn open(
        self: &Arc<Self>,
        requested: Requested,
        kind: SessionKind,
        peer: Option<String>,
    ) -> Result<(Arc<SessionEntry>, Option<Session>), OpenError> {
        if self.draining() {
            return Err(OpenError::Draining);
        }
        let options = requested.options(&self.live()).map_err(OpenError::Options)?;
        let mut made = None;
        let attach = |id| {
            let entry = Arc::new(SessionEntry {
                id,
                kind,
                requested,
                opened: SystemTime::now(),
                peer,
                tokens: AtomicU64::new(0),
                last_used_ms: AtomicU64::new(self.now_ms()),
                owned: Mutex::new(None),
                events: crate::events::EventLog::new(
                    self.live().config.serve.viewer_buffer,
                    self.live().config.serve.max_viewers,
                ),
            });
            made = Some(entry.clone());
            entry
        };
        let session = self.runtime.open_session_with(options, attach).await.map_err(OpenError::Runtime)?;
        let entry = made.expect("the runtime attaches the entry when the session opens");
        let session = match kind {
            SessionKind::Stream => Some(session),
            SessionKind::Unary => {
                *entry.owned.lock().expect("session lock") = Some(session);
                None
            }
        };
        metrics::counter!(crate::metrics::SESSIONS_OPENED).increment(1);
        Ok((entry, session))
    }

    pub fn session(&self, id: SessionId) -> Option<Arc<SessionEntry>> {
        self.runtime.attached(id)
    }

    fn entries(&self) -> Vec<Arc<SessionEntry>> {
        self.runtime.attachments::<SessionEntry>().into_iter().map(|(_, e)| e).collect()
    }

    /// Closes a session (answering what it has queued), which takes it out of the runtime's
    /// registry. `session` is the stream's own; an `OpenSession` one is taken from its entry,
    /// once: of two concurrent closes, one closes it and the other is told it was not open.
    pub async fn close(&self, id: SessionId, session: Option<Session>) -> bool {
        let entry = self.session(id);
        let owned = entry.as_ref().and_then(|e| e.owned.lock().expect("session lock").take());
        let Some(session) = session.or(owned) else { return false };
        session.close().await;
        // Its viewers get its last token (answered as it closed, perhaps) before their streams end.
        if let Some(e) = &entry {
            self.release_event(e);
        }
        metrics::counter!(crate::metrics::SESSIONS_CLOSED).increment(1);
        true
    }

    /// Holds a session's answered token for its viewers (`EventLog::hold`) and notes the
    /// session for the next tick, should nothing release it sooner. Returns whether it was held
    /// (a viewer has asked for this session).
    pub fn hold_event(&self, entry: &SessionEntry, report: TokenReport, text: Option<String>) -> bool {
        let held = entry.events.hold(report, text, self.runtime.pack().hierarchy());
        if held {
            self.held.lock().expect("held sessions lock").insert(entry.id);
        }
        held
    }

    /// Publishes a session's held viewer event now.
    pub fn release_event(&self, entry: &SessionEntry) {
        entry.events.release(self.runtime.pack().hierarchy());
    }

    /// Publishes the held viewer event of every session noted since the last tick (on each
    /// tick): nothing to walk when no session is watched.
    pub fn release_held_events(&self) {
        let ids = std::mem::take(&mut *self.held.lock().expect("held sessions lock"));
        for e in ids.into_iter().filter_map(|id| self.session(id)) {
            self.release_event(&e);
        }
    }

    /// `OpenSession` sessions idle for longer than `serve.idle_session_ms`.
    pub fn idle_sessions(&self) -> Vec<SessionId> {
        let limit = self.live().config.serve.idle_session_ms;
        let now = self.now_ms();
        self.entries()
            .into_iter()
            .filter(|e| e.kind == SessionKind::Unary)
            .filter(|e| now.saturating_sub(e.last_used_ms.load(Ordering::Relaxed)) > limit)
            .map(|e| e.id)
            .collect()
    }

    pub fn open_sessions(&self) -> usize {
        self.runtime.sessions().len()
    }

    pub fn session_views(&self) -> Vec<SessionView> {
        let now = self.now_ms();
        let live = self.live();
        let mut views: Vec<SessionView> = self
            .entries()
            .iter()
            .map(|e| SessionView {
                id: e.id.0,
                kind: e.kind,
                label: e.requested.label.clone(),
                mode: match e.requested.mode.unwrap_or(live.config.runtime.mode) {
                    Mode::Exact => "exact",
                    Mode::Pipelined => "pipelined",
                },
                opened_unix_ms: e
                    .opened
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                idle_ms: now.saturating_sub(e.last_used_ms.load(Ordering::Relaxed)),
                tokens: e.tokens.load(Ordering::Relaxed),
                peer: e.peer.clone(),
            })
            .collect();
        views.sort_by_key(|v| v.id);
        views
    }

    /// Rereads the config file. Keys that can change live take effect from the next token of
    /// every open session; a file that changes any other key, or is not a valid config, is
    /// refused whole, and the running config stays.
    pub async fn reload(&self) -> ReloadOutcome {
        let _one = self.reloading.lock().await;
        let outcome = self.reload_inner().await;
        let result = match &outcome {
            ReloadOutcome::Applied { .. } => "applied",
            ReloadOutcome::Unchanged => "unchanged",
            ReloadOutcome::Refused { .. } => "refused",
            ReloadOutcome::Invalid { .. } => "invalid",
        };
        metrics::counter!(crate::metrics::RELOADS, "result" => result).increment(1);
        outcome
    }

    async fn reload_inner(&self) -> ReloadOutcome {
        let Some(path) = &self.config_path else {
            let message = "no --config file was given, so there is nothing to reread".to_string();
            tracing::warn!("config reload: {message}");
            return ReloadOutcome::Invalid { message };
        };
        let new = match std::fs::read_to_string(path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|text| Live::parse(&text, path).map_err(|e| e.to_string()))
        {
            Ok(new) => new,
            Err(message) => {
                tracing::error!("config reload: {message}; keeping the running config");
                return ReloadOutcome::Invalid { message };
            }
        };
        // Profiles must name the pack's concepts before the file replaces the running one.
        if let Err(e) = probe_cascade::policy::Watch::compile(
            self.runtime.pack().hierarchy(),
            &new.config.cascade.watch,
            probe_cascade::policy::default_alert_threshold(self.runtime.pack()),
        ) {
            let message = format!("{}: {e}", path.display());
            tracing::error!("config reload: {message}; keeping the running config");
            return ReloadOutcome::Invalid { message };
        }
        let old = self.live();
        let (live_keys, fixed_keys) = changed_keys(&old.config, &new.config);
        if !fixed_keys.is_empty() {
            for key in &fixed_keys {
                tracing::warn!(
                    "config reload: `{key}` cannot change while serving (restart to apply it); \
                     the reload is refused and the running config kept"
                );
            }
            return ReloadOutcome::Refused { keys: fixed_keys };
        }
        if live_keys.is_empty() {
            tracing::info!("config reload: {}: nothing changed", path.display());
            return ReloadOutcome::Unchanged;
        }
        // Check every open session's options against the new file before applying any.
        let entries = self.entries();
        let mut planned = Vec::with_capacity(entries.len());
        for e in &entries {
            match e.requested.options(&new) {
                Ok(o) => planned.push((e.id, o)),
                Err(message) => {
                    let message = format!("{} with the new file: {message}", e.id);
                    tracing::error!("config reload: {message}; keeping the running config");
                    return ReloadOutcome::Invalid { message };
                }
            }
        }
        *self.live.write().expect("live config lock") = Arc::new(new);
        let mut applied = 0;
        for (id, options) in planned {
            match self.runtime.reconfigure(id, &options).await {
                Ok(()) => applied += 1,
                // Closed since: nothing to do.
                Err(RuntimeError::UnknownSession(_)) => {}
                Err(e) => tracing::error!("config reload: {id}: {e}"),
            }
        }
        tracing::info!(
            "config reload: {}: applied {} to {applied} open sessions from their next token",
            path.display(),
            live_keys.join(", ")
        );
        ReloadOutcome::Applied { changed: live_keys, sessions: applied }
    }

    /// Starts draining: no new sessions or calls; streams answer what they hold and close.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.drain_tx.send(true);
    }

    /// Waits until no stream or call is being served.
    pub async fn idle(&self) {
        loop {
            let changed = self.busy_changed.notified();
            if self.busy.load(Ordering::SeqCst) == 0 {
                return;
            }
            changed.await;
        }
    }

    /// Closes every session (drain's last step).
    pub async fn close_all(&self) {
        for id in self.runtime.sessions() {
            self.close(id, None).await;
        }
    }
}

pub struct BusyGuard(Arc<State>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        self.0.busy_changed.notify_waiters();
    }
}

pub enum OpenError {
    Draining,
    Options(String),
    Runtime(RuntimeError),
}

/// The keys that differ between two configs: those that can change live, and the rest.
pub fn changed_keys(old: &Config, new: &Config) -> (Vec<&'static str>, Vec<&'static str>) {
    let (mut live, mut fixed) = (Vec::new(), Vec::new());
    let mut check = |key: &'static str, differs: bool, can_change: bool| {
        if differs {
            if can_change {
                live.push(key)
            } else {
                fixed.push(key)
            }
        }
    };
    let (a, b) = (&old.cascade, &new.cascade);
    check("cascade.base_layers", a.base_layers != b.base_layers, false);
    check("cascade.normalization", a.normalization != b.normalization, false);
    check("cascade.max_loaded", a.max_loaded != b.max_loaded, false);
    check("cascade.expansion", a.expansion != b.expansion, true);
    check("cascade.pruning", a.pruning != b.pruning, true);
    check("cascade.report_top_k", a.report_top_k != b.report_top_k, true);
    check("cascade.hide_decomposed_parents", a.hide_decomposed_parents != b.hide_decomposed_parents, true);
    check("cascade.watch", a.watch != b.watch, true);
    let (a, b) = (&old.device, &new.device);
    check("device.device", a.device != b.device, false);
    check("device.compute_dtype", a.compute_dtype != b.compute_dtype, false);
    check("device.threads", a.threads != b.threads, false);
    check("device.cpu_kernel", a.cpu_kernel != b.cpu_kernel, false);
    check("device.store_bytes", a.store_bytes != b.store_bytes, false);
    let (a, b) = (&old.runtime, &new.runtime);
    check("runtime.cache_bytes", a.cache_bytes != b.cache_bytes, false);
    check("runtime.pool_slots", a.pool_slots != b.pool_slots, false);
    check("runtime.prefetch_queue_depth", a.prefetch_queue_depth != b.prefetch_queue_depth, false);
    check("runtime.fallback_io_threads", a.fallback_io_threads != b.fallback_io_threads, false);
    check("runtime.prefetch_hint_margin", a.prefetch_hint_margin != b.prefetch_hint_margin, false);
    check("runtime.request_queue", a.request_queue != b.request_queue, false);
    check("runtime.mode", a.mode != b.mode, false);
    check("runtime.reader", a.reader != b.reader, false);
    check("runtime.latency_budget_us", a.latency_budget_us != b.latency_budget_us, true);
    check("runtime.staging_bytes", a.staging_bytes != b.staging_bytes, false);
    check("runtime.max_sessions", a.max_sessions != b.max_sessions, false);
    check("runtime.batch_window_us", a.batch_window_us != b.batch_window_us, false);
    let (a, b) = (&old.serve, &new.serve);
    check("serve.max_message_bytes", a.max_message_bytes != b.max_message_bytes, false);
    check("serve.stream_queue", a.stream_queue != b.stream_queue, true);
    check("serve.request_deadline_ms", a.request_deadline_ms != b.request_deadline_ms, true);
    check("serve.max_batch_items", a.max_batch_items != b.max_batch_items, true);
    check("serve.idle_session_ms", a.idle_session_ms != b.idle_session_ms, true);
    check("serve.drain_grace_ms", a.drain_grace_ms != b.drain_grace_ms, true);
    check("serve.viewer_buffer", a.viewer_buffer != b.viewer_buffer, false);
    check("serve.max_viewers", a.max_viewers != b.max_viewers, false);
    (live, fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn sorts_changed_keys_into_live_and_fixed() {
        let old = parse("");
        let new = parse("[cascade.pruning.top_k]\nkeep_top_k = 5\n[serve]\nstream_queue = 3\n");
        assert_eq!(changed_keys(&old, &new), (vec!["cascade.pruning", "serve.stream_queue"], vec![]));
        let new = parse("[runtime]\ncache_bytes = 2000000000\n[cascade]\nreport_top_k = 3\n");
        assert_eq!(changed_keys(&old, &new), (vec!["cascade.report_top_k"], vec!["runtime.cache_bytes"]));
        assert_eq!(changed_keys(&old, &old), (vec![], vec![]));
    }

    #[test]
    fn session_options_name_the_field() {
        let o = |mode: &str, json: &str| pb::SessionOptions {
            mode: Some(mode.into()),
            cascade_json: json.into(),
            ..Default::default()
        };
        assert!(Requested::from_proto(&o("fast", "")).unwrap_err().contains("`mode` = \"fast\""));
        assert!(Requested::from_proto(&o("exact", "[1]")).unwrap_err().contains("`cascade_json` must be"));
        assert!(Requested::from_proto(&o("exact", "{")).unwrap_err().contains("`cascade_json` is not JSON"));
        let r = Requested::from_proto(&o("pipelined", r#"{"report_top_k": 3}"#)).unwrap();
        let live = Live::parse("", Path::new("t.toml")).unwrap();
        let options = r.options(&live).unwrap();
        assert_eq!(options.cascade.unwrap().report_top_k, 3);
        assert_eq!(options.mode, Some(Mode::Pipelined));
        let r = Requested::from_proto(&o("exact", r#"{"report_top_k": "x"}"#)).unwrap();
        assert!(r.options(&live).unwrap_err().contains("cascade.report_top_k"));
    }
}
