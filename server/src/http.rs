//! HTTP on its own port (axum): Prometheus metrics, health and readiness, and read-only views
//! of the pack and the sessions. `/v1/*` needs the bearer token when one is set; `/metrics`
//! and the health checks do not, so that scrapers and orchestrators need no secret.

use std::sync::Arc;

use axum::extract::State as AxumState;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::auth::BearerToken;
use crate::state::State;

#[derive(Clone)]
struct Http {
    state: Arc<State>,
    token: BearerToken,
}

pub fn router(state: Arc<State>, token: BearerToken) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/pack", get(pack))
        .route("/v1/pack/headspace", get(headspace_pack))
        .route("/v1/sessions", get(sessions))
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

#[derive(Serialize)]
struct ConceptView<'a> {
    id: u32,
    name: &'a str,
    layer: u16,
    parents: Vec<&'a str>,
    children: Vec<&'a str>,
}

#[derive(Serialize)]
struct LayerView {
    layer: u16,
    concepts: usize,
}

#[derive(Serialize)]
struct PackView<'a> {
    dir: String,
    hidden_dim: usize,
    dtype: String,
    concepts: usize,
    layers: Vec<LayerView>,
    hierarchy: Vec<ConceptView<'a>>,
}

async fn pack(AxumState(h): AxumState<Http>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&h, &headers) {
        return r;
    }
    let pack = h.state.runtime.pack().clone();
    let hier = pack.hierarchy();
    let names = |ids: &[u32]| ids.iter().map(|&i| hier.name(probe_cascade::pack::ConceptId(i))).collect();
    let view = PackView {
        dir: pack.dir().display().to_string(),
        hidden_dim: pack.hidden_dim(),
        dtype: format!("{:?}", pack.dtype()).to_lowercase(),
        concepts: pack.len(),
        layers: (0..hier.layer_count() as u16)
            .map(|layer| LayerView { layer, concepts: hier.layer_members(layer).len() })
            .collect(),
        hierarchy: hier
            .ids()
            .map(|id| ConceptView {
                id: id.0,
                name: hier.name(id),
                layer: hier.layer(id),
                parents: names(hier.parents(id)),
                children: names(hier.children(id)),
            })
            .collect(),
    };
    Json(view).into_response()
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
