//! Per-client rate limits: several windows at once, cluster-wide through Redis, with an
//! in-process fallback that is bounded in memory.
//!
//! - [`policy`]: `RATE_LIMITS` parsing.
//! - [`window`]: the sliding-window counter, shared by both backends.
//! - [`client`]: who the client is (peer address or trusted `X-Forwarded-For`).
//! - [`local`]: the in-process store.
//! - [`redis`]: the atomic Redis script.

pub mod client;
pub mod local;
pub mod policy;
pub mod redis;
pub mod window;

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use metrics::{Counter, Gauge};

pub use client::ClientKey;
pub use policy::{Policy, Unit, Window};
pub use window::Decision;

use crate::{
    metrics::{Metrics, RATE_LIMITER_KEYS, RATE_LIMIT_LOCAL_DECISIONS, RATE_LIMIT_REJECTIONS},
    redis_client::RedisClient,
};

/// Milliseconds since the Unix epoch: windows are epoch-aligned, like Redis's `TIME`.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The limiter of one replica.
pub struct RateLimiter {
    policy: Policy,
    local: local::LocalLimiter,
    redis: Option<(Arc<RedisClient>, Arc<redis::RedisWindows>)>,
    rejections: Vec<(Unit, Counter)>,
    /// Checks made in process because Redis could not be asked: while it is down, or a
    /// call timed out; during them a client's budget is per replica.
    local_decisions: Counter,
    keys: Gauge,
}

impl RateLimiter {
    /// A limiter for `policy`; an IPv6 /48 also shares `ipv6_48_factor` times each window
    /// (0: no shared budget); with `redis`, limits hold across every replica using it.
    pub fn new(
        policy: Policy,
        ipv6_48_factor: u32,
        max_keys: usize,
        redis: Option<Arc<RedisClient>>,
        metrics: &Metrics,
    ) -> Self {
        let net48 = (ipv6_48_factor > 0).then(|| policy.scaled(ipv6_48_factor));
        let rejections = metrics.scope(|| {
            policy
                .windows()
                .iter()
                .map(|w| {
                    (
                        w.unit,
                        metrics::counter!(RATE_LIMIT_REJECTIONS, "window" => w.unit.name()),
                    )
                })
                .collect()
        });
        Self {
            local: local::LocalLimiter::new(policy.clone(), net48.clone(), max_keys),
            redis: redis.map(|r| {
                (
                    r,
                    Arc::new(redis::RedisWindows::new(&policy, net48.as_ref())),
                )
            }),
            rejections,
            keys: metrics.scope(|| metrics::gauge!(RATE_LIMITER_KEYS)),
            policy: policy.clone(),
            local_decisions: metrics.scope(|| metrics::counter!(RATE_LIMIT_LOCAL_DECISIONS)),
        }
    }

    /// The windows every client is limited by.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Checks and counts one request of `client`: in Redis when it answers, else locally.
    pub async fn check(&self, client: &ClientKey) -> Decision {
        let decision = match &self.redis {
            Some((redis, windows)) => match windows.check(redis, client, now_ms()).await {
                Ok(decision) => decision,
                Err(e) => {
                    tracing::debug!(error = %e, "rate limiting locally");
                    self.local_decisions.increment(1);
                    self.local.check(client, now_ms())
                }
            },
            None => self.local.check(client, now_ms()),
        };
        self.counted(decision)
    }

    /// The decision at once, when it needs no Redis call (the limiter is in process
    /// only); `None` means: ask [`RateLimiter::check`]. Spares the caller a future.
    pub fn check_now(&self, client: &ClientKey) -> Option<Decision> {
        if self.redis.is_some() {
            return None;
        }
        Some(self.counted(self.local.check(client, now_ms())))
    }

    /// Counts a rejection decided elsewhere (a refusal remembered by authentication).
    pub fn count_rejection(&self, window: &Window) {
        if let Some((_, counter)) = self.rejections.iter().find(|(u, _)| *u == window.unit) {
            counter.increment(1);
        }
    }

    fn counted(&self, decision: Decision) -> Decision {
        if let Decision::Rejected { window, .. } = &decision {
            self.count_rejection(window);
        }
        decision
    }

    /// Forgets clients whose counts no longer matter and updates `rate_limiter_keys`.
    pub fn sweep(&self) {
        self.keys.set(self.local.sweep(now_ms()) as f64);
    }
}
