//! The request pipeline around the handlers: observation (client, span, RED metrics, the
//! request log line, security headers) on every route, and admission (load shedding,
//! the rate limit) on the API. Each is one function: every layer of middleware costs
//! a boxed future per request, and this is the hot path.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{header, HeaderName, HeaderValue},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tracing::{field::Empty, Instrument};

use crate::{
    app::App,
    auth::{AuthError, Outcome},
    error::ApiError,
    metrics::RATE_LIMIT_REJECTIONS,
    ratelimit::{client, ClientKey, Decision},
    shutdown::Phase,
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

/// Marks a response from the router's fallback: no route matched.
#[derive(Debug, Clone, Copy)]
pub struct Unmatched;

/// Every route is a static path, so the path names the route template (as
/// `MatchedPath` would) without waiting for routing; anything else is `unmatched`.
fn route_label(path: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|r| **r == path)
        .copied()
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

/// The correlation id of a request: the caller's `X-Request-Id` if it is sane, else one
/// of ours; echoed, logged and put on the span.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether an incoming id can be trusted into logs and headers: 1 to 64 characters of
/// `[A-Za-z0-9._:-]` (UUIDs, ULIDs, trace ids, the usual proxy formats).
fn is_sane_request_id(id: &HeaderValue) -> bool {
    let bytes = id.as_bytes();
    (1..=64).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A fresh id: this process's random prefix and a counter, 32 hex digits. Unique without
/// a random draw per request; unpredictability is not needed of a correlation id.
fn new_request_id() -> HeaderValue {
    static PREFIX: std::sync::LazyLock<u64> =
        std::sync::LazyLock::new(|| getrandom::u64().unwrap_or_default());
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    HeaderValue::try_from(format!("{:016x}{n:016x}", *PREFIX)).expect("hex digits")
}

/// Status recorded for a request whose client went away before it was answered
/// (nginx's convention for "client closed request"); no response is ever sent with it.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// A request being served: counted in flight while it lives, and if it is dropped
/// unanswered (the client went away, the connection was cut), still counted, logged
/// and measured, as 499, so the gauge never leaks and no request goes unseen.
struct InFlight<'a> {
    app: &'a App,
    method: &'static str,
    route: &'static str,
    started: Instant,
    client: IpAddr,
    request_id: HeaderValue,
    span: tracing::Span,
    answered: bool,
}

impl<'a> InFlight<'a> {
    fn start(
        app: &'a App,
        method: &'static str,
        route: &'static str,
        client: IpAddr,
        request_id: HeaderValue,
        span: tracing::Span,
    ) -> Self {
        app.metrics.in_flight().increment(1.0);
        Self {
            app,
            method,
            route,
            started: Instant::now(),
            client,
            request_id,
            span,
            answered: false,
        }
    }

    /// Records the outcome: RED metrics, the span's status, the request's log line.
    fn finish(&mut self, status: u16) {
        self.answered = true;
        self.app.metrics.in_flight().decrement(1.0);
        let elapsed = self.started.elapsed();
        let (method, route, client) = (self.method, self.route, self.client);
        // Sane by construction: ASCII.
        let request_id = self.request_id.to_str().unwrap_or_default();
        self.app
            .metrics
            .record_request(method, route, status, elapsed.as_secs_f64());
        self.span.record("http.response.status_code", status);
        if status >= 500 {
            self.span.record("otel.status_code", "ERROR");
        }
        self.span.in_scope(|| {
            tracing::info!(
                method,
                route,
                status,
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                client = %client,
                request_id,
                "request"
            )
        });
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.finish(CLIENT_CLOSED_REQUEST);
        }
    }
}

