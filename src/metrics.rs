//! The metrics registry of one app instance and the contract's metric names.
//!
//! Each app owns its own Prometheus recorder instead of installing a global one, so two
//! instances in one test process count separately and a scrape shows exact values.
//! Components take their handles once, at construction, through [`Metrics::scope`].

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

pub const HTTP_REQUESTS: &str = "http_requests_total";
pub const HTTP_DURATION: &str = "http_request_duration_seconds";
pub const HTTP_IN_FLIGHT: &str = "http_requests_in_flight";
pub const CACHE_REQUESTS: &str = "fibonacci_cache_requests_total";
pub const COMPUTE_DURATION: &str = "fibonacci_compute_duration_seconds";
pub const RATE_LIMIT_REJECTIONS: &str = "rate_limit_rejections_total";
pub const RATE_LIMITER_KEYS: &str = "rate_limiter_keys";
pub const RATE_LIMIT_LOCAL_DECISIONS: &str = "rate_limit_local_decisions_total";
pub const REDIS_UP: &str = "redis_up";
pub const BUILD_INFO: &str = "build_info";
pub const REQUESTED_N: &str = "fibonacci_requested_n";
pub const CONNECTIONS_OPEN: &str = "http_connections_open";
pub const CONNECTIONS_REFUSED: &str = "http_connections_refused_total";

/// Why connections are refused: the `reason` label values.
const REFUSAL_REASONS: [&str; 3] = ["max_connections", "per_address", "rate"];

/// Request latency buckets: a cached answer takes tens of microseconds, so the useful
/// resolution is below a millisecond; the tail reaches the request timeout.
const HTTP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Computation buckets: from microseconds (small n) to many seconds (n near 10^6 on a slow node).
const COMPUTE_BUCKETS: &[f64] = &[
    0.00001, 0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// What is asked for, by order of magnitude: the business view of the traffic (and,
/// by `answered_from`, the cache's hit ratio per range of n).
const REQUESTED_N_BUCKETS: &[f64] = &[10.0, 100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0];

/// The label set of one HTTP series; every part is from a closed set.
/// Labels are `'static` strings from closed sets, so their addresses identify them: the
/// key hashes three words, not the strings.
type HttpKey = (usize, usize, u16);

/// Hashes the key's words as they are (they are already well spread addresses and a
/// status): no SipHash on the hot path, and no attacker chooses them.
#[derive(Default, Clone, Copy)]
struct WordHasher(u64);

impl std::hash::Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
    fn write_u16(&mut self, word: u16) {
        self.write_u64(u64::from(word));
    }
}

type HttpHandles =
    HashMap<HttpKey, (Counter, Histogram), std::hash::BuildHasherDefault<WordHasher>>;

/// One app instance's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    /// Handles per label set, so the hot path does one read-locked lookup, not a key build.
    http: RwLock<HttpHandles>,
    in_flight: Gauge,
    connections_open: Gauge,
    connections_refused: [Counter; 3],
}

impl Metrics {
    /// A fresh registry with `build_info` set.
    pub fn new() -> Arc<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), HTTP_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(COMPUTE_DURATION.into()), COMPUTE_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(REQUESTED_N.into()), REQUESTED_N_BUCKETS)
            })
            .expect("bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        let process = metrics_process::Collector::default();
        let (connections_open, connections_refused) =
            metrics::with_local_recorder(&recorder, || {
                (
                    metrics::gauge!(CONNECTIONS_OPEN),
                    REFUSAL_REASONS
                        .map(|reason| metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason)),
                )
            });
        let in_flight = metrics::with_local_recorder(&recorder, || {
            process.describe();
            metrics::gauge!(
                BUILD_INFO,
                "version" => env!("CARGO_PKG_VERSION"),
                "revision" => env!("FIBONACCI_API_REVISION"),
            )
            .set(1.0);
            metrics::gauge!(HTTP_IN_FLIGHT)
        });
        Arc::new(Self {
            recorder,
            handle,
            process,
            http: RwLock::new(HttpHandles::default()),
            in_flight,
            connections_open,
            connections_refused,
        })
    }

    /// Runs `f` with this registry as the recorder of the `metrics` macros.
    pub fn scope<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// Connections being served, on every listener.
    pub fn connections_open(&self) -> &Gauge {
        &self.connections_open
    }

    /// Counts a connection refused for `reason` (one of the gate's refusal labels).
    pub fn connection_refused(&self, reason: &str) {
        if let Some(i) = REFUSAL_REASONS.iter().position(|r| *r == reason) {
            self.connections_refused[i].increment(1);
        }
    }

    /// Counts one finished request.
    pub fn record_request(
        &self,
        method: &'static str,
        route: &'static str,
        status: u16,
        secs: f64,
    ) {
        let key = (method.as_ptr() as usize, route.as_ptr() as usize, status);
        if let Some((count, duration)) = self.http.read().expect("not poisoned").get(&key) {
            count.increment(1);
            duration.record(secs);
            return;
        }
        let status_label = status.to_string();
        let handles = self.scope(|| {
            let labels = [
                ("method", method.to_owned()),
                ("route", route.to_owned()),
                ("status", status_label),
            ];
            (
                metrics::counter!(HTTP_REQUESTS, &labels),
                metrics::histogram!(HTTP_DURATION, &labels),
            )
        });
        handles.0.increment(1);
        handles.1.record(secs);
        self.http
            .write()
            .expect("not poisoned")
            .insert(key, handles);
    }

    /// The Prometheus text exposition of everything, process metrics refreshed first.
    pub fn render(&self) -> String {
        self.scope(|| self.process.collect());
        self.handle.render()
    }

    /// Drains histogram buffers; called periodically so memory stays flat between scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}
