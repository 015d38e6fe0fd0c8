//! The gRPC service: session streams, batched steps, unary open/close, and info. Each call
//! works on the shared [`State`]; a stream's session is owned by its stream task.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesOrdered, StreamExt};
use futures::Stream;
use probe_cascade::engine::{Hidden, TokenReport};
use probe_cascade::runtime::{RuntimeError, Session, SessionId};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::convert;
use crate::metrics as m;
use crate::proto::v1 as pb;
use crate::proto::v1::probe_cascade_server::ProbeCascade;
use crate::state::{OpenError, Requested, SessionKind, State};

pub struct Service {
    pub state: Arc<State>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::SessionResponse, Status>> + Send>>;

fn open_status(e: OpenError) -> Status {
    match e {
        OpenError::Draining => {
            m::error("shutting_down");
            Status::unavailable("the server is draining: it opens no new sessions")
        }
        OpenError::Options(message) => {
            m::error("bad_request");
            Status::invalid_argument(message)
        }
        OpenError::Runtime(e @ (RuntimeError::SessionLimit { .. } | RuntimeError::StoreLimit(_))) => {
            m::error("limit");
            Status::resource_exhausted(e.to_string())
        }
        OpenError::Runtime(e @ RuntimeError::Options(_)) => {
            m::error("bad_request");
            Status::invalid_argument(e.to_string())
        }
        OpenError::Runtime(e @ RuntimeError::ShutDown) => {
            m::error("shutting_down");
            Status::unavailable(e.to_string())
        }
        OpenError::Runtime(e) => {
            m::error("internal");
            Status::internal(e.to_string())
        }
    }
}

fn result(seq: u64, outcome: pb::token_result::Outcome) -> pb::TokenResult {
    pb::TokenResult { seq, outcome: Some(outcome) }
}

fn failed(seq: u64, e: pb::Error) -> pb::TokenResult {
    m::error(convert::kind_label(e.kind()));
    result(seq, pb::token_result::Outcome::Error(e))
}

/// The answer to one observed hidden state.
fn answered(
    seq: u64,
    started: Instant,
    outcome: &Result<Result<TokenReport, RuntimeError>, Duration>,
) -> pb::TokenResult {
    match outcome {
        Ok(Ok(report)) => {
            m::token(report, started.elapsed());
            result(seq, pb::token_result::Outcome::Report(convert::report(report)))
        }
        Ok(Err(e)) => failed(seq, convert::runtime_error(e)),
        &Err(deadline) => failed(
            seq,
            convert::error(
                pb::ErrorKind::Deadline,
                format!(
                    "not answered within serve.request_deadline_ms = {} (the runtime still scores it, and it \
                     takes its token number)",
                    deadline.as_millis()
                ),
                None,
            ),
        ),
    }
}

/// Runs `fut` under the deadline (zero: none), checked on the server's shared `ticks` rather
/// than a timer of its own: a tokio timer per token woke the timer driver every time (an
/// eventfd write and a thread wake-up), which measured +30–50 µs per token on a stream.
async fn within<T>(
    deadline: Duration,
    ticks: &tokio::sync::Notify,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Duration> {
    if deadline.is_zero() {
        return Ok(fut.await);
    }
    let start = Instant::now();
    tokio::pin!(fut);
    loop {
        let tick = ticks.notified();
        tokio::select! {
            biased;
            value = &mut fut => return Ok(value),
            _ = tick => {
                if start.elapsed() >= deadline {
                    return Err(deadline);
                }
            }
        }
    }
}

fn deadline(state: &State) -> Duration {
    Duration::from_millis(state.live().config.serve.request_deadline_ms)
}

/// A size error from tonic's decoder, renamed after its config key.
fn inbound_status(s: Status, limit: usize) -> Status {
    if s.code() == tonic::Code::OutOfRange || s.message().contains("message length too large") {
        return Status::resource_exhausted(format!("serve.max_message_bytes = {limit}: {}", s.message()));
    }
    s
}

#[tonic::async_trait]
impl ProbeCascade for Service {
    type SessionStream = ResponseStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let state = self.state.clone();
        let peer = request.remote_addr().map(|a| a.to_string());
        let limit = state.live().config.serve.max_message_bytes;
        let mut inbound = request.into_inner();
        let first = inbound.message().await.map_err(|s| inbound_status(s, limit))?;
        let options = match first.and_then(|r| r.kind) {
            Some(pb::session_request::Kind::Open(o)) => o,
            _ => {
                m::error("bad_request");
                return Err(Status::invalid_argument("the first message of a Session stream must be `open`"));
            }
        };
        let requested = Requested::from_proto(&options).map_err(|e| {
            m::error("bad_request");
            Status::invalid_argument(e)
        })?;
        let (entry, session) = state.open(requested, SessionKind::Stream, peer).await.map_err(open_status)?;
        let session = session.expect("a stream session is the stream's own");
        let capacity = state.live().config.serve.stream_queue + 2;
        let (tx, rx) = mpsc::channel(capacity);
        let opened = pb::SessionOpened { session_id: entry.id.0, hidden_dim: state.runtime.pack().hidden_dim() as u32 };
        let _ = tx.send(Ok(pb::SessionResponse { kind: Some(pb::session_response::Kind::Opened(opened)) })).await;
        let span = tracing::info_span!("stream", session = entry.id.0);
        let busy = state.busy();
        tokio::spawn(
            async move {
                let _busy = busy;
                drive(&state, &session, entry.id, inbound, tx, limit).await;
                state.close(entry.id, Some(session)).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn open_session(&self, request: Request<pb::SessionOptions>) -> Result<Response<pb::SessionOpened>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string());
        let requested = Requested::from_proto(request.get_ref()).map_err(|e| {
            m::error("bad_request");
            Status::invalid_argument(e)
        })?;
        let (entry, _) = self.state.open(requested, SessionKind::Unary, peer).await.map_err(open_status)?;
        Ok(Response::new(pb::SessionOpened {
            session_id: entry.id.0,
            hidden_dim: self.state.runtime.pack().hidden_dim() as u32,
        }))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let id = SessionId(request.get_ref().session_id);
        match self.state.session(id) {
            Some(e) if e.kind == SessionKind::Stream => {
                Err(Status::failed_precondition(format!("{id} belongs to a Session stream: close the stream")))
            }
            Some(_) => {
                self.state.close(id, None).await;
                Ok(Response::new(pb::CloseSessionResponse {}))
            }
            None => Err(Status::not_found(format!("{id} is not open on this server"))),
        }
    }

    async fn observe_batch(&self, request: Request<pb::BatchRequest>) -> Result<Response<pb::BatchResponse>, Status> {
        let state = &self.state;
        if state.draining() {
            m::error("shutting_down");
            return Err(Status::unavailable("the server is draining: it takes no new calls"));
        }
        let _busy = state.busy();
        let started = Instant::now();
        let items = request.into_inner().items;
        let max = state.live().config.serve.max_batch_items;
        if items.len() > max {
            m::error("limit");
            return Err(Status::resource_exhausted(format!(
                "serve.max_batch_items = {max}: this ObserveBatch call has {} items",
                items.len()
            )));
        }
        m::batch_items(items.len());
        // Decode and look up each item; the good ones are observed together.
        let mut results: Vec<Option<pb::TokenResult>> = vec![None; items.len()];
        let mut asks = Vec::with_capacity(items.len());
        let mut asked = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let id = SessionId(item.session_id);
            let Some(entry) = state.session(id) else {
                let e = convert::error(pb::ErrorKind::UnknownSession, format!("{id} is not open on this server"), None);
                results[i] = Some(failed(i as u64, e));
                continue;
            };
            entry.touch(state);
            match convert::decode_states(item.hidden.as_ref(), &item.layers, state.runtime.pack().model_layers()) {
                Ok(states) => {
                    asks.push((id, states.into_iter().map(Hidden::from).collect()));
                    asked.push((i, entry, item.text));
                }
                Err(message) => {
                    results[i] = Some(failed(i as u64, convert::error(pb::ErrorKind::BadHidden, message, None)))
                }
            }
        }
        let scoring = within(deadline(state), &state.ticks, state.runtime.observe_batch_states(asks));
        tokio::pin!(scoring);
        // The sessions' held events (their previous tokens) go to their viewers once this step
        // is with the runtime, while it is scored; this step's are held in turn, after its
        // answers are made (see `EventLog::hold`).
        let outcome = match futures::poll!(&mut scoring) {
            std::task::Poll::Ready(outcome) => outcome,
            std::task::Poll::Pending => {
                asked.iter().for_each(|(_, entry, _)| state.release_event(entry));
                scoring.await
            }
        };
        match outcome {
            Ok(answers) => {
                for ((i, entry, text), answer) in asked.into_iter().zip(answers) {
                    entry.tokens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let outcome = Ok(answer);
                    results[i] = Some(answered(i as u64, started, &outcome));
                    if let Ok(Ok(report)) = outcome {
                        state.hold_event(&entry, report, text);
                    }
                }
            }
            Err(d) => {
                for (i, ..) in asked {
                    results[i] = Some(answered(i as u64, started, &Err(d)));
                }
            }
        }
        Ok(Response::new(pb::BatchResponse { results: results.into_iter().flatten().collect() }))
    }

    async fn pack_info(&self, _: Request<pb::PackInfoRequest>) -> Result<Response<pb::PackInfoResponse>, Status> {
        let live = self.state.live();
        let info = probe_cascade::headspace::pack_info(self.state.runtime.pack(), None, &live.config.cascade.watch);
        Ok(Response::new(pb::PackInfoResponse {
            model: info.model,
            pack: info.pack,
            total_lenses: info.total_lenses as u32,
            calibrated: info.calibrated,
            alert_threshold: info.alert_threshold,
            fields: info.fields,
            concepts: info
                .concepts
                .into_iter()
                .map(|(name, c)| {
                    let concept = pb::PackConcept {
                        label: c.label,
                        level: c.level as u32,
                        parent: c.parent,
                        description: c.description,
                    };
                    (name, concept)
                })
                .collect(),
            watch: info.watch.into_iter().map(|w| pb::WatchInfo { name: w.name, threshold: w.threshold }).collect(),
        }))
    }

    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let state = &self.state;
        let pack = state.runtime.pack();
        let h = pack.hierarchy();
        let live = state.live();
        let s = &live.config.serve;
        Ok(Response::new(pb::InfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            hidden_dim: pack.hidden_dim() as u32,
            concepts: h
                .ids()
                .map(|id| pb::Concept {
                    id: id.0,
                    name: h.name(id).into(),
                    layer: h.layer(id) as u32,
                    parents: h.parents(id).to_vec(),
                })
                .collect(),
            max_message_bytes: s.max_message_bytes as u64,
            max_sessions: live.config.runtime.max_sessions as u32,
            stream_queue: s.stream_queue as u32,
            request_deadline_ms: s.request_deadline_ms,
            max_batch_items: s.max_batch_items as u32,
            model_layers: self.state.runtime.pack().model_layers().to_vec(),
        }))
    }
}

