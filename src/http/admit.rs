//! Admission to the API: load shedding (503 at once when `MAX_IN_FLIGHT` requests are
//! being served, rather than queueing without bound), authentication (when JWT auth is
//! on), then the per-client limits, with the IETF draft `RateLimit-*` headers on every
//! answer. Probes and metrics never pass through here.
//!
//! A tower layer: with the limiter in process and no authentication (every decision
//! immediate) a request costs no boxed future; a Redis call or a token check, which
//! wait anyway, take the general path.

use std::{
    convert::Infallible,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, LazyLock},
    task::{ready, Context, Poll},
};

use axum::{
    body::Body,
    http::{header, HeaderMap, HeaderName, HeaderValue, Request},
    response::{IntoResponse, Response},
};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service, ServiceExt};

use super::{client::Client, error::ApiError, router::RouteLabels};
use crate::{
    auth::{AuthError, Outcome},
    ratelimit::{ClientKey, Decision},
    state::App,
};

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// A header value for a count or a number of seconds; the small ones (nearly all of
/// them) are made once and shared, not formatted per response.
fn number(value: u64) -> HeaderValue {
    static SMALL: LazyLock<Vec<HeaderValue>> =
        LazyLock::new(|| (0..4096u64).map(HeaderValue::from).collect());
    usize::try_from(value)
        .ok()
        .and_then(|i| SMALL.get(i))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(value))
}

/// Whole seconds, rounded up: a client that waits this long is allowed.
fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// The one value of a header that must not repeat; a repeated one (two `Authorization`
/// lines: which would a proxy have checked?) counts as malformed.
fn single(headers: &HeaderMap, name: HeaderName) -> Option<&HeaderValue> {
    static MALFORMED: HeaderValue = HeaderValue::from_static("repeated");
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (one, None) => one,
        _ => Some(&MALFORMED),
    }
}

/// The `RateLimit-*` values of an answer.
#[derive(Clone, Copy)]
struct Quota {
    limit: u64,
    remaining: u64,
    reset: u64,
}

impl Quota {
    fn of(decision: &Decision) -> Self {
        match *decision {
            Decision::Allowed {
                remaining,
                limit,
                reset,
            } => Self {
                limit: u64::from(limit),
                remaining,
                reset: ceil_secs(reset),
            },
            Decision::Rejected {
                window,
                retry_after,
                ..
            } => Self {
                limit: u64::from(window.limit),
                remaining: 0,
                reset: ceil_secs(retry_after),
            },
        }
    }

    fn write(self, policy: &HeaderValue, response: &mut Response) {
        let headers = response.headers_mut();
        headers.insert(RATELIMIT_LIMIT, number(self.limit));
        headers.insert(RATELIMIT_REMAINING, number(self.remaining));
        headers.insert(RATELIMIT_RESET, number(self.reset));
        headers.insert(RATELIMIT_POLICY, policy.clone());
    }
}

/// The 429 for a rejection, logged as the audit trail says.
fn rejected(decision: &Decision, client: IpAddr, key: &ClientKey) -> Response {
    let Decision::Rejected {
        window,
        retry_after,
        ..
    } = decision
    else {
        unreachable!("only rejections are answered here")
    };
    let secs = ceil_secs(*retry_after);
    tracing::warn!(
        event = "rate_limited",
        client = %client,
        key = %key,
        window = window.unit.name(),
        limit = window.limit,
        retry_after_s = secs,
        "rate limit exceeded"
    );
    ApiError::RateLimited {
        message: format!(
            "rate limit exceeded: {} requests per {}; retry in {secs} s",
            window.limit,
            window.unit.name()
        ),
        retry_after_secs: secs,
    }
    .into_response()
}

/// Admission (see the module), for the routes declared admitted.
#[derive(Clone)]
pub struct AdmitLayer {
    shared: Arc<Shared>,
}

/// What every request's admission reads. Behind one `Arc` because the router clones the
/// service for every request: one reference count, not five.
struct Shared {
    app: Arc<App>,
    routes: Arc<RouteLabels>,
    /// Labels (interned: compared by address) of the routes behind admission.
    admitted: Box<[&'static str]>,
    /// Permits for API requests being served; see `MAX_IN_FLIGHT`.
    permits: Arc<Semaphore>,
    /// The `RateLimit-Policy` value, made once.
    policy: Option<HeaderValue>,
}

impl AdmitLayer {
    /// Admission for `app`'s configuration, on the `admitted` routes of `routes`.
    pub fn new(app: &Arc<App>, routes: Arc<RouteLabels>, admitted: Vec<&'static str>) -> Self {
        let shared = Shared {
            app: app.clone(),
            routes,
            admitted: admitted.into(),
            permits: Arc::new(Semaphore::new(app.config.max_in_flight)),
            policy: app.limiter.as_ref().map(|limiter| {
                HeaderValue::from_str(&limiter.policy().header()).expect("digits and separators")
            }),
        };
        Self {
            shared: Arc::new(shared),
        }
    }
}

impl<S> Layer<S> for AdmitLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Admit<S> {
        Admit {
            inner,
            layer: self.shared.clone(),
        }
    }
}

