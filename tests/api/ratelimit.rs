//! Rate limits over real sockets: per client, unspoofable, exempt probes, cluster-wide.

use std::net::IpAddr;

use fibonacci_api::{config::Config, ratelimit::Policy};
use reqwest::StatusCode;

use crate::helpers::{
    client_from, evalsha_calls, reset_stats, spawn_app, test_config, RedisServer, TestApp,
};

fn limited(policy: &str) -> Config {
    Config {
        rate_limits: Some(Policy::parse(policy).unwrap()),
        ..test_config()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn status_from(
    app: &TestApp,
    client: &reqwest::Client,
    forwarded_for: Option<&str>,
) -> StatusCode {
    let mut request = client.get(app.url("/fibonacci?n=7"));
    if let Some(xff) = forwarded_for {
        request = request.header("x-forwarded-for", xff);
    }
    request.send().await.unwrap().status()
}

#[tokio::test]
async fn the_31st_request_in_a_minute_is_rejected_with_the_real_wait() {
    let app = spawn_app(test_config()).await;
    let client = client_from(Some(ip("127.0.0.9")));
    for i in 1..=30u64 {
        let response = client.get(app.url("/fibonacci?n=7")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {i}");
        let headers = response.headers();
        assert_eq!(headers["ratelimit-limit"], "30", "request {i}");
        assert_eq!(
            headers["ratelimit-remaining"],
            (30 - i).to_string().as_str(),
            "request {i}"
        );
        assert_eq!(
            headers["ratelimit-policy"],
            "30;w=60, 50;w=3600, 200;w=86400"
        );
        if i == 1 {
            // With a sliding window the first request frees its slot only once it has
            // slid out of the minute after the one it fell in: past the fixed window's end.
            let reset: u64 = headers["ratelimit-reset"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                (61..=120).contains(&reset),
                "RateLimit-Reset {reset}: when Remaining next grows, not the fixed window's end"
            );
        }
    }
    let response = client.get(app.url("/fibonacci?n=7")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The wait runs to the next minute plus ~2 s while the last minute slides out.
    assert!((1..=62).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(response.headers()["ratelimit-remaining"], "0");
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("30 requests per minute"),
        "{body}"
    );
    assert_eq!(
        app.scrape()
            .await
            .get("rate_limit_rejections_total", &[("window", "minute")]),
        1.0
    );
    app.stop().await;
}

#[tokio::test]
async fn distinct_addresses_have_distinct_budgets_and_probes_are_exempt() {
    let app = spawn_app(limited("3/minute")).await;
    let (a, b) = (
        client_from(Some(ip("127.0.0.2"))),
        client_from(Some(ip("127.0.0.3"))),
    );
    for _ in 0..3 {
        assert_eq!(status_from(&app, &a, None).await, StatusCode::OK);
    }
    assert_eq!(
        status_from(&app, &a, None).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        status_from(&app, &b, None).await,
        StatusCode::OK,
        "127.0.0.3 has its own budget"
    );
    for path in ["/health", "/livez", "/readyz", "/metrics", "/openapi.json"] {
        for _ in 0..5 {
            let status = a.get(app.url(path)).send().await.unwrap().status();
            assert_eq!(status, StatusCode::OK, "{path} for a limited client");
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn a_forged_forwarded_for_from_an_untrusted_peer_changes_nothing() {
    let app = spawn_app(limited("2/minute")).await;
    let client = client_from(Some(ip("127.0.0.4")));
    assert_eq!(
        status_from(&app, &client, Some("1.1.1.1")).await,
        StatusCode::OK
    );
    assert_eq!(
        status_from(&app, &client, Some("2.2.2.2")).await,
        StatusCode::OK
    );
    assert_eq!(
        status_from(&app, &client, Some("3.3.3.3")).await,
        StatusCode::TOO_MANY_REQUESTS,
        "still the same peer, whatever it claims"
    );
    app.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_rightmost_untrusted_entry_is_the_client() {
    let app = spawn_app(Config {
        trusted_proxies: vec![
            "127.0.0.5/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ],
        ..limited("2/minute")
    })
    .await;
    let proxy = client_from(Some(ip("127.0.0.5")));
    // The client forges a leftmost entry; our proxies appended the real address.
    let xff = "9.9.9.9, 198.51.100.7, 10.1.2.3";
    assert_eq!(status_from(&app, &proxy, Some(xff)).await, StatusCode::OK);
    assert_eq!(
        status_from(&app, &proxy, Some("8.8.8.8, 198.51.100.7")).await,
        StatusCode::OK
    );
    assert_eq!(
        status_from(&app, &proxy, Some("7.7.7.7, 198.51.100.7")).await,
        StatusCode::TOO_MANY_REQUESTS,
        "changing the forged entry does not buy a new budget"
    );
    assert_eq!(
        status_from(&app, &proxy, Some("198.51.100.8")).await,
        StatusCode::OK,
        "another client"
    );
    assert_eq!(
        status_from(&app, &proxy, Some("garbage")).await,
        StatusCode::OK,
        "garbage falls back to the proxy's own address, a budget of its own"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_instances_sharing_redis_and_locally_without_it() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let config = || Config {
        redis_url: Some(redis.url()),
        ..test_config()
    };
    let (one, two) = (spawn_app(config()).await, spawn_app(config()).await);
    let client = client_from(Some(ip("127.0.0.6")));
    for i in 0..20 {
        assert_eq!(
            status_from(&one, &client, None).await,
            StatusCode::OK,
            "instance one, request {i}"
        );
    }
    for i in 0..10 {
        assert_eq!(
            status_from(&two, &client, None).await,
            StatusCode::OK,
            "instance two, request {i}"
        );
    }
    assert_eq!(
        status_from(&two, &client, None).await,
        StatusCode::TOO_MANY_REQUESTS,
        "the 31st across both instances"
    );
    assert_eq!(
        status_from(&one, &client, None).await,
        StatusCode::TOO_MANY_REQUESTS
    );

    redis.kill();
    // Each instance falls back to its own limiter: it still limits, per instance.
    let other = client_from(Some(ip("127.0.0.7")));
    for app in [&one, &two] {
        let mut allowed = 0;
        for _ in 0..40 {
            if status_from(app, &other, None).await == StatusCode::OK {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 30, "local fallback limits to 30 per minute");
    }
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn rate_limits_off_means_no_limits_and_no_headers() {
    let app = spawn_app(Config {
        rate_limits: None,
        ..test_config()
    })
    .await;
    for _ in 0..60 {
        let response = app.fib("3").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get("ratelimit-limit").is_none());
    }
    app.stop().await;
}

/// A request through the trusted proxy at 127.0.0.5 carrying these raw
/// `X-Forwarded-For` lines, as an appending proxy (nginx, Envoy, ALB) forwards them.
async fn through_proxy(app: &TestApp, lines: &[&[u8]]) -> StatusCode {
    let mut headers = reqwest::header::HeaderMap::new();
    for line in lines {
        headers.append(
            "x-forwarded-for",
            reqwest::header::HeaderValue::from_bytes(line).unwrap(),
        );
    }
    client_from(Some(ip("127.0.0.5")))
        .get(app.url("/fibonacci?n=7"))
        .headers(headers)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn bytes_a_client_writes_left_of_its_address_do_not_reset_its_limit() {
    let app = spawn_app(Config {
        trusted_proxies: vec!["127.0.0.5/32".parse().unwrap()],
        ..limited("2/minute")
    })
    .await;
    for i in 1..=2 {
        assert_eq!(
            through_proxy(&app, &[b"198.51.100.7"]).await,
            StatusCode::OK,
            "request {i}"
        );
    }
    let dodges: &[(&[&[u8]], &str)] = &[
        (&[b"\x80, 198.51.100.7"], "a non-ASCII byte on the left"),
        (
            &[b"\xff\xfe garbage \x80, 198.51.100.7"],
            "binary junk on the left",
        ),
        (
            &[b"\x80", b"198.51.100.7"],
            "junk in an earlier header line",
        ),
        (
            &[b"not-an-ip, 198.51.100.7"],
            "an unparsable entry on the left",
        ),
        (&[b", ,198.51.100.7"], "empty list elements"),
        (
            &[b"9.9.9.9", b"1.2.3.4, 198.51.100.7"],
            "a forged earlier line",
        ),
    ];
    for (lines, why) in dodges {
        assert_eq!(
            through_proxy(&app, lines).await,
            StatusCode::TOO_MANY_REQUESTS,
            "{why}: the limited client must stay limited"
        );
    }
    assert_eq!(
        through_proxy(&app, &[b"\x80, 198.51.100.8"]).await,
        StatusCode::OK,
        "another client behind the same proxy is keyed on its own address"
    );
    app.stop().await;
}

/// Requests through the trusted proxy at 127.0.0.5 from `client` (any address) until
/// `attempts` are made; returns how many were allowed.
async fn allowed_through_proxy(app: &TestApp, client: &str, attempts: usize) -> usize {
    let mut allowed = 0;
    for _ in 0..attempts {
        if through_proxy(app, &[client.as_bytes()]).await == StatusCode::OK {
            allowed += 1;
        }
    }
    allowed
}

/// Ten /64s of one /48 try 30 each (their full own budget); then another /48 and an
/// IPv4 client try 30. Returns (allowed to the /48 together, to the other /48, to IPv4).
async fn rotating_64s(config: Config) -> (usize, usize, usize) {
    let app = spawn_app(Config {
        trusted_proxies: vec!["127.0.0.5/32".parse().unwrap()],
        ..config
    })
    .await;
    let mut together = 0;
    for i in 0..10 {
        together += allowed_through_proxy(&app, &format!("2001:db8:7:{i}::1"), 30).await;
    }
    let other = allowed_through_proxy(&app, "2001:db8:8:1::1", 30).await;
    let v4 = allowed_through_proxy(&app, "198.51.100.9", 30).await;
    app.stop().await;
    (together, other, v4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_48_shares_a_budget_of_factor_times_the_windows() {
    let cases = [
        (
            8,
            (240, 30, 30),
            "the default factor: 8 × 30 per minute for the /48",
        ),
        (2, (60, 30, 30), "factor 2"),
        (0, (300, 30, 30), "factor 0: no shared budget"),
    ];
    for (factor, expected, why) in cases {
        let config = Config {
            rate_limit_ipv6_48_factor: factor,
            ..test_config()
        };
        assert_eq!(rotating_64s(config).await, expected, "in process, {why}");
    }
    let Some(redis) = RedisServer::start() else {
        return;
    };
    for (factor, expected, why) in cases {
        let config = Config {
            rate_limit_ipv6_48_factor: factor,
            redis_url: Some(redis.url()),
            ..test_config()
        };
        assert_eq!(rotating_64s(config).await, expected, "in Redis, {why}");
        // Counted in Redis, not by a local fallback after a failing script.
        let mut conn = redis.conn();
        let shared: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg("ratelimit:v2:{2001:db8:7::/48}")
            .query(&mut conn)
            .unwrap();
        assert_eq!(
            shared.len(),
            if factor > 0 { 3 } else { 0 },
            "{why}: {shared:?}"
        );
        let own: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg("ratelimit:v2:{2001:db8:7::/48}:2001:db8:7::/64")
            .query(&mut conn)
            .unwrap();
        assert_eq!(own.len(), 3, "{why}: the /64's own windows {own:?}");
        redis::cmd("FLUSHALL").query::<()>(&mut conn).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lua_script_and_the_rust_window_decide_alike() {
    use fibonacci_api::{
        metrics::Metrics,
        ratelimit::{local::LocalLimiter, redis::RedisWindows, ClientKey},
        redis_client::RedisClient,
    };
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let policy = Policy::parse("3/second,10/minute,40/hour").unwrap();
    let net48 = policy.scaled(2);
    let lua = RedisWindows::with_clock_argument(&policy, Some(&net48));
    let rust = LocalLimiter::new(policy.clone(), Some(net48), 1000);
    let client = RedisClient::new(
        fibonacci_api::redis_client::Target::Node(&redis.url()),
        std::time::Duration::from_secs(5),
        &Metrics::new(),
    )
    .unwrap();
    let keys: Vec<ClientKey> = [
        "192.0.2.1",
        "192.0.2.2",
        "2001:db8:5:1::1",
        "2001:db8:5:2::1",
        "2001:db8:5:3::1",
        "2001:db8:6:1::1",
    ]
    .iter()
    .map(|a| ClientKey::of(ip(a)))
    .collect();
    let seed = rand::rng().random();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut now: u64 = 1_800_000_000_000;
    let mut rejected = 0;
    for step in 0..4000 {
        now = match rng.random_range(0..100) {
            // Mostly small steps, sometimes a jump, sometimes the clock steps back.
            0..=84 => now + rng.random_range(0..300),
            85..=92 => now + rng.random_range(1_000..4_000_000),
            _ => now.saturating_sub(rng.random_range(1..150_000)),
        };
        // One call may check several clients (the service batches concurrent checks),
        // a client more than once: each is decided as if alone, in order.
        let batch: Vec<&ClientKey> = (0..rng.random_range(1..=4))
            .map(|_| &keys[rng.random_range(0..keys.len())])
            .collect();
        // The batch script of a cluster node (keys undeclared) on every other step: both
        // variants keep the same counts.
        let in_redis: Vec<_> = if rng.random_bool(0.5) {
            lua.check_all(&client, &batch, now)
                .await
                .expect("the script runs")
        } else {
            lua.check_all_undeclared(&client, &batch, now)
                .await
                .expect("the script runs")
                .into_iter()
                .map(|answer| answer.expect("one Redis serves every key"))
                .collect()
        };
        for (key, in_redis) in batch.iter().zip(in_redis) {
            let in_process = rust.check(key, now);
            assert_eq!(
                in_redis.expect("a well-formed reply"),
                in_process,
                "seed {seed}, step {step}: {key} at {now} ms decided differently"
            );
            rejected += usize::from(!in_process.is_allowed());
        }
    }
    assert!(
        rejected > 100,
        "the sequence must exercise rejections: {rejected}"
    );
}

// A single-threaded runtime makes "concurrent" exact: every check is runnable before the
// first call goes out.
#[tokio::test]
async fn concurrent_checks_share_one_redis_call_and_stay_exact() {
    use fibonacci_api::{
        metrics::Metrics,
        ratelimit::{redis::RedisWindows, ClientKey},
        redis_client::{RedisClient, Target},
    };
    use std::sync::Arc;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let client = RedisClient::new(
        Target::Node(&redis.url()),
        std::time::Duration::from_secs(5),
        &Metrics::new(),
    )
    .unwrap();
    let windows = Arc::new(RedisWindows::new(
        &Policy::parse("30/minute").unwrap(),
        None,
    ));
    // The first call loads the script: not part of what is counted.
    let warm = ClientKey::of(ip("198.51.100.1"));
    windows.check(&client, &warm, 0).await.unwrap();
    let mut conn = redis.conn();
    reset_stats(&mut conn);

    let run = |clients: Vec<ClientKey>| {
        let (windows, client) = (windows.clone(), client.clone());
        async move {
            let checks: Vec<_> = clients
                .into_iter()
                .map(|key| {
                    let (windows, client) = (windows.clone(), client.clone());
                    tokio::spawn(async move {
                        let allowed = windows.check(&client, &key, 0).await.unwrap().is_allowed();
                        (key, allowed)
                    })
                })
                .collect();
            let mut allowed = std::collections::BTreeMap::<String, usize>::new();
            for check in checks {
                let (key, ok) = check.await.unwrap();
                *allowed.entry(key.to_string()).or_default() += usize::from(ok);
            }
            allowed
        }
    };
    // 50 checks of each of two clients, interleaved: one call, 30 each allowed.
    let two: Vec<ClientKey> = (0..100)
        .map(|i| ClientKey::of(ip(["192.0.2.1", "192.0.2.2"][i % 2])))
        .collect();
    let allowed = run(two).await;
    assert_eq!(
        allowed.values().copied().collect::<Vec<_>>(),
        [30, 30],
        "{allowed:?}"
    );
    assert_eq!(
        evalsha_calls(&mut conn),
        1,
        "100 concurrent checks, one call"
    );

    // Past the most one call carries (128), the rest go in further calls.
    reset_stats(&mut conn);
    let many: Vec<ClientKey> = (0..300u32)
        .map(|i| ClientKey::of(IpAddr::from([203, 0, 113, (i % 250) as u8])))
        .collect();
    let allowed = run(many).await;
    assert_eq!(
        allowed.values().sum::<usize>(),
        300,
        "all under their limit"
    );
    assert_eq!(evalsha_calls(&mut conn), 3, "300 checks: 128 + 128 + 44");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_value_at_a_limit_key_is_replaced_not_taken_for_an_outage() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut conn = redis.conn();
    let key = "ratelimit:v2:{198.51.100.9}";
    redis::cmd("SET")
        .arg(key)
        .arg("not a hash")
        .query::<()>(&mut conn)
        .unwrap();
    let app = spawn_app(Config {
        redis_url: Some(redis.url()),
        trusted_proxies: vec!["127.0.0.5/32".parse().unwrap()],
        ..limited("2/minute")
    })
    .await;
    let statuses: Vec<StatusCode> = {
        let mut all = Vec::new();
        for _ in 0..3 {
            all.push(through_proxy(&app, &[b"198.51.100.9"]).await);
        }
        all
    };
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ],
        "limited as usual"
    );
    let kind: String = redis::cmd("TYPE").arg(key).query(&mut conn).unwrap();
    assert_eq!(
        kind, "hash",
        "the foreign value was replaced by the client's counts"
    );
    let scrape = app.scrape().await;
    assert_eq!(
        scrape.get("redis_up", &[]),
        1.0,
        "no outage for everyone else"
    );
    assert_eq!(
        scrape.value("rate_limit_local_decisions_total", &[]),
        Some(0.0),
        "counted in Redis"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_refusing_writes_is_not_an_outage_and_limits_still_hold() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut conn = redis.conn();
    // Out of memory with no eviction: every write refused with OOM, reads and PING fine.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query::<()>(&mut conn)
        .unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query::<()>(&mut conn)
        .unwrap();
    let service = crate::helpers::spawn_binary(&[
        ("REDIS_URL", redis.url()),
        ("RATE_LIMITS", "5/minute".into()),
    ])
    .await;
    let client = reqwest::Client::new();
    let mut allowed = 0;
    for n in 0..20 {
        let status = client
            .get(format!("{}/fibonacci?n={n}", service.base()))
            .send()
            .await
            .unwrap()
            .status();
        assert!(status == 200 || status == 429, "{status}");
        allowed += usize::from(status == 200);
    }
    assert_eq!(
        allowed, 5,
        "limited in process while Redis refuses the script's writes"
    );
    let metrics = client
        .get(format!("{}/metrics", service.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = crate::helpers::Scrape::parse(&metrics);
    assert_eq!(scrape.get("redis_up", &[]), 1.0, "it answers: not down");
    let (_, lines) = service.terminate();
    let events = |name: &str| {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["event"] == name)
            .count()
    };
    assert_eq!(events("redis_unavailable"), 0, "no breaker flapping");
    assert_eq!(
        events("redis_refused"),
        1,
        "one line for the refusals: {lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_the_script_gets_it_again() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let app = spawn_app(Config {
        redis_url: Some(redis.url()),
        ..limited("3/minute")
    })
    .await;
    let client = client_from(Some(ip("127.0.0.31")));
    assert_eq!(status_from(&app, &client, None).await, StatusCode::OK);
    // As after a restart or a failover to a node that never ran it.
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query::<()>(&mut redis.conn())
        .unwrap();
    assert_eq!(status_from(&app, &client, None).await, StatusCode::OK);
    assert_eq!(status_from(&app, &client, None).await, StatusCode::OK);
    assert_eq!(
        status_from(&app, &client, None).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    let scrape = app.scrape().await;
    assert_eq!(
        scrape.value("rate_limit_local_decisions_total", &[]),
        Some(0.0),
        "every check ran in Redis, the one after the flush included"
    );
    assert_eq!(scrape.get("redis_up", &[]), 1.0);
    app.stop().await;
}
