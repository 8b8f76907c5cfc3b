//! Observation of every request, outermost: the client's address, the correlation id,
//! the server span, RED metrics and the request's log line, the security headers. A
//! tower layer with a hand-written future: no boxed future, no allocation it can avoid.
//!
//! A request is counted whatever becomes of it: answered (its status), a caught panic (a
//! 500 from the layer inside), or abandoned when the client goes away (`499`, nginx's
//! "client closed request"): a drop guard, so `http_requests_in_flight` never leaks.

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, LazyLock,
    },
    task::{ready, Context, Poll},
    time::Instant,
};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{header, HeaderName, HeaderValue, Request},
    response::Response,
};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::{field::Empty, instrument::Instrumented, Instrument};

use super::{client, router::RouteLabels};
use crate::{shutdown::Phase, state::App, telemetry};

/// Status recorded for a request whose client went away before it was answered
/// (nginx's convention for "client closed request"); no response is ever sent with it.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

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
    static PREFIX: LazyLock<u64> = LazyLock::new(|| getrandom::u64().unwrap_or_default());
    static NEXT: AtomicU64 = AtomicU64::new(0);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // By hand: `format!` costs more than the rest of the id's life on this path.
    let mut id = [0u8; 32];
    for (i, digit) in id.iter_mut().enumerate() {
        let word = if i < 16 { *PREFIX } else { n };
        *digit = HEX[((word >> (60 - 4 * (i % 16))) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex digits")
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
        }
    }
}

/// The service [`ObserveLayer`] makes.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> Service<Request<Body>> for Observe<S>
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let app = &self.shared.app;
        let method = method_label(req.method());
        let route = self.shared.routes.of_path(req.uri().path());
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        let client = client::resolve(
            peer,
            req.headers().get_all("x-forwarded-for").iter(),
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
        // The inner service was made ready by `poll_ready`; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        ObserveFuture {
            inner: inner.call(req).instrument(span),
            in_flight: Some(in_flight),
        }
    }
}

pin_project! {
    /// The response of [`Observe`], finished (headers, metrics, log line) as it comes.
    pub struct ObserveFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        in_flight: Option<InFlight>,
    }
}

impl<F, B> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
{
    type Output = Result<Response<B>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
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
        headers.insert(X_REQUEST_ID, in_flight.request_id.clone());
        if draining {
            // Keep-alive clients would otherwise send their next request on a connection
            // the drain is about to close; this tells them to open a new one elsewhere.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        in_flight.finish(response.status().as_u16());
        Poll::Ready(Ok(response))
    }
}
