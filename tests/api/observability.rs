//! Metrics as operators see them: exact counts after a known sequence, bounded labels.

use std::time::Duration;

use fibonacci_api::config::Config;

use crate::helpers::{spawn_app, test_config};

const REQUESTS: &str = "http_requests_total";

#[tokio::test]
async fn a_known_sequence_gives_exact_counts() {
    let app = spawn_app(Config {
        rate_limits: Some(fibonacci_api::ratelimit::Policy::parse("3/minute").unwrap()),
        ..test_config()
    })
    .await;
    for path in [
        "/fibonacci?n=10",
        "/fibonacci?n=10",
        "/fibonacci?n=x",
        "/fibonacci?n=11",
        "/health",
        "/nope",
    ] {
        app.get(path).await;
    }
    app.client.post(app.url("/health")).send().await.unwrap();
    let scrape = app.scrape().await;
    let series = |method, route, status| {
        scrape.get(
            REQUESTS,
            &[("method", method), ("route", route), ("status", status)],
        )
    };
    assert_eq!(series("GET", "/fibonacci", "200"), 2.0);
    assert_eq!(series("GET", "/fibonacci", "400"), 1.0);
    assert_eq!(
        series("GET", "/fibonacci", "429"),
        1.0,
        "the 4th of 3/minute"
    );
    assert_eq!(series("GET", "/health", "200"), 1.0);
    assert_eq!(series("POST", "/health", "405"), 1.0);
    assert_eq!(series("GET", "unmatched", "404"), 1.0);
    assert_eq!(
        scrape.count(
            "http_request_duration_seconds",
            &[
                ("method", "GET"),
                ("route", "/fibonacci"),
                ("status", "200")
            ]
        ),
        2.0
    );
    let cache = |tier, result| {
        scrape.get(
            "fibonacci_cache_requests_total",
            &[("tier", tier), ("result", result)],
        )
    };
    assert_eq!(cache("memory", "miss"), 1.0, "n=10 the first time");
    assert_eq!(cache("memory", "hit"), 1.0, "n=10 the second time");
    assert_eq!(scrape.count("fibonacci_compute_duration_seconds", &[]), 1.0);
    assert_eq!(
        scrape.get("rate_limit_rejections_total", &[("window", "minute")]),
        1.0
    );
    assert_eq!(
        scrape.get("http_requests_in_flight", &[]),
        1.0,
        "the scrape itself"
    );
    assert_eq!(
        scrape.get(
            "build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("revision", env!("FIBONACCI_API_REVISION"))
            ]
        ),
        1.0
    );
    for process_metric in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(
            scrape.samples.iter().any(|s| s.metric == process_metric),
            "{process_metric}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_404s_adds_no_series() {
    let app = spawn_app(test_config()).await;
    app.get("/nope").await;
    let before = app.scrape().await.samples.len();
    for i in 0..200 {
        app.get(&format!("/random/{i}?q={i}")).await;
        app.client
            .request(
                reqwest::Method::from_bytes(format!("X{i}").as_bytes()).unwrap(),
                app.url("/"),
            )
            .send()
            .await
            .unwrap();
    }
    let scrape = app.scrape().await;
    let after_labels: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == REQUESTS)
        .map(|s| s.labels.clone())
        .collect();
    assert!(
        scrape.samples.len() <= before + 40,
        "{} series before, {} after: labels are unbounded? {after_labels:?}",
        before,
        scrape.samples.len()
    );
    assert_eq!(
        scrape.get(
            REQUESTS,
            &[("method", "GET"), ("route", "unmatched"), ("status", "404")]
        ),
        201.0
    );
    assert_eq!(
        scrape.get(
            REQUESTS,
            &[
                ("method", "other"),
                ("route", "unmatched"),
                ("status", "404")
            ]
        ),
        200.0
    );
    app.stop().await;
}

