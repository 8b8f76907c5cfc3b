//! The tiered cache against a real `redis-server`: sharing, outages, recovery, corruption,
//! and single flight.

use std::time::Duration;

use fibonacci_api::{cache::redis_key, config::Config, fib};
use redis::Commands;
use reqwest::StatusCode;

use crate::helpers::{eventually, spawn_app, test_config, RedisServer, Scrape};

fn with_redis(redis: &RedisServer) -> Config {
    Config {
        redis_url: Some(redis.url()),
        rate_limits: None,
        max_n: 300_000,
        ..test_config()
    }
}

const COMPUTE: &str = "fibonacci_compute_duration_seconds";
const CACHE: &str = "fibonacci_cache_requests_total";

fn redis_hits(scrape: &Scrape) -> f64 {
    scrape.get(CACHE, &[("tier", "redis"), ("result", "hit")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_computed_by_one_instance_is_served_from_redis_by_another() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let first = spawn_app(with_redis(&redis)).await;
    let second = spawn_app(with_redis(&redis)).await;

    let body = first.fib("777").await.text().await.unwrap();
    assert_eq!(
        first.scrape().await.count(COMPUTE, &[]),
        1.0,
        "the first instance computed it"
    );
    let digits = fib::fibonacci_decimal(777);
    let mut conn = redis.conn();
    eventually(
        Duration::from_secs(5),
        "the value is written back to Redis",
        || {
            let stored: Option<String> = conn.get(redis_key(777)).unwrap();
            let done = stored.as_deref() == Some(digits.as_str());
            async move { done }
        },
    )
    .await;

    assert_eq!(second.fib("777").await.text().await.unwrap(), body);
    let scrape = second.scrape().await;
    assert_eq!(redis_hits(&scrape), 1.0, "served from Redis");
    assert_eq!(scrape.count(COMPUTE, &[]), 0.0, "without recomputing");
    assert_eq!(scrape.get("redis_up", &[]), 1.0);
    // And now from its own memory: no second Redis call.
    second.fib("777").await;
    let scrape = second.scrape().await;
    assert_eq!(redis_hits(&scrape), 1.0);
    assert_eq!(
        scrape.get(CACHE, &[("tier", "memory"), ("result", "hit")]),
        1.0
    );
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_costs_nothing_and_its_return_is_noticed() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let app = spawn_app(with_redis(&redis)).await;
    assert_eq!(app.fib("100").await.status(), StatusCode::OK);
    eventually(Duration::from_secs(5), "redis_up is 1", || async {
        app.scrape().await.get("redis_up", &[]) == 1.0
    })
    .await;

    redis.kill();
    // Every request still succeeds; the breaker opens after a few timeouts.
    for n in 200..260 {
        let response = app.fib(&n.to_string()).await;
        assert_eq!(response.status(), StatusCode::OK, "n={n} with Redis down");
    }
    let scrape = app.scrape().await;
    assert_eq!(scrape.get("redis_up", &[]), 0.0, "the outage is visible");
    assert!(scrape.get(CACHE, &[("tier", "redis"), ("result", "error")]) >= 1.0);
    // With the breaker open, misses do not go to Redis (proven without a clock in
    // `with_the_breaker_open_misses_send_nothing_to_redis`).
    for n in 300..340 {
        assert_eq!(app.fib(&n.to_string()).await.status(), StatusCode::OK);
    }

    redis.restart();
    eventually(
        Duration::from_secs(10),
        "the tier recovers by itself",
        || async { app.scrape().await.get("redis_up", &[]) == 1.0 },
    )
    .await;
    app.fib("999").await;
    let mut conn = redis.conn();
    eventually(Duration::from_secs(5), "write-back resumes", || {
        let exists: bool = conn.exists(redis_key(999)).unwrap();
        async move { exists }
    })
    .await;
    app.stop().await;
}

// The health probe runs every 5 s while Redis is healthy and every 500 ms while the
// breaker is open; a breaker opened by calls between two healthy probes must get the
// fast cadence at once, not after the rest of the 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_by_calls_is_probed_at_once_not_after_the_healthy_period() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let app = spawn_app(with_redis(&redis)).await;
    eventually(Duration::from_secs(5), "redis_up is 1", || async {
        app.scrape().await.get("redis_up", &[]) == 1.0
    })
    .await;
    // Just after a healthy probe: the next one is about 5 s away.
    redis.kill();
    for n in 200..230 {
        assert_eq!(app.fib(&n.to_string()).await.status(), StatusCode::OK);
    }
    assert_eq!(
        app.scrape().await.get("redis_up", &[]),
        0.0,
        "the breaker opened"
    );
    redis.restart();
    eventually(
        Duration::from_secs(3),
        "Redis used again within the open cadence, not after the healthy period",
        || async { app.scrape().await.get("redis_up", &[]) == 1.0 },
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_value_in_redis_is_never_served_and_is_overwritten() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut conn = redis.conn();
    // F(999) + (2^61 − 1): the right length and the right residue modulo the public
    // prime the check once used; only a secret modulus tells it from F(999).
    let forged =
        (fib::fibonacci(999) + num_bigint::BigUint::from((1u64 << 61) - 1)).to_str_radix(10);
    let planted = [
        (500u64, "12345".to_string(), "foreign digits"),
        (501, "not a number".into(), "not digits"),
        (502, fib::fibonacci_decimal(503), "the neighbour's value"),
        (999, forged, "a forgery that passes public arithmetic"),
        (5, "5".repeat(8 << 20), "an 8 MiB value"),
    ];
    for (n, value, _) in &planted {
        let _: () = conn.set(redis_key(*n), value).unwrap();
    }
    let app = spawn_app(with_redis(&redis)).await;
    // Not even a string.
    redis::cmd("HSET")
        .arg(redis_key(42))
        .arg("a")
        .arg("b")
        .query::<()>(&mut conn)
        .unwrap();
    let sent_by_redis = |conn: &mut redis::Connection| -> u64 {
        let info: String = redis::cmd("INFO").arg("stats").query(conn).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = sent_by_redis(&mut conn);
    let body = app.fib("42").await.text().await.unwrap();
    assert_eq!(
        body,
        format!(r#"{{"n":42,"fibonacci":{}}}"#, fib::fibonacci_decimal(42))
    );
    for (n, _, why) in &planted {
        let body = app.fib(&n.to_string()).await.text().await.unwrap();
        assert_eq!(
            body,
            format!(r#"{{"n":{n},"fibonacci":{}}}"#, fib::fibonacci_decimal(*n)),
            "{why}"
        );
    }
    let sent = sent_by_redis(&mut conn) - before;
    assert!(
        sent < 64 * 1024,
        "reads are bounded by F(n)'s length: Redis sent {sent} bytes for {} lookups",
        planted.len()
    );
    let scrape = app.scrape().await;
    assert_eq!(redis_hits(&scrape), 0.0, "none of them counted as a hit");
    assert_eq!(
        scrape.get(
            "fibonacci_cache_requests_total",
            &[("tier", "redis"), ("result", "invalid")]
        ),
        planted.len() as f64 + 1.0,
        "each one counted as invalid, the hash too"
    );
    assert_eq!(
        scrape.get("redis_up", &[]),
        1.0,
        "a foreign value is no outage"
    );
    assert_eq!(scrape.count(COMPUTE, &[]), planted.len() as f64 + 1.0);
    for (n, _, why) in &planted {
        let expected = fib::fibonacci_decimal(*n);
        eventually(Duration::from_secs(5), why, || {
            let stored: String = conn.get(redis_key(*n)).unwrap();
            let fixed = stored == expected;
            async move { fixed }
        })
        .await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_computation_outlives_the_requests_that_gave_up_on_it() {
    let redis = RedisServer::start();
    let n = 1_000_000u64;
    let app = spawn_app(Config {
        max_n: n,
        rate_limits: None,
        // Far below F(10^6)'s computing time: every request for it times out.
        request_timeout: Duration::from_millis(2),
        redis_url: redis.as_ref().map(RedisServer::url),
        ..test_config()
    })
    .await;
    let url = app.url(&format!("/fibonacci?n={n}"));
    let requests: Vec<_> = (0..8)
        .map(|_| tokio::spawn(app.client.get(&url).send()))
        .collect();
    for request in requests {
        let status = request.await.unwrap().unwrap().status();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "timed out");
    }
    eventually(
        Duration::from_secs(30),
        "the abandoned computation to land in memory",
        || {
            let cached = app.state.store.is_cached(n);
            async move { cached }
        },
    )
    .await;
    let scrape = app.scrape().await;
    assert_eq!(
        scrape.count(COMPUTE, &[]),
        1.0,
        "8 timed-out requests, one computation"
    );
    let hits = |s: &Scrape| s.get(CACHE, &[("tier", "memory"), ("result", "hit")]);
    let before = hits(&scrape);
    let response = app.get(&format!("/fibonacci?n={n}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let scrape = app.scrape().await;
    assert_eq!(
        hits(&scrape),
        before + 1.0,
        "the next request is a memory hit"
    );
    assert_eq!(scrape.count(COMPUTE, &[]), 1.0, "and computes nothing");
    if let Some(redis) = &redis {
        let mut conn = redis.conn();
        eventually(
            Duration::from_secs(10),
            "the write-back nobody waited for",
            || {
                let len: usize = redis::cmd("STRLEN")
                    .arg(redis_key(n))
                    .query(&mut conn)
                    .unwrap();
                async move { len == fib::max_digits(n) || len + 1 == fib::max_digits(n) }
            },
        )
        .await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_n_are_computed_once() {
    let app = spawn_app(Config {
        max_n: 300_000,
        rate_limits: None,
        ..test_config()
    })
    .await;
    let requests: Vec<_> = (0..16)
        .map(|_| tokio::spawn(app.client.get(app.url("/fibonacci?n=250000")).send()))
        .collect();
    let mut bodies = Vec::new();
    for request in requests {
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        bodies.push(response.text().await.unwrap());
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "everyone got the same answer"
    );
    assert_eq!(
        app.scrape().await.count(COMPUTE, &[]),
        1.0,
        "one computation for 16 requests"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_a_password_from_the_url_work() {
    let Some(redis) = RedisServer::start_tls("s3cret-pass") else {
        return;
    };
    let first = spawn_app(with_redis(&redis)).await;
    first.fib("4321").await;
    let mut conn = redis.conn();
    eventually(Duration::from_secs(5), "written over TLS", || {
        let exists: bool = conn.exists(redis_key(4321)).unwrap();
        async move { exists }
    })
    .await;
    let second = spawn_app(with_redis(&redis)).await;
    second.fib("4321").await;
    assert_eq!(
        redis_hits(&second.scrape().await),
        1.0,
        "read back over TLS"
    );
    assert_eq!(second.scrape().await.get("redis_up", &[]), 1.0);
    first.stop().await;
    second.stop().await;

    // The wrong password: the tier reports itself down and the service still answers.
    let wrong = spawn_app(Config {
        redis_url: Some(redis.url().replace("s3cret-pass", "wrong")),
        ..with_redis(&redis)
    })
    .await;
    assert_eq!(wrong.fib("11").await.status(), StatusCode::OK);
    assert_eq!(wrong.scrape().await.get("redis_up", &[]), 0.0);
    wrong.stop().await;
}

#[tokio::test]
async fn the_service_starts_and_serves_with_redis_unreachable() {
    // A port nothing listens on.
    let port = crate::helpers::free_port();
    let app = spawn_app(Config {
        redis_url: Some(format!("redis://127.0.0.1:{port}")),
        ..test_config()
    })
    .await;
    for _ in 0..5 {
        assert_eq!(app.fib("10").await.status(), StatusCode::OK);
    }
    assert_eq!(
        app.get("/readyz").await.status(),
        StatusCode::OK,
        "readiness ignores Redis"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_breaker_open_misses_never_wait_on_redis() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let app = spawn_app(Config {
        // A call that reaches Redis could wait this long: far more than a request here.
        redis_timeout: Duration::from_secs(5),
        ..with_redis(&redis)
    })
    .await;
    assert_eq!(app.fib("10").await.status(), StatusCode::OK);
    // Refused at once, three times: the breaker opens.
    redis.kill();
    for n in 100..103 {
        assert_eq!(app.fib(&n.to_string()).await.status(), StatusCode::OK);
    }
    assert_eq!(app.scrape().await.get("redis_up", &[]), 0.0);
    // Now Redis's port accepts and never answers: any call sent there would hang 5 s.
    let _black_hole = tokio::net::TcpListener::bind(("127.0.0.1", redis.port))
        .await
        .expect("Redis's port is free again");
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    for n in 200..240 {
        let response = impatient
            .get(app.url(&format!("/fibonacci?n={n}")))
            .send()
            .await;
        assert!(
            response.is_ok_and(|r| r.status() == StatusCode::OK),
            "n={n}: a miss with the breaker open must not go to Redis"
        );
    }
    app.stop().await;
}

// A password rotated in the wrong order (the service's Secret before Redis's): the
// service must pick Redis up once Redis accepts the password, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_redis_accepts_only_later_is_picked_up_without_a_restart() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let app = spawn_app(Config {
        redis_url: Some(redis.url().replace("redis://", "redis://:rotated@")),
        ..with_redis(&redis)
    })
    .await;
    assert_eq!(app.fib("11").await.status(), StatusCode::OK);
    eventually(
        Duration::from_secs(5),
        "a refused login is reported down",
        || async { app.scrape().await.get("redis_up", &[]) == 0.0 },
    )
    .await;

    let mut conn = redis.conn();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("rotated")
        .query::<()>(&mut conn)
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the tier recovers once Redis takes the password",
        || async { app.scrape().await.get("redis_up", &[]) == 1.0 },
    )
    .await;
    app.fib("4242").await;
    eventually(Duration::from_secs(5), "write-back resumes", || {
        let exists: bool = conn.exists(redis_key(4242)).unwrap();
        async move { exists }
    })
    .await;
    app.stop().await;
}

// Where an ACL forbids INFO, the probe tells a lone Redis from a cluster's node by a
// command on two keys of different slots: a lone Redis answers it, and is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_redis_is_used_by_a_user_an_acl_forbids_info() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut conn = redis.conn();
    redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "noinfo",
            "on",
            ">pw",
            "~fibonacci:*",
            "+@all",
            "-info",
        ])
        .query::<()>(&mut conn)
        .unwrap();
    let app = spawn_app(Config {
        redis_url: Some(redis.url().replace("redis://", "redis://noinfo:pw@")),
        ..with_redis(&redis)
    })
    .await;
    app.fib("2024").await;
    eventually(Duration::from_secs(5), "written back as that user", || {
        let exists: bool = conn.exists(redis_key(2024)).unwrap();
        async move { exists }
    })
    .await;
    eventually(Duration::from_secs(5), "redis_up is 1", || async {
        app.scrape().await.get("redis_up", &[]) == 1.0
    })
    .await;
    app.stop().await;
}
