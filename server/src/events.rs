//! Live-view events: one JSON event per token of a session, for `GET /v1/sessions/{id}/events`
//! (server-sent events; docs/serving.md, "Live events").
//!
//! Why this shape: the scoring path must not wait on viewers, however many or slow. Nothing at
//! all happens until a viewer first asks. Then publishing is one serialization and, under a
//! short lock, one `try_send` of a shared `Arc<str>` into each viewer's bounded queue
//! (`serve.viewer_buffer` events): no task between the session and a viewer's connection, so a
//! token wakes each viewer's connection once. A viewer whose queue is full has stopped
//! reading: it is dropped at once and counted, never waited for. The log also keeps the last
//! `serve.viewer_buffer` events, so that a viewer that reconnects with the id of the last event
//! it saw (the SSE `Last-Event-ID`) gets what it missed, without duplicates, then the live
//! stream. A session has at most `serve.max_viewers` viewers.
//!
//! A token's event is *held* once its answer is sent ([`EventLog::hold`]) and goes out when the
//! session's next token has reached the runtime, or on the server's next tick (10 ms), or as
//! the session closes ([`EventLog::release`]): the viewers' socket work then runs while a token
//! is scored, not on the way to it or its answer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use probe_cascade::engine::TokenReport;
use probe_cascade::pack::Hierarchy;
use tokio::sync::mpsc;

/// One token's event: its number (the SSE `id`) and its JSON.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub id: u64,
    pub data: Arc<str>,
}

/// Why a viewer was not subscribed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("this session already has {0} viewers (serve.max_viewers)")]
    TooManyViewers(usize),
}

struct Inner {
    recent: VecDeque<Event>,
    viewers: Vec<mpsc::Sender<Event>>,
}

/// A session's events: the recent ones, and each viewer's queue.
pub struct EventLog {
    capacity: usize,
    max_viewers: usize,
    /// Set by the first viewer: until then nothing is serialized.
    watched: AtomicBool,
    inner: Mutex<Inner>,
    /// The last answered token, not yet published. Published under this lock, so that two
    /// releases cannot reorder events.
    held: Mutex<Option<(TokenReport, Option<String>)>>,
}

