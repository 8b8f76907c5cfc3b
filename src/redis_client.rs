//! The shared Redis connection: bounded calls and a circuit breaker, so that Redis being
//! slow or gone costs requests at most a few timeouts, then nothing until it is back.
//!
//! Requests never probe an open breaker; a background pinger does, and closes it when
//! Redis answers again. The cache tier and the cluster-wide rate limiter share it.
//!
//! One Redis node (`REDIS_URL`) or a Redis Cluster (`REDIS_CLUSTER_NODES`): the cluster
//! client of the `redis` crate follows MOVED/ASK redirections, refreshes the topology and
//! finds promoted replicas; everything above this module is the same for both.

use std::{sync::Arc, sync::Mutex, time::Duration};

use metrics::Gauge;
use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    Cmd, FromRedisValue, Pipeline, RedisFuture, Value,
};

use crate::{
    breaker::{CircuitBreaker, Transition},
    metrics::{Metrics, REDIS_UP},
};

/// Consecutive failures that open the breaker.
const FAILURES_TO_OPEN: u32 = 3;
/// How often the pinger checks Redis while it is healthy, and while the breaker is open.
const PING_HEALTHY: Duration = Duration::from_secs(5);
const PING_OPEN: Duration = Duration::from_millis(500);
/// At most one log line per this period for commands Redis refuses.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(60);

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
    /// Whether Redis answered, refusing this one command (a wrongly typed key, out of
    /// memory for writes, a script error): it is up, so this must not open the breaker
    /// for every other call. Everything else (no answer, a lost or refused connection,
    /// authentication, a node loading or read-only or a cluster down) means it cannot
    /// serve.
    pub fn is_refusal(&self) -> bool {
        let Self::Failed(e) = self else {
            return false;
        };
        matches!(
            e.code(),
            Some("WRONGTYPE" | "OOM" | "ERR" | "NOSCRIPT" | "EXECABORT" | "NOPERM" | "CROSSSLOT")
        )
    }

    /// The error code of a refusal (`WRONGTYPE`, `OOM`…).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Failed(e) => e.code(),
            _ => None,
        }
    }

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

/// Where Redis is.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// One node: `REDIS_URL`.
    Node(&'a str),
    /// Seed nodes of a Redis Cluster: `REDIS_CLUSTER_NODES`.
    Cluster(&'a [String]),
}

/// A connection to either: both are cheap handles to a multiplexed connection (or, for
/// the cluster, to one per node), cloned per call.
#[derive(Clone)]
enum Connection {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// A Redis connection behind a circuit breaker.
pub struct RedisClient {
    conn: Connection,
    /// Whether `conn` is a cluster: its health probe asks for the whole cluster's state.
    cluster: bool,
    timeout: Duration,
    breaker: CircuitBreaker,
    /// The cause last logged while the breaker is open, so a change is logged once.
    open_cause: Mutex<&'static str>,
    /// When a refusal was last logged.
    refusal_logged: Mutex<Option<std::time::Instant>>,
    up: Gauge,
}

impl RedisClient {
    /// A client that connects lazily: the service starts and serves with Redis down.
    pub fn new(
        target: Target<'_>,
        timeout: Duration,
        metrics: &Metrics,
    ) -> redis::RedisResult<Arc<Self>> {
        let conn = match target {
            Target::Node(url) => {
                let client = redis::Client::open(url)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    // One attempt per reconnection: the next call retries, none waits in a
                    // back-off, and a failure surfaces as itself (refused, DNS, TLS…), not
                    // as our timeout.
                    .set_number_of_retries(0)
                    .set_max_delay(timeout);
                Connection::Node(ConnectionManager::new_lazy_with_config(client, config)?)
            }
            Target::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    // Redirections (MOVED, ASK, TRYAGAIN during a resharding) are followed
                    // at once, a few times, all within our own timeout.
                    .retries(3)
                    .min_retry_wait(1)
                    .max_retry_wait(10)
                    .build()?;
                Connection::Cluster(
                    client.get_pending_async_connection_with_config(Default::default()),
                )
            }
        };
        let up = metrics.scope(|| metrics::gauge!(REDIS_UP));
        up.set(0.0);
        Ok(Arc::new(Self {
            cluster: matches!(conn, Connection::Cluster(_)),
            conn,
            timeout,
            breaker: CircuitBreaker::new(FAILURES_TO_OPEN),
            open_cause: Mutex::new(""),
            refusal_logged: Mutex::new(None),
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

    /// Logs a refusal at `WARN`, at most once a minute: a Redis out of memory refuses
    /// every write, and a line per call would flood the logs.
    fn on_refusal(&self, error: &RedisUnavailable) {
        let mut last = self.refusal_logged.lock().expect("not poisoned");
        if last.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_PERIOD) {
            *last = Some(std::time::Instant::now());
            tracing::warn!(
                event = "redis_refused",
                code = error.code().unwrap_or_default(),
                error = %error,
                "Redis refused a command (the call falls back; repeats are logged once a minute)"
            );
        } else {
            tracing::debug!(error = %error, "Redis refused a command");
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
            Err(e) if e.is_refusal() => {
                // It answered: as available as a success, and worth one line now and then.
                self.on_success();
                self.on_refusal(e);
            }
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

    /// Runs an `EVALSHA` call; if Redis does not have the script yet (a restart, a new
    /// node), loads `source` and runs the call once more.
    pub async fn eval_sha<T: FromRedisValue>(
        &self,
        call: &redis::Cmd,
        source: &str,
    ) -> Result<T, RedisUnavailable> {
        match self.query(call).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.query::<String>(redis::cmd("SCRIPT").arg("LOAD").arg(source))
                    .await?;
                self.query(call).await
            }
            result => result,
        }
    }

    /// Checks Redis as a whole: a node answers `PING`; a cluster must also say that every
    /// slot is served (`cluster_state:ok`), so the breaker does not close on a cluster
    /// that would fail every other call.
    async fn probe(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        if !self.cluster {
            return redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(drop);
        }
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await?;
        if info.lines().any(|l| l.trim() == "cluster_state:ok") {
            Ok(())
        } else {
            Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "cluster state is not ok",
                info.lines()
                    .find(|l| l.starts_with("cluster_state:"))
                    .unwrap_or_default()
                    .to_owned(),
            )))
        }
    }

    /// Probes Redis until `stop` resolves: keeps `redis_up` true and closes the breaker
    /// when Redis is back, whether or not requests are flowing.
    pub async fn run_pinger(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            // Failures are logged by the breaker's transitions, not per probe; a probe
            // stuck until REDIS_TIMEOUT_MS must not hold up shutdown.
            tokio::select! {
                _ = &mut stop => return,
                _ = self.bounded(self.probe()) => {}
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
