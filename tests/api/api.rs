//! The HTTP contract: bodies, statuses, content types and caching headers.

use fibonacci_api::{config::Config, fib};
use reqwest::{header, StatusCode};

use crate::helpers::{spawn_app, test_config};

fn unlimited() -> Config {
    Config {
        rate_limits: None,
        ..test_config()
    }
}

#[tokio::test]
async fn answers_are_exact_json_integers() {
    let app = spawn_app(unlimited()).await;
    for (n, expected) in [
        ("0", "0".to_string()),
        ("1", "1".into()),
        ("2", "1".into()),
        ("10", "55".into()),
        ("1000", fib::fibonacci_decimal(1000)),
    ] {
        let response = app.fib(n).await;
        assert_eq!(response.status(), StatusCode::OK, "n={n}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/json",
            "n={n}"
        );
        let body = response.text().await.unwrap();
        // Compared as text: the number must be exact, whatever a float-based parser does.
        assert_eq!(body, format!(r#"{{"n":{n},"fibonacci":{expected}}}"#));
        serde_json::from_str::<serde::de::IgnoredAny>(&body).expect("valid JSON");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_readme_examples() {
    let app = spawn_app(unlimited()).await;
    let two: serde_json::Value = app.fib("2").await.json().await.unwrap();
    assert_eq!(two, serde_json::json!({"n": 2, "fibonacci": 1}));
    let ten: serde_json::Value = app.fib("10").await.json().await.unwrap();
    assert_eq!(ten, serde_json::json!({"n": 10, "fibonacci": 55}));
    let health: serde_json::Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health, serde_json::json!({"status": "healthy"}));
    app.stop().await;
}

#[tokio::test]
async fn raising_max_n_serves_f_100000_exactly() {
    let app = spawn_app(Config {
        max_n: 100_000,
        ..unlimited()
    })
    .await;
    let body = app.fib("100000").await.text().await.unwrap();
    let digits = fib::fibonacci_decimal(100_000);
    assert_eq!(digits.len(), 20_899);
    assert_eq!(body, format!(r#"{{"n":100000,"fibonacci":{digits}}}"#));
    assert_eq!(app.fib("100001").await.status(), StatusCode::BAD_REQUEST);
    app.stop().await;
}

#[tokio::test]
async fn bad_input_is_a_400_that_explains() {
    let app = spawn_app(unlimited()).await;
    let long = "9".repeat(5000);
    let cases = [
        ("/fibonacci", "missing", "missing"),
        ("/fibonacci?n=", "empty", "empty"),
        ("/fibonacci?n=-1", "negative", "non-negative"),
        (
            "/fibonacci?n=1.5",
            "fraction",
            "plain non-negative decimal integer",
        ),
        (
            "/fibonacci?n=1e3",
            "exponent",
            "plain non-negative decimal integer",
        ),
        (
            "/fibonacci?n=0x1F",
            "hex",
            "plain non-negative decimal integer",
        ),
        (
            "/fibonacci?n=%2010",
            "whitespace",
            "plain non-negative decimal integer",
        ),
        (
            "/fibonacci?n=%D9%A3",
            "Arabic-Indic digit",
            "plain non-negative decimal integer",
        ),
        ("/fibonacci?n=1&n=2", "repeated", "more than once"),
        ("/fibonacci?n=1001", "above MAX_N", "at most 1000"),
        (
            "/fibonacci?n=99999999999999999999999",
            "beyond u64",
            "at most 1000",
        ),
        ("/fibonacci?n=abc", "letters", "0 to 1000"),
    ];
    for (path, why, says) in cases {
        let response = app.get(path).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{why}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/json",
            "{why}"
        );
        assert!(
            response.headers().get(header::CACHE_CONTROL).is_none(),
            "{why}: errors are not cacheable"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        let error = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{why}: no error string in {body}"));
        assert!(
            error.contains(says),
            "{why}: {error:?} should mention {says:?}"
        );
    }
    let response = app.get(&format!("/fibonacci?n={long}")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST, "5000 digits");
    assert!(
        response.text().await.unwrap().len() < 300,
        "the message stays short"
    );
    app.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let app = spawn_app(unlimited()).await;
    for (method, path, status) in [
        (reqwest::Method::GET, "/nope", StatusCode::NOT_FOUND),
        (reqwest::Method::GET, "/fibonacci/10", StatusCode::NOT_FOUND),
        (
            reqwest::Method::POST,
            "/fibonacci?n=1",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            reqwest::Method::DELETE,
            "/health",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ] {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{method} {path}: {body}");
    }
    let head = app
        .client
        .head(app.url("/fibonacci?n=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK, "HEAD is GET without a body");
    app.stop().await;
}

#[tokio::test]
async fn answers_say_they_never_change() {
    let app = spawn_app(unlimited()).await;
    let response = app.fib("42").await;
    let etag = response.headers()[header::ETAG].clone();
    let cache_control = response.headers()[header::CACHE_CONTROL]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        etag.to_str().unwrap().starts_with('"'),
        "a strong ETag: {etag:?}"
    );
    assert!(
        cache_control.contains("max-age=31536000") && cache_control.contains("immutable"),
        "{cache_control}"
    );
    assert_ne!(
        app.fib("43").await.headers()[header::ETAG],
        etag,
        "each n has its own tag"
    );

    let revalidated = app
        .client
        .get(app.url("/fibonacci?n=42"))
        .header(header::IF_NONE_MATCH, etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(revalidated.headers()[header::ETAG], etag);
    assert!(revalidated.text().await.unwrap().is_empty());

    let other = app
        .client
        .get(app.url("/fibonacci?n=42"))
        .header(header::IF_NONE_MATCH, "\"something-else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(
        other.status(),
        StatusCode::OK,
        "a stale tag gets the full answer"
    );
    app.stop().await;
}

#[tokio::test]
async fn probes_and_openapi() {
    let app = spawn_app(test_config()).await;
    assert_eq!(app.get("/livez").await.status(), StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);
    let doc: serde_json::Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "OpenAPI 3.1: {}",
        doc["openapi"]
    );
    for path in [
        "/fibonacci",
        "/health",
        "/livez",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            doc["paths"][path]["get"].is_object(),
            "{path} is documented"
        );
    }
    let responses = &doc["paths"]["/fibonacci"]["get"]["responses"];
    for status in ["200", "304", "400", "405", "429", "503"] {
        assert!(
            responses[status].is_object(),
            "/fibonacci documents {status}"
        );
    }
    assert_eq!(
        doc["paths"]["/fibonacci"]["get"]["parameters"][0]["schema"]["maximum"],
        1000
    );
    app.stop().await;
}

#[tokio::test]
async fn security_headers_on_every_response() {
    let app = spawn_app(unlimited()).await;
    for path in [
        "/fibonacci?n=3",
        "/fibonacci?n=x",
        "/health",
        "/nope",
        "/metrics",
    ] {
        let response = app.get(path).await;
        assert_eq!(
            response.headers()["x-content-type-options"],
            "nosniff",
            "{path}"
        );
        assert!(
            response.headers().get(header::SERVER).is_none(),
            "{path}: no server banner"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let closed = spawn_app(unlimited()).await;
    let response = closed
        .client
        .get(closed.url("/fibonacci?n=1"))
        .header(header::ORIGIN, "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none(),
        "nothing allowed by default"
    );
    closed.stop().await;

    let open = spawn_app(Config {
        cors_allowed_origins: vec!["https://app.example".parse().unwrap()],
        ..unlimited()
    })
    .await;
    for (origin, allowed) in [
        ("https://app.example", true),
        ("https://evil.example", false),
    ] {
        let response = open
            .client
            .get(open.url("/fibonacci?n=1"))
            .header(header::ORIGIN, origin)
            .send()
            .await
            .unwrap();
        let header = response.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN);
        assert_eq!(header.is_some(), allowed, "{origin}");
        // A browser's preflight before a cross-origin request: answered by the CORS layer,
        // allowing the listed origin only.
        let preflight = open
            .client
            .request(reqwest::Method::OPTIONS, open.url("/fibonacci?n=1"))
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "GET")
            .send()
            .await
            .unwrap();
        assert_eq!(preflight.status(), 200, "preflight from {origin}");
        let headers = preflight.headers();
        assert_eq!(
            headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_some(),
            allowed,
            "preflight from {origin}"
        );
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_METHODS], "GET,HEAD");
    }
    open.stop().await;
}