/// Resolves the client, runs the request inside its server span, records its metrics
/// and log line, and adds the security headers. Outermost, so it sees every response,
/// errors and caught panics included, and every request, answered or abandoned.
pub async fn observe(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let method = method_label(req.method());
    let route = route_label(req.uri().path());
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
    let request_id = match req.headers().get(X_REQUEST_ID) {
        Some(id) if is_sane_request_id(id) => id.clone(),
        _ => new_request_id(),
    };
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method,
        http.route = route,
        url.path = %req.uri().path(),
        client.address = %client,
        "http.request.header.x-request-id" = request_id.to_str().unwrap_or_default(),
        http.response.status_code = Empty,
    );
    telemetry::continue_trace(&span, req.headers());

    let mut in_flight = InFlight::start(&app, method, route, client, request_id, span.clone());
    let mut response = next.run(req).instrument(span).await;
    add_security_headers(&mut response);
    response
        .headers_mut()
        .insert(X_REQUEST_ID, in_flight.request_id.clone());
    if app.lifecycle.phase() == Phase::Draining {
        // Keep-alive clients would otherwise send their next request on a connection
        // the drain is about to close; this tells them to open a new one elsewhere.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if response.extensions().get::<Unmatched>().is_some() {
        in_flight.route = "unmatched";
    }
    in_flight.finish(response.status().as_u16());
    response
}

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// The one value of a header that must not repeat; a repeated one (two `Authorization`
/// lines: which would a proxy have checked?) counts as malformed.
fn single(headers: &http::HeaderMap, name: HeaderName) -> Option<&HeaderValue> {
    static MALFORMED: HeaderValue = HeaderValue::from_static("repeated");
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (one, None) => one,
        _ => Some(&MALFORMED),
    }
}

/// Whole seconds, rounded up: a client that waits this long is allowed.
fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// Admission to the API: sheds load (503 at once when `MAX_IN_FLIGHT` requests are
/// already being served, instead of queueing without bound), authenticates (when JWT
/// auth is on), then applies the per-client limits and adds the IETF draft
/// `RateLimit-*` headers. Probes and metrics do not pass through here.
pub async fn admit(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Ok(_permit) = app.in_flight.try_acquire() else {
        return ApiError::Overloaded.into_response();
    };
    let client = req
        .extensions()
        .get::<Client>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0);
    let address = ClientKey::of(client);
    let (identity, throttled) = match &app.config.auth {
        None => (Ok(address.clone()), None),
        Some(auth) => match auth
            .authenticate(single(req.headers(), header::AUTHORIZATION), &address)
            .await
        {
            Outcome::Subject(subject) => (Ok(ClientKey::Subject(subject)), None),
            Outcome::Refused(AuthError::Unavailable) => {
                return ApiError::AuthUnavailable.into_response()
            }
            Outcome::Refused(e) => (Err(e), None),
            Outcome::Throttled(decision) => (Err(AuthError::NotChecked), Some(decision)),
        },
    };
    // A failed authentication is counted against the address, so guessing is limited too.
    let key = identity.clone().unwrap_or_else(|_| address.clone());
    let Some(limiter) = &app.limiter else {
        return run_authenticated(identity, client, req, next).await;
    };
    let decision = match throttled {
        // The limiter's own answer of a moment ago, reached without a signature check.
        Some(decision) => {
            if let Decision::Rejected { window, .. } = &decision {
                app.metrics
                    .scope(
                        || metrics::counter!(RATE_LIMIT_REJECTIONS, "window" => window.unit.name()),
                    )
                    .increment(1);
            }
            decision
        }
        None => {
            let decision = limiter.check(&key).await;
            if let (
                Decision::Rejected {
                    window,
                    retry_after,
                    shared,
                },
                Err(_),
                Some(auth),
            ) = (&decision, &identity, &app.config.auth)
            {
                // A /48 over its shared budget is remembered as the /48: rotating its
                // /64s must not bring the signature work back.
                let refused = match (shared, address.net48()) {
                    (true, Some(net48)) => net48,
                    _ => address.clone(),
                };
                auth.throttle(&refused, *window, *retry_after);
            }
            decision
        }
    };
    let (mut response, limit, remaining, reset) = match decision {
        Decision::Allowed {
            remaining,
            limit,
            reset,
        } => (
            run_authenticated(identity, client, req, next).await,
            u64::from(limit),
            remaining,
            ceil_secs(reset),
        ),
        Decision::Rejected {
            window,
            retry_after,
            ..
        } => {
            let secs = ceil_secs(retry_after);
            tracing::warn!(
                event = "rate_limited",
                client = %client,
                key = %key,
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

/// Runs the request if it is authenticated; otherwise answers 401 and says so in the
/// logs (the reason and the client, never the token).
async fn run_authenticated(
    identity: Result<ClientKey, AuthError>,
    client: IpAddr,
    req: Request,
    next: Next,
) -> Response {
    match identity {
        Ok(_) => next.run(req).await,
        Err(e) => {
            tracing::warn!(event = "auth_rejected", client = %client, reason = e.reason(), "authentication failed");
            ApiError::Unauthorized(e).into_response()
        }
    }
}

/// Headers every response carries.
fn add_security_headers(response: &mut Response) {
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
}
