//! The shared Redis connection: bounded calls and a circuit breaker, so that Redis being
//! slow or gone costs requests at most a few timeouts, then nothing until it is back.
//!
//! Requests never probe an open breaker; a background pinger does, through a new
//! connection, and closes it when Redis as a whole can serve again. The cache tier and
//! the cluster-wide rate limiter share it.
//!
//! One Redis node (`REDIS_URL`) or a Redis Cluster (`REDIS_CLUSTER_NODES`): the cluster
//! client of the `redis` crate follows MOVED/ASK redirections, refreshes the topology and
//! finds promoted replicas; everything above this module is the same for both. Calls the
//! limiter addresses to one master go over a direct connection to it when one is up.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use metrics::Gauge;
use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo},
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, FromRedisValue, IntoConnectionInfo,
    Pipeline, RedisFuture, Value,
};

use crate::{
    breaker::{CircuitBreaker, Transition},
    metrics::{Metrics, REDIS_UP},
};

/// Two keys in different cluster slots, in the service's key space (`fibonacci:`), for
/// telling a node of a cluster from a lone Redis where an ACL forbids `INFO`.
const PROBE_KEYS: [&str; 2] = ["fibonacci:probe:{a}", "fibonacci:probe:{b}"];
/// Consecutive failures that open the breaker.
const FAILURES_TO_OPEN: u32 = 3;
/// How often the pinger checks Redis while it is healthy (a cluster more often: its probe
/// is also how an idle service learns that a master failed over), and while the breaker
/// is open.
const PING_HEALTHY: Duration = Duration::from_secs(5);
const PING_HEALTHY_CLUSTER: Duration = Duration::from_secs(1);
const PING_OPEN: Duration = Duration::from_millis(500);
/// How long a new cluster connection may take to read the topology (it is never on a
/// request's path: the breaker is open while it happens).
const RECONNECT_BOUND: Duration = Duration::from_secs(2);
/// At most one log line per this period for commands Redis refuses.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(60);
/// How long after a direct connection to a cluster node failed (to connect, or in a
/// call) the next one may be tried; calls go through the cluster client meanwhile.
const LINK_RETRY: Duration = Duration::from_secs(1);

