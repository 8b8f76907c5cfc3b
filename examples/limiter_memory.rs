//! Measures the in-process rate limiter's memory per client: feeds it a million distinct
//! addresses (one request each, default policy) and reports the growth of the resident
//! set, then shows that a smaller `RATE_LIMIT_MAX_KEYS` caps it.
//!
//! `cargo run --release --example limiter_memory`

use std::net::{IpAddr, Ipv4Addr};

use fibonacci_api::ratelimit::{local::LocalLimiter, ClientKey, Policy};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

fn feed(limiter: &LocalLimiter, count: u32) -> std::time::Duration {
    let now = 1_800_000_000_000u64;
    let started = std::time::Instant::now();
    for i in 0..count {
        let key = ClientKey::of(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
        limiter.check(&key, now + u64::from(i) / 1000);
    }
    started.elapsed()
}

fn main() {
    let policy = Policy::parse("30/minute,50/hour,200/day").unwrap();
    let keys = 1_000_000u32;
    let before = rss_bytes();
    let unbounded = LocalLimiter::new(policy.clone(), None, keys as usize);
    let took = feed(&unbounded, keys);
    let after = rss_bytes();
    println!(
        "{} keys held: RSS +{:.1} MiB = {:.0} bytes per key; {:.0} ns per check (inserting)",
        unbounded.len(),
        (after - before) as f64 / 1048576.0,
        (after - before) as f64 / f64::from(keys),
        took.as_nanos() as f64 / f64::from(keys)
    );
    drop(unbounded);

    let capped = LocalLimiter::new(policy, None, 100_000);
    let before = rss_bytes();
    let took = feed(&capped, keys);
    println!(
        "cap 100000 (the default), {keys} distinct clients: {} held, RSS +{:.1} MiB; {:.0} ns per check with evictions",
        capped.len(),
        rss_bytes().saturating_sub(before) as f64 / 1048576.0,
        took.as_nanos() as f64 / f64::from(keys)
    );
}
