//! The shared Redis connection: bounded calls and a circuit breaker, so that Redis being
//! slow or gone costs requests at most a few timeouts, then nothing until it is back.
//!
//! Requests never probe an open breaker; a background pinger does, and closes it when
//! Redis answers again. The cache tier and the cluster-wide rate limiter share it.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use metrics::Gauge;
use redis::{aio::ConnectionManager, aio::ConnectionManagerConfig, FromRedisValue};

use crate::metrics::{Metrics, REDIS_UP};

/// Consecutive failures that open the breaker.
const FAILURES_TO_OPEN: u32 = 3;
/// How often the pinger checks Redis while it is healthy, and while the breaker is open.
const PING_HEALTHY: Duration = Duration::from_secs(5);
const PING_OPEN: Duration = Duration::from_millis(500);

/// Why a Redis call gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum RedisUnavailable {
    #[error("circuit open: Redis is being skipped")]
    CircuitOpen,
    #[error("Redis call timed out")]
    Timeout,
    #[error("Redis error: {0}")]
    Failed(#[from] redis::RedisError),
}

/// A Redis connection behind a circuit breaker.
pub struct RedisClient {
    conn: ConnectionManager,
    timeout: Duration,
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which calls are skipped; 0 when closed.
    open_until_ms: AtomicU64,
    epoch: Instant,
    up: Gauge,
}

impl RedisClient {
    /// A client that connects lazily: the service starts and serves with Redis down.
    pub fn new(url: &str, timeout: Duration, metrics: &Metrics) -> redis::RedisResult<Arc<Self>> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Reconnection is retried by the next call; none of them should wait for it.
            .set_number_of_retries(1)
            .set_max_delay(timeout);
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let up = metrics.scope(|| metrics::gauge!(REDIS_UP));
        up.set(0.0);
        Ok(Arc::new(Self {
            conn,
            timeout,
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            up,
        }))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether calls currently go to Redis.
    pub fn is_closed(&self) -> bool {
        self.now_ms() >= self.open_until_ms.load(Ordering::Relaxed)
    }

    fn on_success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.open_until_ms.store(0, Ordering::Relaxed);
        self.up.set(1.0);
    }

    fn on_failure(&self) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= FAILURES_TO_OPEN {
            // Stays open until the pinger sees Redis answer; the pinger's period is the back-off.
            self.open_until_ms.store(u64::MAX, Ordering::Relaxed);
            self.up.set(0.0);
        }
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisUnavailable> {
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(RedisUnavailable::Failed(e)),
            Err(_) => Err(RedisUnavailable::Timeout),
        };
        match &result {
            Ok(_) => self.on_success(),
            Err(_) => self.on_failure(),
        }
        result
    }

    /// Runs a command within the timeout, unless the breaker is open.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisUnavailable> {
        if !self.is_closed() {
            return Err(RedisUnavailable::CircuitOpen);
        }
        let mut conn = self.conn.clone();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    /// Runs a Lua script (EVALSHA, loading it on first use) within the timeout.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisUnavailable> {
        if !self.is_closed() {
            return Err(RedisUnavailable::CircuitOpen);
        }
        let mut conn = self.conn.clone();
        self.bounded(invocation.invoke_async(&mut conn)).await
    }

    /// Pings Redis until `stop` resolves: keeps `redis_up` true and closes the breaker
    /// when Redis is back, whether or not requests are flowing.
    pub async fn run_pinger(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let mut conn = self.conn.clone();
            let ping = redis::cmd("PING");
            match self.bounded(ping.query_async::<String>(&mut conn)).await {
                Ok(_) => {}
                Err(e) if !self.is_closed() => {
                    tracing::debug!(error = %e, "Redis still unavailable")
                }
                Err(e) => tracing::warn!(error = %e, "Redis ping failed"),
            }
            let period = if self.is_closed() {
                PING_HEALTHY
            } else {
                PING_OPEN
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }
}