/// Why a Redis call gave nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisUnavailable {
    #[error("circuit open: Redis is being skipped")]
    CircuitOpen,
    #[error("no answer within REDIS_TIMEOUT_MS")]
    Timeout,
    #[error("{0}")]
    Failed(#[from] redis::RedisError),
    /// The health probe's answer: Redis is there and says it cannot serve (a cluster
    /// with slots unserved, a node without cluster mode, a refused probe).
    #[error("{0}")]
    Unhealthy(String),
    /// The probe's answer from a cluster: some masters serving slots did not answer (one
    /// died and the cluster has not failed it over yet).
    #[error("{answered} of the cluster's {masters} masters answered")]
    MastersUnanswered { answered: usize, masters: usize },
    /// The probe's answer from the node of `REDIS_URL`: it is one node of a Redis Cluster,
    /// which answers the keys of its own slots and refuses the rest (MOVED, CROSSSLOT).
    #[error("REDIS_URL names a node of a Redis Cluster (cluster_enabled:1): set REDIS_CLUSTER_NODES to the cluster's nodes instead")]
    ClusterNode,
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
        // TRYAGAIN: a multi-key call on a slot caught mid-migration (an aborted reshard
        // can leave one so); the node is fine and so is every other slot. MOVED and ASK
        // that outlast the client library's redirections (it can lose the ASKING of a
        // slot mid-migration to a concurrent command) and READONLY (a call that reached
        // a master just demoted) are about one slot or one node's role, not an outage.
        matches!(
            e.code(),
            Some(
                "WRONGTYPE"
                    | "OOM"
                    | "ERR"
                    | "NOSCRIPT"
                    | "EXECABORT"
                    | "NOPERM"
                    | "CROSSSLOT"
                    | "TRYAGAIN"
                    | "MOVED"
                    | "ASK"
                    | "READONLY"
            )
        )
    }

    /// Whether a call was addressed to a cluster node the client library has no
    /// connection to (the topology changed): nothing was sent.
    pub fn is_unroutable(&self) -> bool {
        matches!(self, Self::Failed(e) if e.kind() == redis::ErrorKind::ClusterConnectionNotFound)
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
            // A probe refused for want of a login is an authentication problem.
            Self::Unhealthy(why) if why.contains("NOAUTH") || why.contains("WRONGPASS") => {
                return "authentication failed"
            }
            Self::Unhealthy(_) => return "unhealthy",
            Self::ClusterNode => return "a cluster node as REDIS_URL",
            Self::MastersUnanswered { .. } => return "a master unreachable",
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

/// What makes a new [`Connection`].
enum Connector {
    Node(redis::Client, ConnectionManagerConfig),
    /// Each new connection reads the topology afresh.
    Cluster(ClusterClient),
}

/// A Redis connection behind a circuit breaker.
pub struct RedisClient {
    /// Replaced by a new one for each probe while the breaker is open.
    conn: RwLock<Connection>,
    connector: Connector,
    /// For a cluster: direct connections to its nodes (see [`NodeLinks`]).
    links: Option<NodeLinks>,
    timeout: Duration,
    breaker: CircuitBreaker,
    /// The cause last logged while the breaker is open, so a change is logged once.
    open_cause: Mutex<&'static str>,
    /// When a refusal was last logged.
    refusal_logged: Mutex<Option<std::time::Instant>>,
    up: Gauge,
    /// Wakes the pinger when calls open the breaker.
    opened: tokio::sync::Notify,
    /// Bumped whenever what was learnt of Redis may no longer hold (see
    /// [`Self::generation`]).
    generation: AtomicU64,
}

impl RedisClient {
    /// A client that connects lazily: the service starts and serves with Redis down.
    pub fn new(
        target: Target<'_>,
        timeout: Duration,
        metrics: &Metrics,
    ) -> redis::RedisResult<Arc<Self>> {
        let mut links = None;
        let (conn, connector) = match target {
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
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
                (Connection::Node(conn), Connector::Node(client, config))
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
                let conn = client.get_pending_async_connection_with_config(Default::default());
                links = NodeLinks::new(nodes, timeout)?;
                (Connection::Cluster(conn), Connector::Cluster(client))
            }
        };
        let up = metrics.scope(|| metrics::gauge!(REDIS_UP));
        up.set(0.0);
        Ok(Arc::new(Self {
            connector,
            links,
            conn: RwLock::new(conn),
            timeout,
            breaker: CircuitBreaker::new(FAILURES_TO_OPEN),
            open_cause: Mutex::new(""),
            refusal_logged: Mutex::new(None),
            up,
            opened: tokio::sync::Notify::new(),
            generation: AtomicU64::new(0),
        }))
    }

    /// Whether this is a Redis Cluster (`REDIS_CLUSTER_NODES`), not one node.
    pub fn is_cluster(&self) -> bool {
        matches!(self.connector, Connector::Cluster(_))
    }

    /// Keeps the direct connections to `masters` (a cluster's masters, as its slot map
    /// read last names them) and drops the others: a master since demoted, moved or gone
    /// would otherwise keep a connection and a place in the list for the life of the
    /// process. One that is a master again gets a new link on its next call.
    pub fn keep_links_to(&self, masters: &[(String, u16)]) {
        if let Some(links) = &self.links {
            links.retain(masters);
        }
    }

    /// The ports of the nodes a cluster's limiter has a direct link up to: for tests.
    #[doc(hidden)]
    pub fn linked_ports(&self) -> Vec<u16> {
        self.links.as_ref().map_or_else(Vec::new, |links| {
            let links = links.links.lock().expect("not poisoned");
            let up = links
                .iter()
                .filter(|(_, _, link)| matches!(link, Link::Up(_)));
            up.map(|(_, port, _)| *port).collect()
        })
    }

    /// Changes when what was learnt of Redis before (a cluster's slot map) may no longer
    /// hold: the breaker closed after an outage, or the probe needed a new connection to
    /// a cluster whose masters changed under a closed breaker.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether calls currently go to Redis (the breaker is closed).
    pub fn is_available(&self) -> bool {
        self.breaker.is_available()
    }

    /// A call succeeded. It may have been in flight when the breaker opened, and answered
    /// by whatever part of Redis still works: it does not close the breaker, nor raise
    /// `redis_up` while it is open.
    fn on_success(&self) {
        self.breaker.record_success();
        if self.breaker.is_available() {
            self.up.set(1.0);
        }
    }

    /// The pinger's probe found Redis able to serve: the breaker closes.
    fn on_probe_success(&self) {
        self.up.set(1.0);
        if self.breaker.record_probe_success() == Transition::Closed {
            self.generation.fetch_add(1, Ordering::Release);
            tracing::info!(event = "redis_available", "Redis answers again: using it");
        }
    }

    fn on_failure(&self, error: &RedisUnavailable) {
        let transition = self.breaker.record_failure();
        if transition == Transition::Opened {
            // The pinger may be in its 5 s healthy sleep: probe at the open cadence now.
            self.opened.notify_one();
        }
        self.log_failure(error, transition);
    }

    /// A definitive verdict of the health probe: the breaker opens now.
    fn on_unhealthy(&self, error: &RedisUnavailable) {
        let transition = self.breaker.open_now();
        self.log_failure(error, transition);
    }

    fn log_failure(&self, error: &RedisUnavailable, transition: Transition) {
        let cause = error.cause();
        let mut logged = self.open_cause.lock().expect("not poisoned");
        match transition {
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
        let result = self.timed(call).await;
        self.record(&result);
        result
    }

    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisUnavailable> {
        Self::within(self.timeout, call).await
    }

    async fn within<T>(
        budget: Duration,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisUnavailable> {
        match tokio::time::timeout(budget, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(RedisUnavailable::Failed(e)),
            Err(_) => Err(RedisUnavailable::Timeout),
        }
    }

    /// The breaker's and the log's view of a call's outcome.
    fn record<T>(&self, result: &Result<T, RedisUnavailable>) {
        match result {
            Ok(_) => self.on_success(),
            // It answered, refusing this one command: not a failure that should open the
            // breaker for every other call, nor a success that should close it (a Redis
            // that refuses everything, one without cluster mode say, is not available).
            // A script Redis does not have yet (a start, a restart, a new node) is loaded
            // by `eval_sha` and the call made again: routine, not worth a warning.
            Err(e) if e.code() == Some("NOSCRIPT") => tracing::debug!("loading the script"),
            Err(e) if e.is_refusal() => self.on_refusal(e),
            Err(e) => self.on_failure(e),
        }
    }

    /// Runs a command within the timeout, unless the breaker is open.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisUnavailable> {
        if !self.is_available() {
            return Err(RedisUnavailable::CircuitOpen);
        }
        let mut conn = self.connection();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    /// Runs a command within the timeout whatever the breaker says, and without
    /// counting for or against it: for reading the cluster's slot map, which must be
    /// fresh when the breaker closes (its callers bound how often they ask).
    pub async fn query_past_breaker<T: FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, RedisUnavailable> {
        let mut conn = self.connection();
        self.timed(cmd.query_async(&mut conn)).await
    }

    /// Runs an `EVALSHA` call; if Redis does not have the script yet (a restart, a new
    /// node), loads `source` and runs the call once more.
    pub async fn eval_sha<T: FromRedisValue>(
        &self,
        call: &redis::Cmd,
        source: &str,
    ) -> Result<T, RedisUnavailable> {
        self.eval_sha_routed(call, source, None).await
    }

    /// Runs an `EVALSHA` on the cluster node at `host:port`, whatever keys the call
    /// itself names (none, for a script that checks where its keys live); loads `source`
    /// there if it lacks the script. A node the client library has no connection to is
    /// an error (see [`RedisUnavailable::is_unroutable`]) that does not count against
    /// the breaker.
    pub async fn eval_sha_at<T: FromRedisValue>(
        &self,
        call: &redis::Cmd,
        source: &str,
        (host, port): (&str, u16),
    ) -> Result<T, RedisUnavailable> {
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.to_owned(),
            port,
        });
        self.eval_sha_routed(call, source, Some(&route)).await
    }

    /// [`Self::eval_sha`], on the node `route` names if there is one.
    async fn eval_sha_routed<T: FromRedisValue>(
        &self,
        call: &redis::Cmd,
        source: &str,
        route: Option<&RoutingInfo>,
    ) -> Result<T, RedisUnavailable> {
        match self.routed(call, route).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.routed::<String>(redis::cmd("SCRIPT").arg("LOAD").arg(source), route)
                    .await?;
                self.routed(call, route).await
            }
            result => result,
        }
    }

    /// Runs a command within the timeout on the node `route` names (a cluster; without
    /// a route, or on one node, as [`Self::query`] does), unless the breaker is open.
    async fn routed<T: FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        route: Option<&RoutingInfo>,
    ) -> Result<T, RedisUnavailable> {
        let (Some(route), Connection::Cluster(mut conn)) = (route, self.connection()) else {
            return self.query(cmd).await;
        };
        if !self.is_available() {
            return Err(RedisUnavailable::CircuitOpen);
        }
        let mut budget = self.timeout;
        if let (
            Some(links),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }),
        ) = (&self.links, route)
        {
            if let Some(mut link) = links.get(host, *port) {
                let started = tokio::time::Instant::now();
                match self.timed(cmd.query_async(&mut link)).await {
                    // A connection the node closed (a restart, `CLIENT KILL`, its idle
                    // `timeout`) or reset: the call goes through the cluster client, which
                    // connects again, within what is left of the timeout — as it did
                    // before the link, so a dropped link costs neither an answer nor a
                    // count against the breaker.
                    Err(RedisUnavailable::Failed(e))
                        if e.is_connection_dropped() || e.is_io_error() =>
                    {
                        links.failed(host, *port);
                        budget = self.timeout.saturating_sub(started.elapsed());
                    }
                    result => {
                        if matches!(result, Err(RedisUnavailable::Timeout)) {
                            // Hung: the next calls go through the cluster client until a
                            // new link is up.
                            links.failed(host, *port);
                        }
                        self.record(&result);
                        return result;
                    }
                }
            }
        }
        let call = async move {
            let value = conn.route_command(cmd.clone(), route.clone()).await?;
            // An error reply that needs no redirection (NOSCRIPT, a refusal) comes back
            // as a value.
            Ok(redis::from_redis_value(value.extract_error()?)?)
        };
        let result = Self::within(budget, call).await;
        match &result {
            // Not Redis failing: the caller asked for a node the library does not know.
            Err(e) if e.is_unroutable() => {}
            _ => self.record(&result),
        }
        result
    }

    /// The current connection (a handle: cloning it is cheap).
    fn connection(&self) -> Connection {
        self.conn.read().expect("not poisoned").clone()
    }

    /// Checks Redis as a whole: a node answers `PING`; a cluster must also say that every
    /// slot is served (`cluster_state:ok`), so the breaker does not close on a cluster
    /// that would fail every other call. An error reply is a verdict too: a Redis without
    /// cluster mode refuses `CLUSTER INFO`, and must not look healthy because it answers
    /// single-key commands.
    async fn probe(&self) -> Result<(), RedisUnavailable> {
        let mut conn = self.connection();
        let verdict = |e: redis::RedisError| {
            if e.code().is_some() {
                RedisUnavailable::Unhealthy(format!("health probe refused: {e}"))
            } else {
                RedisUnavailable::Failed(e)
            }
        };
        if !self.is_cluster() {
            // INFO, not only PING: a cluster node answers PING, and the keys of its own
            // slots, and refuses the rest one call at a time (refusals, which do not open
            // the breaker): limits per instance with Redis reported up.
            return match redis::cmd("INFO")
                .arg("cluster")
                .query_async::<String>(&mut conn)
                .await
            {
                Ok(info) if info.lines().any(|l| l.trim() == "cluster_enabled:1") => {
                    Err(RedisUnavailable::ClusterNode)
                }
                Ok(_) => Ok(()),
                // An ACL without INFO: one command on two keys of different slots (hash
                // tags `a` and `b`: slots 15495 and 3300), which a node of a cluster
                // refuses and a lone Redis answers. In the service's key space, which its
                // ACL user may read; PING decides where it may not.
                Err(e) if e.code().is_some() => match redis::cmd("EXISTS")
                    .arg(&PROBE_KEYS)
                    .query_async::<i64>(&mut conn)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if matches!(e.code(), Some("CROSSSLOT" | "MOVED")) => {
                        Err(RedisUnavailable::ClusterNode)
                    }
                    Err(e) if e.code().is_some() => redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .map(drop)
                        .map_err(verdict),
                    Err(e) => Err(RedisUnavailable::Failed(e)),
                },
                Err(e) => Err(RedisUnavailable::Failed(e)),
            };
        }
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .map_err(verdict)?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
        };
        match field("cluster_state") {
            Some("ok") => {}
            state => {
                return Err(RedisUnavailable::Unhealthy(format!(
                    "cluster state is not ok: {}",
                    state.unwrap_or("no cluster_state")
                )))
            }
        }
        // The cluster says `ok` until it has marked a dead master failed (its node
        // timeout), while every call to that master's slots fails: each master serving
        // slots (`cluster_size`) must answer too. The client library asks only the
        // masters it is connected to, and a new connection has none to a dead one: count.
        let masters: usize = field("cluster_size")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let Connection::Cluster(mut conn) = conn else {
            unreachable!("a cluster's connection");
        };
        let every_master = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
        let answered = match conn.route_command(redis::cmd("PING"), every_master).await {
            Ok(Value::Map(replies)) => replies
                .iter()
                .filter(|(_, reply)| !matches!(reply, Value::ServerError(_)))
                .count(),
            Ok(_) => 0,
            Err(e) => return Err(RedisUnavailable::Failed(e)),
        };
        if answered < masters {
            return Err(RedisUnavailable::MastersUnanswered { answered, masters });
        }
        Ok(())
    }

    /// While the breaker is open, Redis is probed through a new connection. The client
    /// library reconnects by itself only after a connection was lost: one whose login
    /// was refused (a password rotated in Redis after the service's Secret) would be
    /// refused for the life of the process. A new cluster connection also reads the slot
    /// map afresh: the library refreshes its map on redirections and errors, but not on
    /// timeouts, so a master that hangs (a frozen VM, a partition) rather than refusing
    /// would otherwise keep its slots, replica promoted or not.
    async fn reconnect_if_open(&self) -> Result<(), RedisUnavailable> {
        if self.is_available() {
            return Ok(());
        }
        self.reconnect().await
    }

    /// A new connection in place of the current one (see [`Self::reconnect_if_open`]).
    async fn reconnect(&self) -> Result<(), RedisUnavailable> {
        let client = match &self.connector {
            Connector::Node(client, config) => {
                // Connects on its first call: the probe, which bounds it.
                let fresh =
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
                *self.conn.write().expect("not poisoned") = Connection::Node(fresh);
                return Ok(());
            }
            Connector::Cluster(client) => client,
        };
        let bound = RECONNECT_BOUND.max(self.timeout);
        match tokio::time::timeout(bound, client.get_async_connection()).await {
            Ok(Ok(fresh)) => {
                *self.conn.write().expect("not poisoned") = Connection::Cluster(fresh);
                if let Some(links) = &self.links {
                    // After an outage the masters may be others, or the same ones anew.
                    links.clear();
                }
                Ok(())
            }
            Ok(Err(e)) => Err(RedisUnavailable::Failed(e)),
            Err(_) => Err(RedisUnavailable::Timeout),
        }
    }

    /// One round of the pinger: a new connection if need be, then the probe. A timeout
    /// or a lost connection counts as one failure, as a request's would; a verdict that
    /// Redis cannot serve opens the breaker at once.
    async fn check(&self) {
        if let Err(e) = self.reconnect_if_open().await {
            return self.on_failure(&e);
        }
        let mut verdict = self.bounded_probe().await;
        if self.is_cluster()
            && self.is_available()
            && !matches!(
                verdict,
                Ok(()) | Err(RedisUnavailable::ClusterNode | RedisUnavailable::Unhealthy(_))
            )
        {
            // A master that stopped answering while the breaker is closed: a failover
            // (a frozen master is only found by timeouts, which the client library does
            // not read as a reason to refresh its map) or an outage. A new connection
            // reads the slot map afresh: if it serves, the service goes on with it, and
            // what it learnt before (the limiter's map) is read again.
            verdict = match self.reconnect().await {
                Ok(()) => self.bounded_probe().await,
                Err(e) => Err(e),
            };
            if verdict.is_ok() {
                self.generation.fetch_add(1, Ordering::Release);
                tracing::debug!("a cluster master stopped answering: a new connection serves");
            }
        }
        match verdict {
            Ok(()) => self.on_probe_success(),
            Err(e @ (RedisUnavailable::ClusterNode | RedisUnavailable::Unhealthy(_))) => {
                self.on_unhealthy(&e);
            }
            Err(e) => self.on_failure(&e),
        }
        if !self.is_available() {
            // A call that read the breaker closed just before it opened may have raised
            // the gauge after the opening lowered it.
            self.up.set(0.0);
        }
    }

    async fn bounded_probe(&self) -> Result<(), RedisUnavailable> {
        tokio::time::timeout(self.timeout, self.probe())
            .await
            .unwrap_or(Err(RedisUnavailable::Timeout))
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
                () = self.check() => {}
            }
            let period = if !self.is_available() {
                PING_OPEN
            } else if self.is_cluster() {
                PING_HEALTHY_CLUSTER
            } else {
                PING_HEALTHY
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(period) => {}
                () = self.opened.notified() => {}
            }
        }
    }
}

