//! Observation of every request, outermost: the client's address, the correlation id,
//! the server span, RED metrics and the request's log line, the security headers, and a
//! handler's panic turned into a 500. A tower layer with a hand-written future: no boxed
//! future, no allocation it can avoid.
//!
//! A request is counted whatever becomes of it: answered (its status), a caught panic (a
//! 500), or abandoned when the client goes away (`499`, nginx's "client closed request"):
//! a drop guard, so `http_requests_in_flight` never leaks.

use std::{
    any::Any,
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    panic::{catch_unwind, AssertUnwindSafe},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, LazyLock,
    },
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    body::{Body, HttpBody},
    http::{header, HeaderName, HeaderValue, Request},
    response::{IntoResponse, Response},
    BoxError,
};
use bytes::Bytes;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::{field::Empty, instrument::Instrumented, Instrument};

use super::{client, error::ApiError, router::RouteLabels};
use crate::{shutdown::Phase, state::App, telemetry};

/// Status recorded for a request whose client went away before it was answered
/// (nginx's convention for "client closed request"); no response is ever sent with it.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// The correlation id of a request: the caller's `X-Request-Id` if it is sane, else one
/// of ours; echoed, logged and put on the span.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Made once: a name given as a string is parsed and validated at every lookup.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

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
    static PREFIX: LazyLock<[u8; 16]> = LazyLock::new(|| hex(getrandom::u64().unwrap_or_default()));
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(&*PREFIX);
    id[16..].copy_from_slice(&hex(NEXT.fetch_add(1, Ordering::Relaxed)));
    HeaderValue::from_bytes(&id).expect("hex digits")
}

/// The 16 hex digits of `word`, by hand: `format!` costs more than the rest of the id's
/// life on this path.
fn hex(word: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    for (i, digit) in digits.iter_mut().enumerate() {
        *digit = HEX[((word >> (60 - 4 * i)) & 0xf) as usize];
    }
    digits
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

/// Headers every response carries, built once.
const SECURITY_HEADERS: [(HeaderName, HeaderValue); 3] = [
    (
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    ),
    (
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    ),
    (
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    ),
];

/// A request being served: counted in flight while it lives, and if it is dropped
/// unanswered (the client went away, the connection was cut), still counted, logged
/// and measured, as 499.
struct InFlight {
    app: Arc<App>,
    method: &'static str,
    route: &'static str,
    started: Instant,
    client: IpAddr,
    request_id: HeaderValue,
    span: tracing::Span,
    answered: bool,
}

impl InFlight {
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

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.answered {
            self.finish(CLIENT_CLOSED_REQUEST);
        }
    }
}

/// Observation of every request (see the module).
#[derive(Clone)]
pub struct ObserveLayer {
    shared: Arc<Shared>,
}

/// What every request's observation reads; one `Arc`, as the router clones the service
/// per request.
struct Shared {
    app: Arc<App>,
    routes: Arc<RouteLabels>,
}

impl ObserveLayer {
    /// Observes with `routes` as the label set.
    pub fn new(app: &Arc<App>, routes: Arc<RouteLabels>) -> Self {
        Self {
            shared: Arc::new(Shared {
                app: app.clone(),
                routes,
            }),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            shared: self.shared.clone(),
            peer: IpAddr::from([0, 0, 0, 0]),
        }
    }
}

/// The service [`ObserveLayer`] makes: what every listener serves.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    shared: Arc<Shared>,
    /// The connection's peer ([`Observe::serving`]); 0.0.0.0 when a test drives the
    /// service directly.
    peer: IpAddr,
}

impl<S: Clone> Observe<S> {
    /// This service for the requests of one connection, from `peer`.
    pub fn serving(&self, peer: SocketAddr) -> Self {
        Self {
            peer: peer.ip(),
            ..self.clone()
        }
    }
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The inner service was made ready by `poll_ready`; a fresh clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        self.start(inner, req)
    }
}

