//! Graceful shutdown: readiness fails first, serving goes on through the drain period,
//! in-flight requests finish, then the listener closes.

use std::time::Duration;

use fibonacci_api::config::Config;
use reqwest::StatusCode;

use crate::helpers::{eventually, spawn_app, stalling, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_first_and_serving_goes_on_through_the_drain() {
    let mut app = spawn_app(Config {
        shutdown_drain: Duration::from_secs(2),
        rate_limits: None,
        ..test_config()
    })
    .await;
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);
    app.signal_shutdown();
    eventually(Duration::from_secs(5), "readiness turns 503", || async {
        app.get("/readyz").await.status() == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let body: serde_json::Value = app.get("/readyz").await.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("draining"),
        "{body}"
    );
    // Still answering while load balancers take it out of rotation.
    let during = app.fib("10").await;
    assert_eq!(during.status(), StatusCode::OK, "served during the drain");
    assert_eq!(
        during
            .headers()
            .get("connection")
            .map(|v| v.to_str().unwrap()),
        Some("close"),
        "keep-alive clients are told to reconnect elsewhere"
    );
    assert_eq!(
        app.get("/livez").await.status(),
        StatusCode::OK,
        "still alive while draining"
    );
    let addr = app.addr;
    app.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed after the drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_request_finishes_during_shutdown() {
    let mut app = spawn_app(stalling(Duration::from_millis(1500)).await).await;
    let slow = tokio::spawn(app.client.get(app.url("/fibonacci?n=900")).send());
    let state = app.state.clone();
    eventually(Duration::from_secs(5), "the request is in flight", || {
        let busy = crate::helpers::Scrape::parse(&state.metrics.render())
            .get("http_requests_in_flight", &[])
            >= 1.0;
        async move { busy }
    })
    .await;
    app.signal_shutdown();
    let response = slow
        .await
        .unwrap()
        .expect("the in-flight request was answered");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.text().await.unwrap();
    let expected = fibonacci_api::fib::fibonacci_decimal(900);
    assert_eq!(body, format!(r#"{{"n":900,"fibonacci":{expected}}}"#));
    app.stop().await;
}