/// A stream's loop: reads hidden states, observes them in order (up to `serve.stream_queue`
/// unanswered), and sends each answer as it comes. Ends when the client closes its side and
/// everything is answered, when the client goes, or when draining (after answering what it
/// has read).
async fn drive(
    state: &State,
    session: &Session,
    id: SessionId,
    mut inbound: Streaming<pb::SessionRequest>,
    tx: mpsc::Sender<Result<pb::SessionResponse, Status>>,
    limit: usize,
) {
    let entry = state.session(id);
    let mut drain = state.drain_signal();
    let mut pending = FuturesOrdered::new();
    let mut seq = 0u64;
    let mut reading = true;
    let mut end: Option<Status> = None;
    // An answer known at once (a refusal) waits in line behind the observes before it.
    // Each answer comes with the report and text for the session's live viewers. Viewers
    // never delay an answer: a token's event is held once its answer is sent
    // (`EventLog::hold`) and released when the stream's next hidden state has reached the
    // runtime (or on the server's tick, `State::ticks`, when none comes), so that the viewers'
    // socket work runs while that token is scored rather than on its way there.
    type Answered = Option<(TokenReport, Option<String>)>;
    let mut holding = false;
    // Has an observe been queued since the event was held? Once `pending` has been polled
    // after that (the `select!` below polls it first), the runtime has the next token.
    let mut next_queued = false;
    let release = |holding: &mut bool| {
        if std::mem::take(holding) {
            if let Some(e) = &entry {
                state.release_event(e);
            }
        }
    };
    let ready = |r: pb::TokenResult| futures::future::Either::Left(futures::future::ready((r, Answered::None)));
    let send = |r: pb::TokenResult| {
        let tx = tx.clone();
        async move { tx.send(Ok(pb::SessionResponse { kind: Some(pb::session_response::Kind::Result(r)) })).await.is_ok() }
    };
    loop {
        if !reading && pending.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some((r, report)) = pending.next(), if !pending.is_empty() => {
                let report: Answered = report;
                if let Some(e) = &entry {
                    e.tokens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    e.touch(state);
                }
                if !send(r).await {
                    m::dropped(1 + pending.len());
                    break;
                }
                if let (Some(e), Some((report, text))) = (&entry, report) {
                    holding = state.hold_event(e, report, text);
                    // A pipelining client's next token may be queued already.
                    next_queued = !pending.is_empty();
                }
            }
            _ = std::future::ready(()), if holding && next_queued => release(&mut holding),
            _ = drain.changed(), if reading => {
                reading = false;
                end = Some(Status::unavailable(format!(
                    "the server is draining: this stream was closed after answering its first {seq} hidden states"
                )));
            }
            message = inbound.message(), if reading => match message {
                Ok(Some(pb::SessionRequest {
                    kind: Some(kind @ (pb::session_request::Kind::Hidden(_) | pb::session_request::Kind::Layers(_))),
                    text,
                })) => {
                    let this = seq;
                    seq += 1;
                    // One read of the live config per message: its queue limit and deadline.
                    let live = state.live();
                    let queue = live.config.serve.stream_queue;
                    if pending.len() >= queue {
                        let message = format!(
                            "serve.stream_queue = {queue}: this stream has {} hidden states unanswered",
                            pending.len()
                        );
                        pending.push_back(ready(failed(this, convert::error(pb::ErrorKind::Limit, message, None))));
                        continue;
                    }
                    let model_layers = state.runtime.pack().model_layers();
                    let decoded = match &kind {
                        pb::session_request::Kind::Layers(l) => convert::decode_states(None, &l.layers, model_layers),
                        pb::session_request::Kind::Hidden(h) => convert::decode_states(Some(h), &[], model_layers),
                        pb::session_request::Kind::Open(_) => Err("`open` again".into()),
                    };
                    match decoded {
                        Ok(states) => {
                            let started = Instant::now();
                            let d = Duration::from_millis(live.config.serve.request_deadline_ms);
                            let states: Vec<Hidden> = states.into_iter().map(Hidden::from).collect();
                            next_queued = true;
                            pending.push_back(futures::future::Either::Right(async move {
                                let observed = session.observe_states(states);
                                let outcome = within(d, &state.ticks, observed).await;
                                let answer = answered(this, started, &outcome);
                                let report: Answered = outcome.ok().and_then(Result::ok).map(|r| (r, text));
                                (answer, report)
                            }));
                        }
                        Err(message) => {
                            pending.push_back(ready(failed(this, convert::error(pb::ErrorKind::BadHidden, message, None))))
                        }
                    }
                }
                Ok(Some(_)) => {
                    let this = seq;
                    seq += 1;
                    let message =
                        "after `open`, every message of a Session stream must be `hidden` (or `layers`)".to_string();
                    pending.push_back(ready(failed(this, convert::error(pb::ErrorKind::BadHidden, message, None))));
                }
                Ok(None) => reading = false,
                Err(status) => {
                    // A decode error (an oversized or malformed message) or a broken connection:
                    // answer what was read, then end with the reason.
                    reading = false;
                    m::error(if status.code() == tonic::Code::Cancelled { "disconnect" } else { "bad_request" });
                    end = Some(inbound_status(status, limit));
                }
            }
        }
    }
    release(&mut holding);
    if let Some(status) = end {
        let _ = tx.send(Err(status)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_past_the_deadline_gets_an_error_naming_the_key() {
        let ticks = std::sync::Arc::new(tokio::sync::Notify::new());
        let ticker = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                ticker.notify_waiters();
            }
        });
        let pending = futures::future::pending::<Result<TokenReport, RuntimeError>>();
        let started = Instant::now();
        let late = within(Duration::from_millis(5), &ticks, pending).await;
        assert!(started.elapsed() >= Duration::from_millis(5));
        let r = answered(3, Instant::now(), &late);
        assert_eq!(r.seq, 3);
        let Some(pb::token_result::Outcome::Error(e)) = r.outcome else { panic!("{r:?}") };
        assert_eq!(e.kind(), pb::ErrorKind::Deadline);
        assert!(e.message.contains("serve.request_deadline_ms = 5"), "{}", e.message);
        // Zero: no deadline.
        assert_eq!(within(Duration::ZERO, &ticks, async { 7 }).await, Ok(7));
        assert_eq!(within(Duration::from_secs(9), &ticks, async { 8 }).await, Ok(8));
    }

    #[test]
    fn oversized_messages_are_named_after_their_key() {
        let s = inbound_status(Status::out_of_range("Error, decoded message length too large: found 9 bytes"), 8);
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().starts_with("serve.max_message_bytes = 8: "), "{}", s.message());
        assert_eq!(inbound_status(Status::cancelled("gone"), 8).code(), tonic::Code::Cancelled);
    }
}
