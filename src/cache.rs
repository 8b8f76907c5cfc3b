//! The tiered store of answers: memory → Redis → computation.
//!
//! The memory tier holds ready response bodies, bounded in bytes, so a hit does no
//! big-number work and no Redis call. Its placeholders double as the single flight:
//! concurrent misses for one `n` wait for the first, which asks Redis, else computes.
//! Redis holds decimal digits under `fibonacci:v1:{n}`; what it returns is checked
//! ([`fib::is_fibonacci_decimal`]) before it is served, and overwritten if wrong.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use metrics::{Counter, Histogram};
use quick_cache::{sync::Cache, Weighter};
use tracing::Instrument;

use crate::{
    error::ApiError,
    fib,
    metrics::{Metrics, CACHE_REQUESTS, COMPUTE_DURATION},
    redis_client::RedisClient,
};

/// n from which the computation moves off the async workers: F(20000) takes a few
/// hundred microseconds, long enough to stall other requests on that worker.
const BLOCKING_THRESHOLD: u64 = 20_000;
/// Redis entries expire after this long so an instance without an eviction policy still
/// doesn't grow without bound; the values themselves never change.
const REDIS_TTL_SECS: u64 = 7 * 24 * 3600;

/// Charges each body its length plus a rough per-entry overhead.
#[derive(Clone)]
struct BodyWeighter;

impl Weighter<u64, Bytes> for BodyWeighter {
    fn weight(&self, _n: &u64, body: &Bytes) -> u64 {
        body.len() as u64 + 64
    }
}

/// The response body for F(n), built from its digits in an allocation of exactly its
/// size: the memory tier is bounded by body length, and a `format!` here would leave up
/// to half of each cached allocation unused (its capacity doubles on the last push).
pub fn body(n: u64, digits: &str) -> Bytes {
    let head = format!("{{\"n\":{n},\"fibonacci\":");
    let mut bytes = Vec::with_capacity(head.len() + digits.len() + 1);
    bytes.extend_from_slice(head.as_bytes());
    bytes.extend_from_slice(digits.as_bytes());
    bytes.push(b'}');
    Bytes::from(bytes)
}

/// The Redis key of F(n); `v1` changes if the stored format ever does.
pub fn redis_key(n: u64) -> String {
    format!("fibonacci:v1:{n}")
}

struct TierCounters {
    hit: Counter,
    miss: Counter,
    error: Counter,
}

impl TierCounters {
    fn new(metrics: &Metrics, tier: &'static str) -> Self {
        metrics.scope(|| Self {
            hit: metrics::counter!(CACHE_REQUESTS, "tier" => tier, "result" => "hit"),
            miss: metrics::counter!(CACHE_REQUESTS, "tier" => tier, "result" => "miss"),
            error: metrics::counter!(CACHE_REQUESTS, "tier" => tier, "result" => "error"),
        })
    }
}

/// Answers for any n, from the cheapest tier that has them.
pub struct FibonacciStore {
    memory: Cache<u64, Bytes, BodyWeighter>,
    redis: Option<Arc<RedisClient>>,
    memory_counters: TierCounters,
    redis_counters: TierCounters,
    compute_duration: Histogram,
    /// How long a miss may take (Redis, then computation) before the caller gets a 503;
    /// hits never wait, so they carry no timer.
    deadline: Duration,
}

impl FibonacciStore {
    /// A store whose memory tier holds at most `max_bytes` (0 keeps nothing).
    pub fn new(max_bytes: u64, redis: Option<Arc<RedisClient>>, metrics: &Metrics) -> Self {
        // F(1000)'s body is ~240 bytes; the estimate only sizes the initial tables.
        let estimated_items = (max_bytes / 256).clamp(16, 1 << 20) as usize;
        Self {
            // A zero capacity would still need placeholders for the single flight, so
            // keep one weight unit: every body outweighs it and is never retained.
            memory: Cache::with_weighter(estimated_items, max_bytes.max(1), BodyWeighter),
            redis,
            memory_counters: TierCounters::new(metrics, "memory"),
            redis_counters: TierCounters::new(metrics, "redis"),
            compute_duration: metrics.scope(|| metrics::histogram!(COMPUTE_DURATION)),
            deadline: Duration::from_secs(3600),
        }
    }

    /// Bounds each miss by `deadline` (`REQUEST_TIMEOUT_MS`).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The response body for F(n).
    pub async fn get(&self, n: u64) -> Result<Bytes, ApiError> {
        let lookup = tracing::debug_span!("cache.memory", n);
        if let Some(body) = lookup.in_scope(|| self.memory.get(&n)) {
            self.memory_counters.hit.increment(1);
            return Ok(body);
        }
        self.memory_counters.miss.increment(1);
        tokio::time::timeout(self.deadline, self.fill(n))
            .await
            .map_err(|_| ApiError::Timeout)?
    }

