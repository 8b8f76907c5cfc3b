//! Prints the cluster-wide limiter's Lua script exactly as the service loads it, so that
//! `scripts/bench-redis` can run it under `redis-benchmark` (a shard's ceiling for it).
//!
//! `cargo run --release --example limiter_script [RATE_LIMITS] [RATE_LIMIT_IPV6_48_FACTOR]`
//! (defaults: the service's, `30/minute,50/hour,200/day` and 8).

use fibonacci_api::ratelimit::{redis::RedisWindows, Policy};

fn main() {
    let mut args = std::env::args().skip(1);
    let limits = args
        .next()
        .unwrap_or_else(|| "30/minute,50/hour,200/day".into());
    let factor: u32 = args.next().map_or(8, |f| {
        f.parse().expect("RATE_LIMIT_IPV6_48_FACTOR is a number")
    });
    let policy = Policy::parse(&limits).expect("RATE_LIMITS as the service takes it");
    let net48 = (factor > 0).then(|| policy.scaled(factor));
    print!("{}", RedisWindows::new(&policy, net48.as_ref()).source());
}
