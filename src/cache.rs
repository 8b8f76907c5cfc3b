//! The tiered store of answers: memory → Redis → computation.
//!
//! The memory tier holds ready response bodies, bounded in bytes, so a hit does no
//! big-number work and no Redis call. Its placeholders double as the single flight:
//! concurrent misses for one `n` wait for the first, which asks Redis, else computes.
//! The fill runs in a task of its own, detached from the requests waiting for it: it
//! finishes (computes once, caches, writes back) even when every one of them has timed
//! out or gone away, so a slow computation is never started twice and its result is
//! never thrown away. Redis holds decimal digits under `fibonacci:v1:{n}`; a read is
//! bounded by the length F(n) can have, and what it returns is checked against this
//! process's secret [`Fingerprint`] before it is served, and overwritten if wrong.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use metrics::{Counter, Histogram};
use quick_cache::{sync::Cache, Weighter};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::{
    fib::{self, Fingerprint},
    metrics::{Metrics, CACHE_REQUESTS, COMPUTE_DURATION, REQUESTED_N},
    redis_client::RedisClient,
};

/// n from which the computation moves off the async workers: F(20000) takes a few
/// hundred microseconds, long enough to stall other requests on that worker.
const BLOCKING_THRESHOLD: u64 = 20_000;
/// Redis entries expire after this long so an instance without an eviction policy still
/// doesn't grow without bound; the values themselves never change.
const REDIS_TTL_SECS: u64 = 7 * 24 * 3600;

/// Why the store gave no answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The miss took longer than the deadline (the fill goes on without the caller).
    #[error("the answer took longer than the deadline")]
    Timeout,
    /// Too many large computations are running or queued already.
    #[error("too many computations pending")]
    Overloaded,
    /// The computation itself failed (a panic on the blocking pool).
    #[error("computation failed: {0}")]
    Failed(String),
}

/// The answer for one n, ready to send: the JSON body and its entity tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub body: Bytes,
    /// `"fib-v1-{n}"` ([`etag`]), kept with the body so a hit formats nothing.
    pub etag: Bytes,
}

impl Answer {
    fn new(n: u64, body: Bytes) -> Self {
        Self {
            body,
            etag: Bytes::from(etag(n)),
        }
    }
}

/// The strong validator of F(n)'s representation: it depends on n alone (and the format
/// version), so a conditional request is answered without looking anything up.
pub fn etag(n: u64) -> String {
    format!("\"fib-v1-{n}\"")
}

/// Charges each answer its length plus a rough per-entry overhead.
#[derive(Clone)]
struct AnswerWeighter;

impl Weighter<u64, Answer> for AnswerWeighter {
    fn weight(&self, _n: &u64, answer: &Answer) -> u64 {
        (answer.body.len() + answer.etag.len()) as u64 + 64
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

/// Where an answer came from: the `answered_from` label of `fibonacci_requested_n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The memory tier, including requests that waited for another one's fill.
    Memory = 0,
    Redis = 1,
    Computation = 2,
}

impl Source {
    const LABELS: [&'static str; 3] = ["memory", "redis", "computation"];
}

/// Answers for any n, from the cheapest tier that has them.
pub struct FibonacciStore {
    tiers: Arc<Tiers>,
    /// Requested n of every answer, by where it came from.
    requested: [Histogram; 3],
    /// How long a miss may take (Redis, then computation) before the caller gets an
    /// error; hits never wait, so they carry no timer.
    deadline: Duration,
}

/// The tiers, shared with the fill tasks that outlive requests.
struct Tiers {
    memory: Cache<u64, Answer, AnswerWeighter>,
    redis: Option<Arc<RedisClient>>,
    fingerprint: Fingerprint,
    memory_counters: TierCounters,
    redis_counters: TierCounters,
    /// Values in Redis that failed the fingerprint: someone else writes there.
    redis_invalid: Counter,
    compute_duration: Histogram,
    /// Large computations running (one per core: more would only share the cores)…
    computing: Semaphore,
    /// …and running or queued: past this, a miss for a large n is refused at once
    /// rather than queueing work that detached tasks would carry on with.
    pending: Arc<Semaphore>,
}

impl FibonacciStore {
    /// A store whose memory tier holds at most `max_bytes` (0 keeps nothing).
    pub fn new(max_bytes: u64, redis: Option<Arc<RedisClient>>, metrics: &Metrics) -> Self {
        // F(1000)'s body is ~240 bytes; the estimate only sizes the initial tables.
        let estimated_items = (max_bytes / 256).clamp(16, 1 << 20) as usize;
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            tiers: Arc::new(Tiers {
                // A zero capacity would still need placeholders for the single flight, so
                // keep one weight unit: every body outweighs it and is never retained.
                memory: Cache::with_weighter(estimated_items, max_bytes.max(1), AnswerWeighter),
                redis,
                fingerprint: Fingerprint::random(),
                memory_counters: TierCounters::new(metrics, "memory"),
                redis_counters: TierCounters::new(metrics, "redis"),
                redis_invalid: metrics.scope(
                    || metrics::counter!(CACHE_REQUESTS, "tier" => "redis", "result" => "invalid"),
                ),
                compute_duration: metrics.scope(|| metrics::histogram!(COMPUTE_DURATION)),
                computing: Semaphore::new(cores),
                pending: Arc::new(Semaphore::new(16 * cores)),
            }),
            requested: metrics.scope(|| {
                Source::LABELS.map(|from| metrics::histogram!(REQUESTED_N, "answered_from" => from))
            }),
            deadline: Duration::from_secs(3600),
        }
    }

