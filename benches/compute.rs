//! Criterion benchmarks of the answer's cost: computing and formatting F(n) for growing n,
//! and a memory-tier hit (what a repeated request costs); plus the limiter's per-request cost.
//!
//! `cargo bench` prints the figures; docs/performance.md quotes them.

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use fibonacci_api::{
    cache::FibonacciStore,
    fib,
    metrics::Metrics,
    ratelimit::{local::LocalLimiter, ClientKey, Policy},
};

fn computation(c: &mut Criterion) {
    let mut group = c.benchmark_group("compute_and_format");
    for n in [1_000u64, 10_000, 100_000, 1_000_000] {
        if n >= 100_000 {
            group.sample_size(10);
        }
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| fib::fibonacci_decimal(black_box(n)))
        });
    }
    group.finish();
}

/// F(10^6) split into its two costs, to compare each with GMP's.
fn parts_of_a_million(c: &mut Criterion) {
    let mut group = c.benchmark_group("f_1e6_parts");
    group.sample_size(10);
    group.bench_function("fast_doubling", |b| {
        b.iter(|| fib::fibonacci(black_box(1_000_000)))
    });
    let value = fib::fibonacci(1_000_000);
    group.bench_function("to_decimal", |b| {
        b.iter(|| black_box(&value).to_str_radix(10))
    });
    group.finish();
}

fn memory_hit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let metrics = Metrics::new();
    let store = FibonacciStore::new(64 << 20, None, &metrics);
    runtime.block_on(store.get(1000)).unwrap();
    c.bench_function("memory_tier_hit_n1000", |b| {
        b.iter(|| runtime.block_on(store.get(black_box(1000))).unwrap())
    });
}

fn limiter(c: &mut Criterion) {
    let limiter = LocalLimiter::new(
        Policy::parse("30/minute,50/hour,200/day").unwrap(),
        None,
        100_000,
    );
    let now = 1_800_000_000_000u64;
    let keys: Vec<ClientKey> = (0..10_000u32)
        .map(|i| ClientKey::of(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))))
        .collect();
    let mut i = 0usize;
    c.bench_function("local_limiter_check_10k_clients", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(limiter.check(&keys[i], now + i as u64))
        })
    });
}

criterion_group!(
    benches,
    computation,
    parts_of_a_million,
    memory_hit,
    limiter
);
criterion_main!(benches);
