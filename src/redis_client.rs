//! The shared Redis connection: bounded calls and a circuit breaker, so that Redis being
//! slow or gone costs requests at most a few timeouts, then nothing until it is back.
//!
//! Requests never probe an open breaker; a background pinger does, and closes it when
//! Redis answers again. The cache tier and the cluster-wide rate limiter share it.

use std::{sync::Arc, sync::Mutex, time::Duration};

use metrics::Gauge;
use redis::{aio::ConnectionManager, aio::ConnectionManagerConfig, FromRedisValue};

use crate::{
    breaker::{CircuitBreaker, Transition},
    metrics::{Metrics, REDIS_UP},
};

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
    #[error("no answer within REDIS_TIMEOUT_MS")]
    Timeout,
    #[error("{0}")]
    Failed(#[from] redis::RedisError),
}

impl RedisUnavailable {
    /// The kind of failure, in an operator's words: what to check first.
    pub fn cause(&self) -> &'static str {
        let e = match self {
            Self::CircuitOpen => return "circuit open",
            Self::Timeout => return "timeout",
            Self::Failed(e) => e,
        };
        let text = e.to_string().to_ascii_lowercase();
        if e.is_connection_refusal() {
            "connection refused"
        } else if e.kind() == redis::ErrorKind::AuthenticationFailed
            || text.contains("noauth")
            || text.contains("wrongpass")
        {
            "authentication failed"
        } else if e.is_timeout() {
            "timeout"
        } else if text.contains("lookup address") || text.contains("name or service") {
            "DNS lookup failed"
        } else if text.contains("tls") || text.contains("certificate") || text.contains("handshake")
        {
            "TLS failed"
        } else if e.is_connection_dropped() || e.is_io_error() {
            "connection lost"
        } else {
            "error reply"
        }
    }
}

/// A Redis connection behind a circuit breaker.
pub struct RedisClient {
    conn: ConnectionManager,
    timeout: Duration,
    breaker: CircuitBreaker,
    /// The cause last logged while the breaker is open, so a change is logged once.
    open_cause: Mutex<&'static str>,
    up: Gauge,
}

impl RedisClient {
    /// A client that connects lazily: the service starts and serves with Redis down.
    pub fn new(url: &str, timeout: Duration, metrics: &Metrics) -> redis::RedisResult<Arc<Self>> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // One attempt per reconnection: the next call retries, none waits in a back-off,
            // and a failure surfaces as itself (refused, DNS, TLS…), not as our timeout.
            .set_number_of_retries(0)
            .set_max_delay(timeout);
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let up = metrics.scope(|| metrics::gauge!(REDIS_UP));
        up.set(0.0);
        Ok(Arc::new(Self {
            conn,
            timeout,
            breaker: CircuitBreaker::new(FAILURES_TO_OPEN),
            open_cause: Mutex::new(""),
            up,
        }))
    }

    /// Whether calls currently go to Redis (the breaker is closed).
    pub fn is_available(&self) -> bool {
        self.breaker.is_available()
    }

    fn on_success(&self) {
        self.up.set(1.0);
        if self.breaker.record_success() == Transition::Closed {
            tracing::info!(event = "redis_available", "Redis answers again: using it");
        }
    }

    fn on_failure(&self, error: &RedisUnavailable) {
        let cause = error.cause();
        let mut logged = self.open_cause.lock().expect("not poisoned");
        match self.breaker.record_failure() {
            Transition::Opened => {
                self.up.set(0.0);
                *logged = cause;
                tracing::warn!(
                    event = "redis_unavailable",
                    cause,
                    error = %error,
                    "Redis unavailable: skipping it (cache from memory and computation, limits in process) until it answers"
                );
            }
            _ if !self.breaker.is_available() && *logged != cause => {
                *logged = cause;
                tracing::warn!(event = "redis_unavailable", cause, error = %error, "Redis still unavailable");
            }
            _ => tracing::debug!(cause, error = %error, "Redis call failed"),
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
            Err(e) => self.on_failure(e),
        }
        result
    }

    /// Runs a command within the timeout, unless the breaker is open.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisUnavailable> {
        if !self.is_available() {
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
        if !self.is_available() {
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
            // Failures are logged by the breaker's transitions, not per ping; a ping
            // stuck until REDIS_TIMEOUT_MS must not hold up shutdown.
            tokio::select! {
                _ = &mut stop => return,
                _ = self.bounded(ping.query_async::<String>(&mut conn)) => {}
            }
            let period = if self.is_available() {
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
