//! The state of one instance and the router: a plain function that tests can drive.

use std::sync::Arc;

use axum::{
    http::{HeaderValue, Method},
    middleware::from_fn_with_state,
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_http::{catch_panic::CatchPanicLayer, cors::CorsLayer};

use crate::{
    cache::FibonacciStore,
    config::Config,
    error::ApiError,
    metrics::Metrics,
    middleware,
    ratelimit::RateLimiter,
    redis_client::RedisClient,
    routes::{fibonacci, openapi, probes},
    shutdown::Lifecycle,
};

/// Everything a request may need, shared by all of them.
pub struct App {
    pub config: Config,
    pub store: FibonacciStore,
    pub limiter: Option<RateLimiter>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Lifecycle,
    pub redis: Option<Arc<RedisClient>>,
    /// Permits for API requests being served; see `MAX_IN_FLIGHT`.
    pub in_flight: Semaphore,
    /// The OpenAPI document, rendered once.
    pub openapi: String,
}

impl App {
    /// Builds the state from configuration. Connects to nothing yet: Redis is lazy.
    pub fn new(config: Config) -> Result<Arc<Self>, redis::RedisError> {
        let metrics = Metrics::new();
        let redis = match &config.redis_url {
            Some(url) => Some(RedisClient::new(url, config.redis_timeout, &metrics)?),
            None => None,
        };
        let store = FibonacciStore::new(config.cache_max_bytes, redis.clone(), &metrics)
            .with_deadline(config.request_timeout);
        let limiter = config.rate_limits.clone().map(|policy| {
            RateLimiter::new(
                policy,
                config.rate_limit_ipv6_48_factor,
                config.rate_limit_max_keys,
                redis.clone(),
                &metrics,
            )
        });
        Ok(Arc::new(Self {
            store,
            limiter,
            redis,
            in_flight: Semaphore::new(config.max_in_flight),
            openapi: openapi::document(config.max_n),
            lifecycle: Lifecycle::default(),
            metrics,
            config,
        }))
    }
}

async fn not_found() -> Response {
    let mut response = ApiError::NotFound.into_response();
    response.extensions_mut().insert(middleware::Unmatched);
    response
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A panic becomes an opaque JSON 500 (logged), never a dropped connection.
fn panic_response(cause: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let cause = cause
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| cause.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    ApiError::Internal(format!("handler panicked: {cause}")).into_response()
}

fn cors(origins: &[HeaderValue]) -> Option<CorsLayer> {
    (!origins.is_empty()).then(|| {
        CorsLayer::new()
            .allow_origin(origins.to_vec())
            .allow_methods([Method::GET, Method::HEAD])
            .expose_headers([
                "etag".parse().expect("static"),
                "retry-after".parse().expect("static"),
                "ratelimit-limit".parse().expect("static"),
                "ratelimit-remaining".parse().expect("static"),
                "ratelimit-reset".parse().expect("static"),
                "ratelimit-policy".parse().expect("static"),
                "x-request-id".parse().expect("static"),
            ])
            .max_age(std::time::Duration::from_secs(3600))
    })
}

/// Middleware every route gets, observation outermost so it sees every status.
///
/// Wrapped around the routed service once rather than with `Router::layer`, which
/// wraps every route separately in a boxed service cloned per request: on this hot
/// path that per-layer allocation was a measurable share of the CPU per request.
fn finish(router: Router<Arc<App>>, app: &Arc<App>, cors: Option<CorsLayer>) -> Router {
    let routed = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app.clone());
    // Observation outside the panic catcher: a panic's 500 is counted, logged and
    // given the security headers like any other response.
    let stack = ServiceBuilder::new()
        .layer(from_fn_with_state(app.clone(), middleware::observe))
        .layer(CatchPanicLayer::custom(panic_response))
        .option_layer(cors)
        .service(routed);
    Router::new().fallback_service(stack)
}

/// The API router: `/fibonacci` behind admission (load shedding, the rate limit);
/// `/health` and the OpenAPI document beside it, never limited. Probes and metrics are
/// here too unless `ADMIN_LISTEN_ADDR` gives them a port of their own: then the public
/// port (the one an Ingress routes to) never exposes them.
pub fn router(app: Arc<App>) -> Router {
    router_with(app, Router::new())
}

/// The API router with `extra` routes beside the API, under the same middleware: the
/// seam for tests that need a route of their own (one that panics, say).
pub fn router_with(app: Arc<App>, extra: Router<Arc<App>>) -> Router {
    let api =
        get(fibonacci::fibonacci).route_layer(from_fn_with_state(app.clone(), middleware::admit));
    let mut router = Router::new()
        .route("/fibonacci", api)
        .route("/health", get(probes::health))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(extra);
    if app.config.admin_listen_addr.is_none() {
        router = router.merge(admin_routes());
    }
    finish(router, &app, cors(&app.config.cors_allowed_origins))
}

fn admin_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/livez", get(probes::livez))
        .route("/readyz", get(probes::readyz))
        .route("/metrics", get(probes::metrics))
}

/// The admin router (`ADMIN_LISTEN_ADDR`): metrics and probes only.
pub fn admin_router(app: Arc<App>) -> Router {
    finish(admin_routes(), &app, None)
}