    /// A miss: wait for whoever is already filling n, or fill it from Redis or computation.
    async fn fill(&self, n: u64) -> Result<Bytes, ApiError> {
        let guard = match self.memory.get_value_or_guard_async(&n).await {
            // Another request for the same n was already filling it: its answer is ours.
            Ok(body) => return Ok(body),
            Err(guard) => guard,
        };
        let body = match self.lookup_redis(n).await {
            Some(body) => body,
            None => {
                let digits = self.compute(n).await?;
                let body = body(n, &digits);
                self.write_back(n, digits);
                body
            }
        };
        // Err only if the entry was removed meanwhile; the answer is still right.
        let _ = guard.insert(body.clone());
        Ok(body)
    }

    async fn lookup_redis(&self, n: u64) -> Option<Bytes> {
        let redis = self.redis.as_ref()?;
        let span = tracing::debug_span!(
            "cache.redis",
            db.system.name = "redis",
            db.operation.name = "GET",
            n
        );
        let reply: Result<Option<Vec<u8>>, _> = redis
            .query(redis::cmd("GET").arg(redis_key(n)))
            .instrument(span)
            .await;
        match reply {
            Ok(Some(digits)) if fib::is_fibonacci_decimal(n, &digits) => {
                self.redis_counters.hit.increment(1);
                // Checked to be ASCII digits just above.
                Some(body(n, std::str::from_utf8(&digits).ok()?))
            }
            Ok(Some(_)) => {
                tracing::warn!(n, key = %redis_key(n), "ignoring a corrupt or foreign value in Redis");
                self.redis_counters.miss.increment(1);
                None
            }
            Ok(None) => {
                self.redis_counters.miss.increment(1);
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "Redis tier skipped");
                self.redis_counters.error.increment(1);
                None
            }
        }
    }

    async fn compute(&self, n: u64) -> Result<String, ApiError> {
        let span = tracing::debug_span!("fibonacci.compute", n);
        let started = Instant::now();
        let digits = if n < BLOCKING_THRESHOLD {
            span.in_scope(|| fib::fibonacci_decimal(n))
        } else {
            tokio::task::spawn_blocking(move || span.in_scope(|| fib::fibonacci_decimal(n)))
                .await
                .map_err(|e| ApiError::Internal(format!("computation of F({n}) failed: {e}")))?
        };
        self.compute_duration
            .record(started.elapsed().as_secs_f64());
        Ok(digits)
    }

    /// Stores digits in Redis in the background: the response never waits for it.
    fn write_back(&self, n: u64, digits: String) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        if !redis.is_closed() {
            return;
        }
        let span = tracing::debug_span!(
            "cache.redis",
            db.system.name = "redis",
            db.operation.name = "SET",
            n
        );
        tokio::spawn(
            async move {
                let mut set = redis::cmd("SET");
                set.arg(redis_key(n))
                    .arg(digits)
                    .arg("EX")
                    .arg(REDIS_TTL_SECS);
                if let Err(e) = redis.query::<()>(&set).await {
                    tracing::debug!(error = %e, n, "Redis write-back skipped");
                }
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_and_remembers() {
        let metrics = Metrics::new();
        let store = FibonacciStore::new(1 << 20, None, &metrics);
        let first = store.get(10).await.unwrap();
        assert_eq!(first, Bytes::from_static(br#"{"n":10,"fibonacci":55}"#));
        let again = store.get(10).await.unwrap();
        assert_eq!(first, again);
        let text = metrics.render();
        assert!(
            text.contains(r#"fibonacci_cache_requests_total{tier="memory",result="hit"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("fibonacci_compute_duration_seconds_count 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn large_numbers_are_exact_json_integers() {
        let metrics = Metrics::new();
        let store = FibonacciStore::new(1 << 20, None, &metrics);
        let body = store.get(1000).await.unwrap();
        serde_json::from_slice::<serde::de::IgnoredAny>(&body).expect("valid JSON");
        // Compared as text: a float-based JSON reader would round the 209 digits.
        let expected = format!(
            r#"{{"n":1000,"fibonacci":{}}}"#,
            fib::fibonacci_decimal(1000)
        );
        assert_eq!(body, expected.as_bytes());
    }

    #[tokio::test]
    async fn the_memory_bound_holds() {
        let metrics = Metrics::new();
        let store = FibonacciStore::new(4096, None, &metrics);
        for n in 0..=1000 {
            store.get(n).await.unwrap();
        }
        assert!(
            store.memory.weight() <= 4096,
            "weight {}",
            store.memory.weight()
        );
        let disabled = FibonacciStore::new(0, None, &metrics);
        disabled.get(5).await.unwrap();
        assert_eq!(disabled.memory.len(), 0, "CACHE_MAX_BYTES=0 keeps nothing");
    }
}