/// The service [`AdmitLayer`] makes.
#[derive(Clone)]
pub struct Admit<S> {
    inner: S,
    layer: Arc<Shared>,
}

impl<S> Service<Request<Body>> for Admit<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = AdmitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let route = self.layer.routes.of_path(req.uri().path());
        if !self.layer.admitted.iter().any(|a| std::ptr::eq(*a, route)) {
            return AdmitFuture::Inner {
                inner: self.inner.call(req),
                permit: None,
                quota: None,
                policy: None,
            };
        }
        let Ok(permit) = self.layer.permits.clone().try_acquire_owned() else {
            return AdmitFuture::ready(ApiError::Overloaded.into_response());
        };
        let client = req
            .extensions()
            .get::<Client>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0);
        let app = &self.layer.app;
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if app.config.auth.is_none() {
            let immediate = match &app.limiter {
                None => Some(None),
                Some(limiter) => limiter.check_now(&ClientKey::of(client)).map(Some),
            };
            match immediate {
                Some(None) => return AdmitFuture::inner(inner.call(req), permit, None, None),
                Some(Some(decision @ Decision::Allowed { .. })) => {
                    let policy = self.layer.policy.clone();
                    return AdmitFuture::inner(
                        inner.call(req),
                        permit,
                        Some(Quota::of(&decision)),
                        policy,
                    );
                }
                Some(Some(decision)) => {
                    let mut response = rejected(&decision, client, &ClientKey::of(client));
                    if let Some(policy) = &self.layer.policy {
                        Quota::of(&decision).write(policy, &mut response);
                    }
                    return AdmitFuture::ready(response);
                }
                None => {}
            }
        }
        let layer = self.layer.clone();
        AdmitFuture::Waiting {
            future: Box::pin(admit_waiting(layer, inner, req, client, permit)),
        }
    }
}

/// Admission that waits: a token to check, or a Redis call for the limits.
async fn admit_waiting<S>(
    layer: Arc<Shared>,
    inner: S,
    req: Request<Body>,
    client: IpAddr,
    permit: OwnedSemaphorePermit,
) -> Response
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Send,
    S::Future: Send,
{
    let app = &layer.app;
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
    let auth_failed = identity.is_err();
    let run = |req: Request<Body>| async move {
        match identity {
            Ok(_) => {
                let Ok(response) = inner.oneshot(req).await;
                response
            }
            // The reason and the client, never the token.
            Err(e) => {
                tracing::warn!(event = "auth_rejected", client = %client, reason = e.reason(), "authentication failed");
                ApiError::Unauthorized(e).into_response()
            }
        }
    };
    let (Some(limiter), Some(policy)) = (&app.limiter, &layer.policy) else {
        let response = run(req).await;
        drop(permit);
        return response;
    };
    let decision = match throttled {
        // The limiter's own answer of a moment ago, reached without a signature check.
        Some(decision) => {
            if let Decision::Rejected { window, .. } = &decision {
                limiter.count_rejection(window);
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
                true,
                Some(auth),
            ) = (&decision, auth_failed, &app.config.auth)
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
    let quota = Quota::of(&decision);
    let mut response = match decision {
        Decision::Allowed { .. } => run(req).await,
        rejection => rejected(&rejection, client, &key),
    };
    quota.write(policy, &mut response);
    drop(permit);
    response
}

pin_project! {
    /// The answer of [`Admit`].
    #[project = AdmitProj]
    pub enum AdmitFuture<F> {
        /// Decided at once (shed, or over a limit).
        Ready { response: Option<Response> },
        /// Admitted at once: the inner service's answer, with its `RateLimit-*` headers.
        Inner {
            #[pin]
            inner: F,
            permit: Option<OwnedSemaphorePermit>,
            quota: Option<Quota>,
            policy: Option<HeaderValue>,
        },
        /// Admission that waits (a token, a Redis call).
        Waiting { future: Pin<Box<dyn Future<Output = Response> + Send>> },
    }
}

impl<F> AdmitFuture<F> {
    fn ready(response: Response) -> Self {
        Self::Ready {
            response: Some(response),
        }
    }

    fn inner(
        inner: F,
        permit: OwnedSemaphorePermit,
        quota: Option<Quota>,
        policy: Option<HeaderValue>,
    ) -> Self {
        Self::Inner {
            inner,
            permit: Some(permit),
            quota,
            policy,
        }
    }
}

impl<F> Future for AdmitFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AdmitProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            AdmitProj::Inner {
                inner,
                permit,
                quota,
                policy,
            } => {
                let Ok(mut response) = ready!(inner.poll(cx));
                // The request is served: its slot is free for the next.
                permit.take();
                if let (Some(quota), Some(policy)) = (quota, policy) {
                    quota.write(policy, &mut response);
                }
                Poll::Ready(Ok(response))
            }
            AdmitProj::Waiting { future } => future.as_mut().poll(cx).map(Ok),
        }
    }
}
