//! Health, liveness, readiness and metrics: never rate limited, never shed.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{http::error::error_body, shutdown::Phase, state::App};

/// A probe's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    #[schema(example = "healthy")]
    pub status: &'static str,
}

/// Health check: the process is up and answering.
///
/// Kept from the original API for load balancers and uptime checks; Kubernetes uses
/// `/livez` and `/readyz`. Never rate limited.
#[utoipa::path(get, path = "/health", tag = "probes",
    responses((status = 200, description = "The service is up", body = Status, example = json!({"status": "healthy"}))))]
pub async fn health() -> Json<Status> {
    Json(Status { status: "healthy" })
}

/// Kubernetes liveness: the process is not wedged.
///
/// Deliberately checks nothing else, so a dependency outage never gets healthy pods
/// restarted. With `ADMIN_LISTEN_ADDR` set it is served on that port only (404 here).
#[utoipa::path(get, path = "/livez", tag = "probes",
    responses((status = 200, description = "Alive", body = Status, example = json!({"status": "alive"}))))]
pub async fn livez() -> Json<Status> {
    Json(Status { status: "alive" })
}

/// Kubernetes readiness: 503 while starting or draining.
///
/// Load balancers stop sending traffic before the process stops taking it; with
/// `AUTH_JWT_JWKS_URL` it is also 503 until the signing keys first load. Redis is
/// deliberately not consulted: an outage degrades the cache, it must not empty the load
/// balancer. With `ADMIN_LISTEN_ADDR` set it is served on that port only (404 here).
#[utoipa::path(get, path = "/readyz", tag = "probes",
    responses(
        (status = 200, description = "Ready for traffic", body = Status, example = json!({"status": "ready"})),
        (status = 503, description = "Starting, draining, or waiting for the first JWKS fetch", body = crate::http::routes::openapi::ErrorBody,
            example = json!({"error": "not ready: draining: shutting down"})),
    ))]
pub async fn readyz(State(app): State<Arc<App>>) -> Response {
    // Not ready until the first JWKS fetch succeeds: during a rollout, old pods keep
    // the traffic while the identity provider is unreachable, instead of new pods
    // answering every token with 503.
    let keys_loaded = app.config.auth.as_ref().is_none_or(|auth| auth.ready());
    match app.lifecycle.phase() {
        Phase::Serving if keys_loaded => Json(Status { status: "ready" }).into_response(),
        phase => {
            let why = match phase {
                Phase::Serving => "waiting for the first JWKS fetch (AUTH_JWT_JWKS_URL)",
                Phase::Starting => "starting",
                _ => "draining: shutting down",
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                error_body(&format!("not ready: {why}")),
            )
                .into_response()
        }
    }
}

/// Prometheus metrics of this instance.
///
/// The text exposition format, for a Prometheus scrape. With `ADMIN_LISTEN_ADDR` set it
/// is served on that port only (404 here).
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String)))]
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        app.metrics.render(),
    )
        .into_response()
}