/// Direct connections to a cluster's nodes, by the address the cluster announces, for
/// the calls addressed to one node (the limiter's batch per master). The cluster client
/// hands each call to its own routing task on the way to the node's connection: one more
/// task wake-up and timer per call than a node's multiplexed connection costs, which the
/// limiter pays on every batch. A link is made in the background on first use; until it
/// is up, and for [`LINK_RETRY`] after it failed, calls go through the cluster client as
/// before, so a node the service cannot reach directly is no worse off than without.
struct NodeLinks {
    /// The first seed's settings (credentials, TLS, protocol); the address is replaced.
    template: ConnectionInfo,
    config: AsyncConnectionConfig,
    /// A handful of masters: a list searched by address, not allocated per call.
    links: Arc<Mutex<Vec<(String, u16, Link)>>>,
}

enum Link {
    Connecting,
    Up(MultiplexedConnection),
    Failed(Instant),
}

impl NodeLinks {
    /// `None` for seeds on a Unix socket (a cluster announces TCP addresses).
    fn new(seeds: &[String], timeout: Duration) -> redis::RedisResult<Option<Self>> {
        let Some(seed) = seeds.first() else {
            return Ok(None);
        };
        let template = seed.as_str().into_connection_info()?;
        if matches!(template.addr(), ConnectionAddr::Unix(_)) {
            return Ok(None);
        }
        Ok(Some(Self {
            template,
            // The caller bounds every call with its own timeout.
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(None),
            links: Arc::default(),
        }))
    }

