//! Times F(n) (default 10^6) as the service computes it: fast doubling, then decimal
//! conversion; best of several runs, in milliseconds, one line for scripts/bench-compute.
//!
//! `cargo run --release --example f_million -- 1000000`

use std::time::Instant;

fn best_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(1_000_000, |a| a.parse().expect("n"));
    let compute = best_ms(10, || {
        drop(std::hint::black_box(fibonacci_api::fib::fibonacci(n)))
    });
    let value = fibonacci_api::fib::fibonacci(n);
    let decimal = best_ms(10, || drop(std::hint::black_box(value.to_str_radix(10))));
    println!("rust {compute:.4} {decimal:.4}");
}
