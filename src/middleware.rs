//! The request pipeline around the handlers: observation (client, span, RED metrics, the
//! request log line), load shedding, the request deadline and the rate limit.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use axum::{
    extract::{ConnectInfo, MatchedPath, Request, State},
    http::{header, HeaderName, HeaderValue},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tracing::{field::Empty, Instrument};

use crate::{
    app::App,
    error::ApiError,
    ratelimit::{client, ClientKey, Decision},
    telemetry,
};

/// The resolved client address of a request, for handlers and later middleware.
#[derive(Debug, Clone, Copy)]
pub struct Client(pub IpAddr);

/// Routes as metric labels: the closed set of templates, so no request adds a series.
const ROUTES: &[&str] = &[
    "/fibonacci",
    "/health",
    "/livez",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

fn route_label(path: Option<&MatchedPath>) -> &'static str {
    path.and_then(|p| ROUTES.iter().find(|r| **r == p.as_str()).copied())
        .unwrap_or("unmatched")
}

fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Resolves the client, runs the request inside its server span, and records its
/// metrics and log line. Outermost, so it sees every response, errors included.
pub async fn observe(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = route_label(req.extensions().get::<MatchedPath>());
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let client = client::resolve(
        peer,
        req.headers().get_all("x-forwarded-for").iter(),
        &app.config.trusted_proxies,
    );
    req.extensions_mut().insert(Client(client));
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method,
        http.route = route,
        url.path = %req.uri().path(),
        client.address = %client,
        http.response.status_code = Empty,
    );
    telemetry::continue_trace(&span, req.headers());

    app.metrics.in_flight().increment(1.0);
    let response = next.run(req).instrument(span.clone()).await;
    app.metrics.in_flight().decrement(1.0);

    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    app.metrics
        .record_request(method, route, status, elapsed.as_secs_f64());
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    span.in_scope(|| {
        tracing::info!(
            method,
            route,
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            client = %client,
            "request"
        )
    });
    response
}

/// Answers 503 at once when `MAX_IN_FLIGHT` requests are already being served, instead
/// of queueing without bound; applied to the API, not to probes or metrics.
pub async fn shed_load(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    match app.in_flight.try_acquire() {
        Ok(_permit) => next.run(req).await,
        Err(_) => ApiError::Overloaded.into_response(),
    }
}

/// Bounds each API request by `REQUEST_TIMEOUT_MS`.
pub async fn deadline(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(app.config.request_timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// Whole seconds, rounded up: a client that waits this long is allowed.
fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// Applies the per-client limits and adds the IETF draft `RateLimit-*` headers.
pub async fn rate_limit(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(limiter) = &app.limiter else {
        return next.run(req).await;
    };
    let client = req
        .extensions()
        .get::<Client>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0);
    let decision = limiter.check(ClientKey::of(client)).await;
    let (mut response, limit, remaining, reset) = match decision {
        Decision::Allowed {
            remaining,
            limit,
            reset,
        } => (
            next.run(req).await,
            u64::from(limit),
            remaining,
            ceil_secs(reset),
        ),
        Decision::Rejected {
            window,
            retry_after,
        } => {
            let secs = ceil_secs(retry_after);
            tracing::warn!(
                event = "rate_limited",
                client = %client,
                window = window.unit.name(),
                limit = window.limit,
                retry_after_s = secs,
                "rate limit exceeded"
            );
            let error = ApiError::RateLimited {
                message: format!(
                    "rate limit exceeded: {} requests per {}; retry in {secs} s",
                    window.limit,
                    window.unit.name()
                ),
                retry_after_secs: secs,
            };
            (error.into_response(), u64::from(window.limit), 0, secs)
        }
    };
    let headers = response.headers_mut();
    headers.insert(RATELIMIT_LIMIT, HeaderValue::from(limit));
    headers.insert(RATELIMIT_REMAINING, HeaderValue::from(remaining));
    headers.insert(RATELIMIT_RESET, HeaderValue::from(reset));
    headers.insert(RATELIMIT_POLICY, limiter.policy_header().clone());
    response
}

/// Headers every response carries.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}