    /// The link to `host:port` if it is up; otherwise starts making one (at most one
    /// attempt at a time, one per [`LINK_RETRY`] after a failure) and returns `None`.
    fn get(&self, host: &str, port: u16) -> Option<MultiplexedConnection> {
        let mut links = self.links.lock().expect("not poisoned");
        match links.iter_mut().find(|(h, p, _)| h == host && *p == port) {
            Some((_, _, Link::Up(conn))) => return Some(conn.clone()),
            Some((_, _, Link::Connecting)) => return None,
            Some((_, _, Link::Failed(at))) if at.elapsed() < LINK_RETRY => return None,
            Some((_, _, link)) => *link = Link::Connecting,
            None => links.push((host.to_owned(), port, Link::Connecting)),
        }
        let address = (host.to_owned(), port);
        let info = self.template.clone().set_addr(match self.template.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        });
        let (config, links) = (self.config.clone(), self.links.clone());
        tokio::spawn(async move {
            let conn = match redis::Client::open(info) {
                Ok(client) => {
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                }
                Err(e) => Err(e),
            };
            let link = match conn {
                Ok(conn) => Link::Up(conn),
                Err(e) => {
                    tracing::debug!(error = %e, host = %address.0, port = address.1, "no direct connection to the cluster node: calls go through the cluster client");
                    Link::Failed(Instant::now())
                }
            };
            let mut links = links.lock().expect("not poisoned");
            // Cleared meanwhile (an outage): this attempt belongs to the old topology.
            if let Some(slot) = links
                .iter_mut()
                .find(|(h, p, _)| *h == address.0 && *p == address.1)
            {
                slot.2 = link;
            }
        });
        None
    }

    /// The link to `host:port` failed a call: dropped, and made again later.
    fn failed(&self, host: &str, port: u16) {
        let mut links = self.links.lock().expect("not poisoned");
        if let Some(slot) = links.iter_mut().find(|(h, p, _)| h == host && *p == port) {
            slot.2 = Link::Failed(Instant::now());
        }
    }

    fn retain(&self, masters: &[(String, u16)]) {
        self.links
            .lock()
            .expect("not poisoned")
            .retain(|(h, p, _)| masters.iter().any(|(host, port)| host == h && port == p));
    }

    fn clear(&self) {
        self.links.lock().expect("not poisoned").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_refused_for_want_of_a_login_says_so() {
        let noauth = RedisUnavailable::Unhealthy(
            "health probe refused: NOAUTH: Authentication required.".into(),
        );
        assert_eq!(noauth.cause(), "authentication failed");
        let fail = RedisUnavailable::Unhealthy("cluster state is not ok: fail".into());
        assert_eq!(fail.cause(), "unhealthy");
    }

    #[test]
    fn links_to_nodes_no_longer_masters_are_dropped() {
        let links = NodeLinks::new(
            &["redis://10.0.0.1:7000".to_owned()],
            Duration::from_secs(1),
        )
        .unwrap()
        .expect("a TCP seed");
        for port in [7000, 7001, 7002] {
            let state = if port == 7001 {
                Link::Connecting
            } else {
                Link::Failed(Instant::now())
            };
            links
                .links
                .lock()
                .unwrap()
                .push(("10.0.0.1".into(), port, state));
        }
        // 7000 demoted (its replica on 7003 took over), 7002 still a master.
        links.retain(&[("10.0.0.1".into(), 7002), ("10.0.0.1".into(), 7003)]);
        let left: Vec<u16> = links.links.lock().unwrap().iter().map(|l| l.1).collect();
        assert_eq!(left, [7002]);
        // The same port on another host is another node.
        links.retain(&[("10.0.0.2".into(), 7002)]);
        assert!(links.links.lock().unwrap().is_empty());
    }
}
