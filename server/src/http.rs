//! HTTP on its own port (axum): Prometheus metrics, health and readiness, read-only views of
//! the pack and the sessions, their live events, and the viewer page at `/`. `/v1/*` needs the
//! bearer token when one is set; `/metrics`, the health checks and the page (which holds no
//! data) do not, so that scrapers and orchestrators need no secret.

use std::sync::Arc;

use axum::extract::{Path as AxumPath, Query, State as AxumState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::auth::BearerToken;
use crate::state::State;

#[derive(Clone)]
struct Http {
    state: Arc<State>,
    token: BearerToken,
}

pub fn router(state: Arc<State>, token: BearerToken) -> Router {
    Router::new()
        .route("/", get(viewer))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/pack", get(pack))
        .route("/v1/pack/headspace", get(headspace_pack))
        .route("/v1/sessions", get(sessions))
        .route("/v1/sessions/{id}/events", get(events))
        .with_state(Http { state, token })
}

async fn metrics(AxumState(h): AxumState<Http>) -> Response {
    let cache = h.state.runtime.cache_stats().await.ok();
    let steps = h.state.runtime.step_stats().await.ok();
    let body = crate::metrics::render(cache.as_ref(), steps.as_ref(), h.state.open_sessions());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// Alive: the runtime's step scheduler answers.
async fn healthz(AxumState(h): AxumState<Http>) -> Response {
    match h.state.runtime.step_stats().await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("the runtime does not answer: {e}\n")).into_response(),
    }
}

/// Ready: alive, and not draining.
async fn readyz(AxumState(h): AxumState<Http>) -> Response {
    if h.state.draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    healthz(AxumState(h)).await
}

/// The 401 answer, unless the request carries the bearer token (or none is set).
fn unauthorized(h: &Http, headers: &HeaderMap) -> Option<Response> {
    let why = h.token.check(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes())).err()?;
    crate::metrics::error("unauthenticated");
    Some((StatusCode::UNAUTHORIZED, format!("{why}\n")).into_response())
}

/// The pack's metadata and hierarchy (`probe_cascade::viewer::PackView`, what the viewer reads).
async fn pack(AxumState(h): AxumState<Http>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&h, &headers) {
        return r;
    }
    let pack = h.state.runtime.pack().clone();
    let live = h.state.live();
    Json(probe_cascade::viewer::PackView::new(&pack).watching(&live.config.cascade.watch)).into_response()
}

/// The live viewer (`probe_cascade::viewer`). The page holds no data: what it shows comes from
/// the `/v1/` routes, which ask for the bearer token where one is set (the page asks for it).
async fn viewer() -> Response {
    static PAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let page = PAGE.get_or_init(probe_cascade::viewer::live_page).as_str();
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], page).into_response()
}

/// The pack as headspace's own `GET /v1/pack` gives it (`probe_cascade::headspace::pack_info`).
async fn headspace_pack(AxumState(h): AxumState<Http>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&h, &headers) {
        return r;
    }
    let live = h.state.live();
    Json(probe_cascade::headspace::pack_info(h.state.runtime.pack(), None, &live.config.cascade.watch)).into_response()
}

async fn sessions(AxumState(h): AxumState<Http>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&h, &headers) {
        return r;
    }
    Json(h.state.session_views()).into_response()
}

#[derive(serde::Deserialize)]
struct After {
    /// The id of the last event seen, as `Last-Event-ID` gives it (for clients that cannot set
    /// headers).
    after: Option<u64>,
}

/// Counts a viewer while it is connected.
struct Viewer;

impl Viewer {
    fn new() -> Self {
        crate::metrics::viewers(1.0);
        Viewer
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        crate::metrics::viewers(-1.0);
    }
}

/// A session's tokens as server-sent events, one JSON event per token (`crate::events`),
/// from after `Last-Event-ID` (or `?after=`) when given. The stream ends when the session
/// closes. The session puts each event straight into this viewer's bounded queue (the backlog
/// and `serve.viewer_buffer` more); a viewer that stops reading fills it and is dropped at
/// once (counted in `probe_cascade_viewers_dropped_total`; it may reconnect and resume),
/// without waiting for its socket, and the session never waits for a viewer. More than
/// `serve.max_viewers` at once: 429.
async fn events(
    AxumState(h): AxumState<Http>,
    AxumPath(id): AxumPath<u64>,
    Query(query): Query<After>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = unauthorized(&h, &headers) {
        return r;
    }
    let Some(entry) = h.state.session(probe_cascade::runtime::SessionId(id)) else {
        return (StatusCode::NOT_FOUND, format!("session {id} is not open on this server\n")).into_response();
    };
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let rx = match entry.events.subscribe(last.or(query.after)) {
        Ok(rx) => rx,
        Err(e) => {
            crate::metrics::error("limit");
            return (StatusCode::TOO_MANY_REQUESTS, format!("session {id}: {e}\n")).into_response();
        }
    };
    drop(entry);
    let viewer = Viewer::new();
    let sse = |e: crate::events::Event| {
        Ok::<_, std::convert::Infallible>(SseEvent::default().id(e.id.to_string()).data(&*e.data))
    };
    // A first comment goes out at once, so that the viewer knows its subscription is in place
    // (every later token reaches it) without waiting for a token or a keep-alive.
    let hello = futures::stream::once(async { Ok(SseEvent::default().comment("subscribed")) });
    let events = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), move |e| {
        let _counted = &viewer;
        sse(e)
    });
    let stream = futures::StreamExt::chain(hello, events);
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}
