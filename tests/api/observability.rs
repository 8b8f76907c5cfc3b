//! Metrics as operators see them: exact counts after a known sequence, bounded labels.

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