/// hyper serves a connection through this directly (`Observe::serving`): hyper-util's
/// `TowerToHyperService` would take each request through a `Oneshot` state machine that
/// moves the request and then the whole response future between its states. Nothing in
/// the stack ever waits to be ready (axum's `Router` is always ready and every layer
/// only asks the one inside it), so there is no readiness to wait for.
impl<S, B> hyper::service::Service<Request<B>> for Observe<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn call(&self, req: Request<B>) -> Self::Future {
        let mut inner = self.inner.clone();
        debug_assert!(
            inner
                .poll_ready(&mut Context::from_waker(std::task::Waker::noop()))
                .is_ready(),
            "the stack is always ready"
        );
        self.start(inner, req)
    }
}

impl<S: Clone> Observe<S> {
    /// Observes `req` on its way through `inner`, a ready clone of the inner service.
    fn start<B>(&self, mut inner: S, req: Request<B>) -> ObserveFuture<S::Future>
    where
        S: Service<Request<Body>, Response = Response, Error = Infallible>,
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Already a `Body` (a test's request) is taken as it is, not boxed again.
        let mut req = req.map(Body::new);
        let app = &self.shared.app;
        let method = method_label(req.method());
        let route = self.shared.routes.of_path(req.uri().path());
        let client = client::resolve(
            self.peer,
            req.headers().get_all(X_FORWARDED_FOR).iter(),
            &app.config.trusted_proxies,
        );
        req.extensions_mut().insert(client::Client(client));
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
        app.metrics.in_flight().increment(1.0);
        let in_flight = InFlight {
            app: app.clone(),
            method,
            route,
            started: Instant::now(),
            client,
            request_id,
            span: span.clone(),
            answered: false,
        };
        let state = match catch_unwind(AssertUnwindSafe(|| inner.call(req))) {
            Ok(future) => State::Running {
                future: future.instrument(span),
            },
            Err(cause) => State::Panicked {
                response: Some(span.in_scope(|| panic_response(cause))),
            },
        };
        ObserveFuture {
            state,
            in_flight: Some(in_flight),
        }
    }
}

/// A panic becomes an opaque JSON 500 (logged), never a dropped connection.
fn panic_response(cause: Box<dyn Any + Send + 'static>) -> Response {
    let cause = cause
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| cause.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    ApiError::Internal(format!("handler panicked: {cause}")).into_response()
}

pin_project! {
    /// The response of [`Observe`], finished (headers, metrics, log line) as it comes.
    pub struct ObserveFuture<F> {
        #[pin]
        state: State<F>,
        in_flight: Option<InFlight>,
    }
}

pin_project! {
    /// The inner service's response on its way, or the 500 of its panic.
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] future: Instrumented<F> },
        Panicked { response: Option<Response> },
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.state.project() {
            StateProj::Running { future } => {
                match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(Ok(response))) => response,
                    Err(cause) => {
                        let span = &this.in_flight.as_ref().expect("not finished").span;
                        span.in_scope(|| panic_response(cause))
                    }
                }
            }
            StateProj::Panicked { response } => response.take().expect("polled after completion"),
        };
        let mut in_flight = this.in_flight.take().expect("polled after completion");
        let draining = in_flight.app.lifecycle.phase() == Phase::Draining;
        let headers = response.headers_mut();
        // Only what this adds: a reserve past the map's capacity doubles it, and a map the
        // route sized for every header (`routes::fibonacci::answer`) would be copied into
        // one twice as large on every request.
        headers.reserve(SECURITY_HEADERS.len() + 1 + usize::from(draining));
        for (name, value) in SECURITY_HEADERS {
            // A route that needs a policy of its own (the docs page runs scripts) sets it.
            headers.entry(name).or_insert(value);
        }
        if draining {
            // Keep-alive clients would otherwise send their next request on a connection
            // the drain is about to close; this tells them to open a new one elsewhere.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        in_flight.finish(response.status().as_u16());
        // Moved, not cloned, once logged: a clone of a fresh id's bytes allocates.
        let request_id = std::mem::replace(&mut in_flight.request_id, HeaderValue::from_static(""));
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        Poll::Ready(Ok(response))
    }
}
