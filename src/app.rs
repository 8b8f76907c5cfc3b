//! The state of one instance and the router: a plain function that tests can drive.

use std::sync::Arc;

use axum::{
    http::{HeaderValue, Method},
    middleware::{from_fn, from_fn_with_state},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use tokio::sync::Semaphore;
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
        let store = FibonacciStore::new(config.cache_max_bytes, redis.clone(), &metrics);
        let limiter = config.rate_limits.clone().map(|policy| {
            RateLimiter::new(policy, config.rate_limit_max_keys, redis.clone(), &metrics)
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

async fn not_found() -> ApiError {
    ApiError::NotFound
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
            ])
            .max_age(std::time::Duration::from_secs(3600))
    })
}

/// Middleware every route gets: observation outermost, so it sees every status.
fn finish(router: Router<Arc<App>>, app: &Arc<App>) -> Router {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(app.clone(), middleware::observe))
        .layer(from_fn(middleware::security_headers))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(app.clone())
}

/// The API router: `/fibonacci` behind load shedding, a deadline and the rate limit;
/// probes, metrics and the OpenAPI document beside it, never limited.
pub fn router(app: Arc<App>) -> Router {
    let api = get(fibonacci::fibonacci)
        .route_layer(from_fn_with_state(app.clone(), middleware::rate_limit))
        .route_layer(from_fn_with_state(app.clone(), middleware::deadline))
        .route_layer(from_fn_with_state(app.clone(), middleware::shed_load));
    let mut router = Router::new()
        .route("/fibonacci", api)
        .route("/health", get(probes::health))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(admin_routes());
    if let Some(cors) = cors(&app.config.cors_allowed_origins) {
        router = router.layer(cors);
    }
    finish(router, &app)
}

fn admin_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/livez", get(probes::livez))
        .route("/readyz", get(probes::readyz))
        .route("/metrics", get(probes::metrics))
}

/// The admin router (`ADMIN_LISTEN_ADDR`): metrics and probes only.
pub fn admin_router(app: Arc<App>) -> Router {
    finish(admin_routes(), &app)
}