    /// Bounds each miss by `deadline` (`REQUEST_TIMEOUT_MS`).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The answer for F(n).
    pub async fn get(&self, n: u64) -> Result<Answer, StoreError> {
        let (answer, source) = self.lookup(n).await?;
        self.requested[source as usize].record(n as f64);
        Ok(answer)
    }

    async fn lookup(&self, n: u64) -> Result<(Answer, Source), StoreError> {
        let tiers = &self.tiers;
        let lookup = tracing::debug_span!("cache.memory", n);
        if let Some(answer) = lookup.in_scope(|| tiers.memory.get(&n)) {
            tiers.memory_counters.hit.increment(1);
            return Ok((answer, Source::Memory));
        }
        tiers.memory_counters.miss.increment(1);
        // Waiting happens in the task too: whichever waiter finds the placeholder gone
        // (its filler failed) fills in turn, and does so whether or not it is still wanted.
        let fill = tokio::spawn(tiers.clone().wait_or_fill(n).in_current_span());
        match tokio::time::timeout(self.deadline, fill).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(Err(e)) => Err(StoreError::Failed(format!(
                "the fill of F({n}) failed: {e}"
            ))),
            Ok(Ok(result)) => result,
        }
    }

    /// Whether F(n) is in the memory tier (for tests and diagnostics; counts nothing).
    pub fn is_cached(&self, n: u64) -> bool {
        self.tiers.memory.peek(&n).is_some()
    }
}

impl Tiers {
    /// A miss: wait for whoever is already filling n, or fill it from Redis or computation.
    async fn wait_or_fill(self: Arc<Self>, n: u64) -> Result<(Answer, Source), StoreError> {
        let guard = match self.memory.get_value_or_guard_async(&n).await {
            // Another request for the same n was already filling it: its answer is ours.
            Ok(answer) => return Ok((answer, Source::Memory)),
            Err(guard) => guard,
        };
        let (body, source) = match self.lookup_redis(n).await {
            Some(body) => (body, Source::Redis),
            None => {
                let digits = self.compute(n).await?;
                let body = body(n, &digits);
                self.write_back(n, digits);
                (body, Source::Computation)
            }
        };
        let answer = Answer::new(n, body);
        // Err only if the entry was removed meanwhile; the answer is still right.
        let _ = guard.insert(answer.clone());
        Ok((answer, source))
    }

    async fn lookup_redis(&self, n: u64) -> Option<Bytes> {
        let redis = self.redis.as_ref()?;
        let span = tracing::debug_span!(
            "cache.redis",
            db.system.name = "redis",
            db.operation.name = "GETRANGE",
            n
        );
        // Never more than F(n) can be long (plus one byte, to see that a value is longer):
        // a planted gigabyte costs a bounded read, not a gigabyte.
        let mut read = redis::cmd("GETRANGE");
        read.arg(redis_key(n)).arg(0).arg(fib::max_digits(n));
        let reply: Result<Vec<u8>, _> = redis.query(&read).instrument(span).await;
        match reply {
            Ok(digits) if digits.is_empty() => {
                self.redis_counters.miss.increment(1);
                None
            }
            Ok(digits) if self.fingerprint.verifies(n, &digits) => {
                self.redis_counters.hit.increment(1);
                // Checked to be ASCII digits just above.
                Some(body(n, std::str::from_utf8(&digits).ok()?))
            }
            Ok(digits) => {
                tracing::warn!(
                    event = "cache_value_invalid",
                    n,
                    key = %redis_key(n),
                    bytes = digits.len(),
                    "ignoring a value in Redis that is not F(n): something else writes there; overwriting it"
                );
                self.redis_invalid.increment(1);
                None
            }
            // Not even a string: as foreign as wrong digits (and SET replaces it too).
            Err(e) if e.code() == Some("WRONGTYPE") => {
                tracing::warn!(
                    event = "cache_value_invalid",
                    n,
                    key = %redis_key(n),
                    "ignoring a value in Redis that is not a string: something else writes there; overwriting it"
                );
                self.redis_invalid.increment(1);
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "Redis tier skipped");
                self.redis_counters.error.increment(1);
                None
            }
        }
    }

    async fn compute(&self, n: u64) -> Result<String, StoreError> {
        let span = tracing::debug_span!("fibonacci.compute", n);
        if n < BLOCKING_THRESHOLD {
            let started = Instant::now();
            let digits = span.in_scope(|| fib::fibonacci_decimal(n));
            self.compute_duration
                .record(started.elapsed().as_secs_f64());
            return Ok(digits);
        }
        let _pending = self
            .pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| StoreError::Overloaded)?;
        let _running = self.computing.acquire().await.expect("never closed");
        let started = Instant::now();
        let digits =
            tokio::task::spawn_blocking(move || span.in_scope(|| fib::fibonacci_decimal(n)))
                .await
                .map_err(|e| StoreError::Failed(format!("computation of F({n}): {e}")))?;
        self.compute_duration
            .record(started.elapsed().as_secs_f64());
        Ok(digits)
    }

    /// Stores digits in Redis in the background: no one waits for it.
    fn write_back(&self, n: u64, digits: String) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        if !redis.is_available() {
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
        assert_eq!(
            first.body,
            Bytes::from_static(br#"{"n":10,"fibonacci":55}"#)
        );
        assert_eq!(first.etag, Bytes::from_static(br#""fib-v1-10""#));
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
        let body = store.get(1000).await.unwrap().body;
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
            store.tiers.memory.weight() <= 4096,
            "weight {}",
            store.tiers.memory.weight()
        );
        let disabled = FibonacciStore::new(0, None, &metrics);
        disabled.get(5).await.unwrap();
        assert_eq!(
            disabled.tiers.memory.len(),
            0,
            "CACHE_MAX_BYTES=0 keeps nothing"
        );
    }
}