#[tokio::test]
async fn with_an_admin_listener_metrics_and_probes_are_served_only_there() {
    let app = spawn_app(Config {
        admin_listen_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    })
    .await;
    let admin = app.admin_addr.expect("admin bound");
    let status = |url: String| {
        let client = app.client.clone();
        async move { client.get(url).send().await.unwrap().status() }
    };
    for path in ["/metrics", "/livez", "/readyz"] {
        assert_eq!(
            status(format!("http://{admin}{path}")).await,
            reqwest::StatusCode::OK,
            "admin {path}"
        );
        assert_eq!(
            status(app.url(path)).await,
            reqwest::StatusCode::NOT_FOUND,
            "{path} must not be on the public port when an admin port exists (an Ingress would expose it)"
        );
    }
    for path in ["/fibonacci?n=1", "/health", "/openapi.json"] {
        assert_eq!(
            status(app.url(path)).await,
            reqwest::StatusCode::OK,
            "public {path}"
        );
    }
    assert_eq!(
        status(format!("http://{admin}/fibonacci?n=1")).await,
        reqwest::StatusCode::NOT_FOUND,
        "the API is not on the admin port"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_and_its_end_are_logged_once_with_the_real_cause() {
    let Some(mut redis) = crate::helpers::RedisServer::start() else {
        return;
    };
    // The default log level: what an operator sees without turning anything up.
    let service = crate::helpers::spawn_binary(&[
        ("REDIS_URL", redis.url()),
        ("RATE_LIMITS", "1000/minute".into()),
    ])
    .await;
    let client = reqwest::Client::new();
    let fib = |n: u32| {
        client
            .get(format!("{}/fibonacci?n={n}", service.base()))
            .send()
    };
    assert_eq!(fib(1).await.unwrap().status(), 200);
    redis.kill();
    for n in 2..22 {
        assert_eq!(
            fib(n).await.unwrap().status(),
            200,
            "served through the outage"
        );
    }
    let events = |name: &str| -> Vec<serde_json::Value> {
        service
            .json_lines()
            .into_iter()
            .filter(|l| l["event"] == name)
            .collect()
    };
    let down = events("redis_unavailable");
    assert!(
        !down.is_empty() && down.len() <= 3,
        "the outage is logged, once per change of cause, not per request: {down:#?}"
    );
    assert!(down.iter().all(|l| l["level"] == "WARN"), "{down:#?}");
    assert!(
        down.iter().any(|l| l["cause"] == "connection refused"),
        "a closed port is called what it is: {down:#?}"
    );
    redis.restart();
    crate::helpers::eventually(Duration::from_secs(10), "the recovery line", || {
        let back = !events("redis_available").is_empty();
        async move { back }
    })
    .await;
    let up = events("redis_available");
    assert_eq!(up.len(), 1, "{up:#?}");
    assert_eq!(up[0]["level"], "INFO");
    // The restarted Redis has lost the limiter's script: loading it again is routine.
    assert_eq!(fib(30).await.unwrap().status(), 200);
    let (status, lines) = service.terminate();
    assert!(status.success());
    let refused: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("redis_refused"))
        .collect();
    assert!(
        refused.is_empty(),
        "a script loaded on first use (at start, after a restart) is no refusal to warn of: {refused:#?}"
    );
}

#[test]
fn text_logs_written_to_a_pipe_have_no_colour_codes() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fibonacci-api"))
        .env_clear()
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "text")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap() > 0 && !line.contains("serving") {}
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("serving"), "no serving line: {line:?}");
    assert!(!line.contains('\x1b'), "ANSI escapes in a pipe: {line:?}");
}

