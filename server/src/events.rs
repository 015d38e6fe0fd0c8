//! Live-view events: one JSON event per token of a session, for `GET /v1/sessions/{id}/events`
//! (server-sent events; docs/serving.md, "Live events").
//!
//! Why this shape: the scoring path must not wait on viewers, however many or slow. Publishing
//! is one serialization and one `broadcast` send under a short lock, whatever the number of
//! viewers, and nothing at all until a viewer first asks. Each viewer reads from its own bounded
//! place in the broadcast ring (`serve.viewer_buffer` events); one that falls further behind is
//! dropped and counted, never waited for. The log also keeps the last `serve.viewer_buffer`
//! events, so that a viewer that reconnects with the id of the last event it saw (the SSE
//! `Last-Event-ID`) gets what it missed, without duplicates, then the live stream.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use probe_cascade::engine::TokenReport;
use probe_cascade::pack::Hierarchy;
use tokio::sync::broadcast;

/// One token's event: its number (the SSE `id`) and its JSON.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub id: u64,
    pub data: Arc<str>,
}

/// A session's events: the recent ones, and the live feed.
pub struct EventLog {
    capacity: usize,
    /// Set by the first viewer: until then nothing is serialized.
    watched: AtomicBool,
    recent: Mutex<VecDeque<Event>>,
    feed: broadcast::Sender<Event>,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            watched: AtomicBool::new(false),
            recent: Mutex::new(VecDeque::with_capacity(capacity)),
            feed: broadcast::channel(capacity).0,
        }
    }

    /// Publishes a token's report (and its text, where the client sent one), unless no viewer
    /// has ever asked for this session.
    pub fn publish(&self, report: &TokenReport, text: Option<&str>, hierarchy: &Hierarchy) {
        if !self.watched.load(Ordering::Relaxed) {
            return;
        }
        let body = probe_cascade::viewer::TokenEvent::new(report, text, hierarchy);
        let data: Arc<str> = serde_json::to_string(&body).expect("an event serializes").into();
        let event = Event { id: report.index as u64, data };
        let mut recent = self.recent.lock().expect("event log lock");
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(event.clone());
        // Under the lock, so that a subscriber sees each event once: in its backlog or its feed.
        let _ = self.feed.send(event);
    }

    /// A new viewer: the kept events after `after` (all of them without it), and the feed of
    /// every later one.
    pub fn subscribe(&self, after: Option<u64>) -> (Vec<Event>, broadcast::Receiver<Event>) {
        self.watched.store(true, Ordering::Relaxed);
        let recent = self.recent.lock().expect("event log lock");
        let feed = self.feed.subscribe();
        let backlog = recent.iter().filter(|e| after.is_none_or(|a| e.id > a)).cloned().collect();
        (backlog, feed)
    }

    /// Events kept, and how far a viewer may fall behind (`serve.viewer_buffer`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_cascade::engine::StageTimings;

    fn report(index: usize) -> TokenReport {
        TokenReport {
            index,
            top: Vec::new(),
            children: 0,
            loaded: 0,
            unloaded: 0,
            skipped_by_cap: 0,
            scored: 3,
            scored_ids: Vec::new(),
            scored_logits: Vec::new(),
            scored_probs: Vec::new(),
            active: 3,
            stages: StageTimings::default(),
            elapsed: std::time::Duration::from_micros(250),
            in_flight: Vec::new(),
            failed_loads: Vec::new(),
            alerts: Vec::new(),
            simplex: Vec::new(),
        }
    }

    #[test]
    fn nothing_is_kept_until_a_viewer_asks() {
        let log = EventLog::new(4);
        log.publish(&report(0), None, &Hierarchy::default());
        assert!(log.subscribe(None).0.is_empty());
        log.publish(&report(1), Some(" the"), &Hierarchy::default());
        let (backlog, _) = log.subscribe(None);
        assert_eq!(backlog.len(), 1);
        assert!(backlog[0].data.contains("\"text\":\" the\"") && backlog[0].data.contains("\"ms\":0.25"));
    }

    #[test]
    fn a_viewer_that_resumes_gets_what_it_missed_once_then_the_feed() {
        let log = EventLog::new(3);
        let _first = log.subscribe(None);
        for t in 0..5 {
            log.publish(&report(t), None, &Hierarchy::default());
        }
        // Events 2, 3, 4 are kept; a viewer that saw 2 resumes at 3.
        let (backlog, mut feed) = log.subscribe(Some(2));
        assert_eq!(backlog.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 4]);
        log.publish(&report(5), None, &Hierarchy::default());
        assert_eq!(feed.try_recv().unwrap().id, 5);
        assert!(feed.try_recv().is_err(), "nothing twice");
    }

    #[test]
    fn a_viewer_that_falls_a_buffer_behind_is_told_it_lagged() {
        let log = EventLog::new(2);
        let (_, mut slow) = log.subscribe(None);
        for t in 0..5 {
            log.publish(&report(t), None, &Hierarchy::default());
        }
        assert!(matches!(slow.try_recv(), Err(broadcast::error::TryRecvError::Lagged(3))));
    }
}
