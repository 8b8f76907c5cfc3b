//! The state of one instance, shared by every request: configuration, the tiered
//! store, the limiter, metrics, the lifecycle phase and the Redis client. Knows nothing
//! of HTTP.

use std::sync::Arc;

use crate::{
    cache::FibonacciStore,
    config::Config,
    metrics::Metrics,
    ratelimit::RateLimiter,
    redis_client::{RedisClient, Target},
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
}

impl App {
    /// Builds the state from configuration. Connects to nothing yet: Redis is lazy.
    pub fn new(config: Config) -> Result<Arc<Self>, redis::RedisError> {
        let metrics = Metrics::new();
        let target = match (&config.redis_url, config.redis_cluster_nodes.as_slice()) {
            (Some(url), _) => Some(Target::Node(url)),
            (None, []) => None,
            (None, nodes) => Some(Target::Cluster(nodes)),
        };
        let redis = target
            .map(|target| RedisClient::new(target, config.redis_timeout, &metrics))
            .transpose()?;
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
            lifecycle: Lifecycle::default(),
            metrics,
            config,
        }))
    }
}