#[tokio::test]
async fn a_panicking_handler_is_counted_logged_and_answered_like_any_error() {
    use axum::{body::Body, routing::get, Router};
    use tower::ServiceExt;
    let app = fibonacci_api::state::App::new(test_config()).unwrap();
    let boom = Router::new().route(
        "/boom",
        get(|| async {
            panic!("boom");
            #[allow(unreachable_code)]
            ""
        }),
    );
    let router = fibonacci_api::http::router_with(app.clone(), boom);
    let response = router
        .oneshot(http::Request::get("/boom").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(
        response.headers()["x-content-type-options"],
        "nosniff",
        "security headers on a panic's response too"
    );
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    assert_eq!(
        &body[..],
        br#"{"error":"internal error"}"#,
        "opaque to the client"
    );
    let scrape = crate::helpers::Scrape::parse(&app.metrics.render());
    let errors: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "http_requests_total" && s.labels.get("status") == Some("500"))
        .map(|s| s.value)
        .sum();
    assert_eq!(errors, 1.0, "the availability SLI sees the panic");
    assert_eq!(scrape.get("http_requests_in_flight", &[]), 0.0, "no leak");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_abandoned_by_their_clients_are_counted_as_499_and_leave_the_gauge() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app(crate::helpers::stalling(Duration::from_secs(60)).await).await;
    let in_flight = || async { app.scrape().await.get("http_requests_in_flight", &[]) };
    let mut clients = Vec::new();
    for n in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let request = format!("GET /fibonacci?n={} HTTP/1.1\r\nHost: x\r\n\r\n", 100 + n);
        stream.write_all(request.as_bytes()).await.unwrap();
        clients.push(stream);
    }
    // 20 stalled on the black-holed Redis, plus the scrape asking.
    crate::helpers::eventually(Duration::from_secs(10), "20 requests in flight", || async {
        in_flight().await == 21.0
    })
    .await;
    drop(clients);
    crate::helpers::eventually(
        Duration::from_secs(10),
        "the gauge to come back",
        || async { in_flight().await == 1.0 },
    )
    .await;
    let scrape = app.scrape().await;
    assert_eq!(
        scrape.get(
            "http_requests_total",
            &[
                ("method", "GET"),
                ("route", "/fibonacci"),
                ("status", "499")
            ]
        ),
        20.0,
        "each abandoned request counted once, as 499"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_taken_if_sane_or_made_then_echoed_and_logged() {
    let service = crate::helpers::spawn_binary(&[]).await;
    let client = reqwest::Client::new();
    let send = |id: Option<&str>| {
        let mut request = client.get(format!("{}/fibonacci?n=8", service.base()));
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    };
    let ours = "4bf92f35-77b3-4da6.a3ce:929d_0e0e";
    assert_eq!(send(Some(ours)).await, ours, "a sane incoming id is kept");
    let generated = |id: &str| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let long = "a".repeat(65);
    for bad in [long.as_str(), "has space", "semi;colon", "new\tline", "ü"] {
        let echoed = send(Some(bad)).await;
        assert!(
            generated(&echoed),
            "{bad:?} replaced by a generated id, got {echoed:?}"
        );
    }
    let (a, b) = (send(None).await, send(None).await);
    assert!(
        generated(&a) && generated(&b) && a != b,
        "fresh ids: {a} {b}"
    );
    let (_, lines) = service.terminate();
    let logged: Vec<String> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "request")
        .map(|l| l["request_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(logged.contains(&ours.to_owned()), "{logged:?}");
    assert!(logged.contains(&a) && logged.contains(&b), "{logged:?}");
}

#[tokio::test]
async fn requested_n_is_counted_by_range_and_by_where_the_answer_came_from() {
    let app = spawn_app(Config {
        rate_limits: None,
        ..test_config()
    })
    .await;
    for n in ["5", "5", "500", "bad", "2000"] {
        app.fib(n).await;
    }
    let scrape = app.scrape().await;
    let buckets = |from: &str| -> Vec<(f64, f64)> {
        scrape
            .samples
            .iter()
            .filter(|s| {
                s.metric == "fibonacci_requested_n_bucket"
                    && s.labels.get("answered_from") == Some(from)
            })
            .map(|s| (s.labels.get("le").unwrap().parse().unwrap(), s.value))
            .collect()
    };
    let computed = buckets("computation");
    assert_eq!(
        computed.iter().find(|b| b.0 == 10.0).unwrap().1,
        1.0,
        "n=5 computed once: {computed:?}"
    );
    assert_eq!(
        computed.iter().find(|b| b.0 == 1000.0).unwrap().1,
        2.0,
        "and n=500: {computed:?}"
    );
    let memory = buckets("memory");
    assert_eq!(
        memory.iter().find(|b| b.0 == 10.0).unwrap().1,
        1.0,
        "n=5 again, from memory: {memory:?}"
    );
    assert_eq!(
        scrape.count("fibonacci_requested_n", &[("answered_from", "computation")])
            + scrape.count("fibonacci_requested_n", &[("answered_from", "memory")]),
        3.0,
        "answers only: 400s are not counted"
    );
    app.stop().await;
}

/// This process's CPU seconds (user + system), from /proc, in clock ticks of 1/100 s.
fn cpu_seconds_now() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based).
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test]
async fn process_cpu_seconds_are_not_truncated_to_whole_seconds() {
    let app = spawn_app(test_config()).await;
    // Some CPU, so that the fraction is most likely not zero.
    let until = std::time::Instant::now() + Duration::from_millis(150);
    let mut x = 0u64;
    while std::time::Instant::now() < until {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
    }
    std::hint::black_box(x);
    let before = cpu_seconds_now();
    let exported = app.scrape().await.get("process_cpu_seconds_total", &[]);
    let after = cpu_seconds_now();
    assert!(
        exported >= before - 0.011 && exported <= after + 0.011,
        "process_cpu_seconds_total {exported} vs /proc {before}..{after}: a rate() over it \
         would read 0 most of the time"
    );
    app.stop().await;
}

/// An operator can confirm from the start-up line that `/docs` is off in production.
#[test]
fn the_serving_line_says_whether_the_docs_are_on() {
    use std::io::{BufRead, BufReader};
    for (setting, expected) in [("true", true), ("false", false)] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fibonacci-api"))
            .env_clear()
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("DOCS_ENABLED", setting)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while stdout.read_line(&mut line).unwrap() > 0 && !line.contains("\"serving\"") {
            line.clear();
        }
        let _ = child.kill();
        let _ = child.wait();
        let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON serving line");
        assert_eq!(json["docs"], expected, "DOCS_ENABLED={setting}: {line}");
    }
}

/// `build_info`'s revision is the commit the tests were built from, also after a commit
/// without `cargo clean` (build.rs watches the branch's ref, not only `.git/HEAD`, which a
/// commit does not touch). Skipped where the build was stamped by `GIT_REVISION` or there
/// is no git to ask.
#[test]
fn the_build_is_stamped_with_the_commit_checked_out() {
    if option_env!("GIT_REVISION").is_some_and(|r| !r.trim().is_empty()) {
        return;
    }
    let Ok(out) = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    else {
        eprintln!("SKIPPING: no git");
        return;
    };
    if !out.status.success() {
        eprintln!("SKIPPING: not a git checkout");
        return;
    }
    assert_eq!(
        env!("FIBONACCI_API_REVISION"),
        String::from_utf8_lossy(&out.stdout).trim(),
        "the binary reports another revision than the one checked out"
    );
}