impl EventLog {
    pub fn new(capacity: usize, max_viewers: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            max_viewers: max_viewers.max(1),
            watched: AtomicBool::new(false),
            inner: Mutex::new(Inner { recent: VecDeque::with_capacity(capacity), viewers: Vec::new() }),
            held: Mutex::new(None),
        }
    }

    /// Holds an answered token's event until [`release`](Self::release), publishing the one
    /// held before it first (a token is held at most until the next is answered). Nothing is
    /// held until a viewer has asked for this session; returns whether it was.
    pub fn hold(&self, report: TokenReport, text: Option<String>, hierarchy: &Hierarchy) -> bool {
        if !self.watched() {
            return false;
        }
        let mut held = self.held.lock().expect("held event lock");
        if let Some((report, text)) = held.take() {
            self.publish(&report, text.as_deref(), hierarchy);
        }
        *held = Some((report, text));
        true
    }

    /// Publishes the held event, if any.
    pub fn release(&self, hierarchy: &Hierarchy) {
        if !self.watched() {
            return;
        }
        let mut held = self.held.lock().expect("held event lock");
        if let Some((report, text)) = held.take() {
            self.publish(&report, text.as_deref(), hierarchy);
        }
    }

    /// Has a viewer ever asked? Until then `publish` does nothing.
    pub fn watched(&self) -> bool {
        self.watched.load(Ordering::Relaxed)
    }

    /// Publishes a token's report (and its text, where the client sent one), unless no viewer
    /// has ever asked for this session. Returns how many viewers were dropped for being a full
    /// queue behind (each also counted in `probe_cascade_viewers_dropped_total`).
    pub fn publish(&self, report: &TokenReport, text: Option<&str>, hierarchy: &Hierarchy) -> usize {
        if !self.watched.load(Ordering::Relaxed) {
            return 0;
        }
        let body = probe_cascade::viewer::TokenEvent::new(report, text, hierarchy);
        let data: Arc<str> = serde_json::to_string(&body).expect("an event serializes").into();
        let event = Event { id: report.index as u64, data };
        let mut inner = self.inner.lock().expect("event log lock");
        if inner.recent.len() == self.capacity {
            inner.recent.pop_front();
        }
        inner.recent.push_back(event.clone());
        // Under the lock, so that a subscriber sees each event once: in its backlog or its queue.
        let mut dropped = 0;
        inner.viewers.retain(|v| match v.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                dropped += 1;
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        for _ in 0..dropped {
            crate::metrics::viewer_dropped();
        }
        dropped
    }

    /// A new viewer: its queue, holding the kept events after `after` (all of them without
    /// it), then every later one, up to `serve.viewer_buffer` unread past the backlog.
    pub fn subscribe(&self, after: Option<u64>) -> Result<mpsc::Receiver<Event>, SubscribeError> {
        let mut inner = self.inner.lock().expect("event log lock");
        inner.viewers.retain(|v| !v.is_closed());
        if inner.viewers.len() >= self.max_viewers {
            return Err(SubscribeError::TooManyViewers(self.max_viewers));
        }
        self.watched.store(true, Ordering::Relaxed);
        let backlog: Vec<Event> = inner.recent.iter().filter(|e| after.is_none_or(|a| e.id > a)).cloned().collect();
        let (tx, rx) = mpsc::channel(backlog.len() + self.capacity);
        for e in backlog {
            tx.try_send(e).expect("the queue has room for its backlog");
        }
        inner.viewers.push(tx);
        Ok(rx)
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

    fn ids(rx: &mut mpsc::Receiver<Event>) -> Vec<u64> {
        std::iter::from_fn(|| rx.try_recv().ok()).map(|e| e.id).collect()
    }

    #[test]
    fn nothing_is_kept_until_a_viewer_asks() {
        let log = EventLog::new(4, 8);
        log.publish(&report(0), None, &Hierarchy::default());
        assert!(ids(&mut log.subscribe(None).unwrap()).is_empty());
        log.publish(&report(1), Some(" the"), &Hierarchy::default());
        let mut rx = log.subscribe(None).unwrap();
        let e = rx.try_recv().unwrap();
        assert!(e.id == 1 && e.data.contains("\"text\":\" the\"") && e.data.contains("\"ms\":0.25"));
    }

    #[test]
    fn a_viewer_that_resumes_gets_what_it_missed_once_then_the_feed() {
        let log = EventLog::new(3, 8);
        let _first = log.subscribe(None).unwrap();
        for t in 0..5 {
            log.publish(&report(t), None, &Hierarchy::default());
        }
        // Events 2, 3, 4 are kept; a viewer that saw 2 resumes at 3.
        let mut again = log.subscribe(Some(2)).unwrap();
        assert_eq!(ids(&mut again), vec![3, 4]);
        log.publish(&report(5), None, &Hierarchy::default());
        assert_eq!(ids(&mut again), vec![5], "nothing twice");
    }

    #[test]
    fn a_viewer_a_buffer_behind_is_dropped_and_one_that_left_is_forgotten() {
        let log = EventLog::new(2, 8);
        let _slow = log.subscribe(None).unwrap();
        let mut reading = log.subscribe(None).unwrap();
        let gone = log.subscribe(None).unwrap();
        drop(gone);
        let mut dropped = 0;
        for t in 0..5 {
            dropped += log.publish(&report(t), None, &Hierarchy::default());
            assert_eq!(ids(&mut reading), vec![t as u64]);
        }
        assert_eq!(dropped, 1, "the slow viewer, once; the one that left is not counted");
        assert_eq!(log.inner.lock().unwrap().viewers.len(), 1);
    }

    #[test]
    fn a_held_event_goes_out_on_release_or_before_the_next_one_and_in_order() {
        let log = EventLog::new(8, 8);
        log.hold(report(0), None, &Hierarchy::default());
        let mut rx = log.subscribe(None).unwrap();
        log.release(&Hierarchy::default());
        assert!(ids(&mut rx).is_empty(), "nothing was held before a viewer asked");
        log.hold(report(1), Some("a".into()), &Hierarchy::default());
        assert!(ids(&mut rx).is_empty(), "held, not yet published");
        log.hold(report(2), None, &Hierarchy::default());
        assert_eq!(ids(&mut rx), vec![1], "holding the next publishes the one before");
        log.release(&Hierarchy::default());
        log.release(&Hierarchy::default());
        assert_eq!(ids(&mut rx), vec![2], "released once");
    }

    #[test]
    fn a_session_takes_at_most_max_viewers() {
        let log = EventLog::new(2, 2);
        let (_a, b) = (log.subscribe(None).unwrap(), log.subscribe(None).unwrap());
        assert_eq!(log.subscribe(None).unwrap_err(), SubscribeError::TooManyViewers(2));
        drop(b);
        assert!(log.subscribe(None).is_ok(), "a viewer that left frees its place");
    }
}
