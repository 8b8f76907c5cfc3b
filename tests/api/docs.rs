//! `/docs`: the interactive documentation page and the files it loads — what a browser
//! gets (the rendering itself is checked in Chromium by tests/system/test_docs_page.py).

use fibonacci_api::{config::Config, ratelimit::Policy};
use reqwest::{header, StatusCode, Url};

use crate::{
    auth::config_from,
    helpers::{spawn_app, test_config, TestApp},
};

/// The `src`/`href` values of the page's tags.
fn references(page: &str) -> Vec<String> {
    page.split(['"', '\''])
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0].ends_with("src=") || w[0].ends_with("href="))
        .map(|w| w[1].to_owned())
        .collect()
}

async fn page(app: &TestApp) -> (reqwest::Response, Url) {
    let response = app.get("/docs").await;
    let url = response.url().clone();
    (response, url)
}

#[tokio::test]
async fn the_page_loads_only_files_this_service_serves_and_keeps_them() {
    let app = spawn_app(test_config()).await;
    let (response, base) = page(&app).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CACHE_CONTROL], "no-cache");
    let text = response.text().await.unwrap();
    let refs = references(&text);
    assert!(
        refs.len() >= 4,
        "the page loads its scripts and styles: {refs:?}"
    );
    for reference in refs {
        let url = base.join(&reference).unwrap();
        assert_eq!(
            url.origin(),
            base.origin(),
            "{reference} is loaded from this service, not a CDN"
        );
        let file = app.client.get(url.clone()).send().await.unwrap();
        assert_eq!(file.status(), StatusCode::OK, "{url}");
        let kind = file.headers()[header::CONTENT_TYPE].to_str().unwrap();
        let expected = match reference.rsplit('.').next().unwrap() {
            "js" => "text/javascript",
            "css" => "text/css",
            "png" => "image/png",
            other => panic!("unexpected file type {other}"),
        };
        assert!(kind.starts_with(expected), "{url}: {kind}");
        assert_eq!(
            file.headers()[header::CACHE_CONTROL],
            "public, max-age=31536000, immutable",
            "{url}: under this build's fingerprint, a file never changes"
        );
        assert!(!file.bytes().await.unwrap().is_empty(), "{url}");
    }
}

#[tokio::test]
async fn the_page_asks_for_this_instances_document() {
    let app = spawn_app(Config {
        max_n: 777,
        ..test_config()
    })
    .await;
    let (response, base) = page(&app).await;
    let text = response.text().await.unwrap();
    let initializer = references(&text)
        .into_iter()
        .find(|r| r.ends_with("swagger-initializer.js"))
        .expect("the page runs an initializer");
    let script = app
        .client
        .get(base.join(&initializer).unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let document = script
        .split("\"url\": \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the initializer names a document");
    let document: serde_json::Value = app
        .client
        .get(base.join(document).unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        document["paths"]["/fibonacci"]["get"]["parameters"][0]["schema"]["maximum"], 777,
        "the page documents this instance (its MAX_N), from the same origin"
    );
    assert!(
        script.contains("\"validatorUrl\": \"none\""),
        "Swagger's validator badge would load an image from swagger.io"
    );
}

#[tokio::test]
async fn only_the_docs_relax_the_content_security_policy() {
    let app = spawn_app(test_config()).await;
    let api = app.fib("10").await;
    assert_eq!(
        api.headers()[header::CONTENT_SECURITY_POLICY],
        "default-src 'none'; frame-ancestors 'none'"
    );
    let (docs, _) = page(&app).await;
    let policy = docs.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    for needed in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
    ] {
        assert!(policy.contains(needed), "{needed} in {policy}");
    }
    for never in ["unsafe-inline", "unsafe-eval", "http:", "https:", "*"] {
        assert!(!policy.contains(never), "{never} in {policy}");
    }
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
}

#[tokio::test]
async fn a_browser_revalidating_the_page_or_a_file_gets_304_without_a_body() {
    let app = spawn_app(test_config()).await;
    let (response, base) = page(&app).await;
    let page_tag = response.headers()[header::ETAG].clone();
    let text = response.text().await.unwrap();
    let file_url = base.join(&references(&text)[0]).unwrap();
    let file_tag = app
        .client
        .get(file_url.clone())
        .send()
        .await
        .unwrap()
        .headers()[header::ETAG]
        .clone();
    for (url, tag) in [(base.clone(), page_tag), (file_url, file_tag)] {
        let again = app
            .client
            .get(url.clone())
            .header(header::IF_NONE_MATCH, tag.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{url}");
        assert_eq!(again.headers()[header::ETAG], tag, "{url}");
        assert!(again.bytes().await.unwrap().is_empty(), "{url}");
        let stale = app
            .client
            .get(url.clone())
            .header(header::IF_NONE_MATCH, "\"another\"")
            .send()
            .await
            .unwrap();
        assert_eq!(stale.status(), StatusCode::OK, "{url}");
    }
}

#[tokio::test]
async fn files_of_another_release_are_served_but_not_kept_and_unknown_files_are_404() {
    let app = spawn_app(test_config()).await;
    let other = app.get("/docs/0123456789abcdef/swagger-ui.css").await;
    assert_eq!(
        other.status(),
        StatusCode::OK,
        "a page from the release before, mid-rollout"
    );
    assert_eq!(other.headers()[header::CACHE_CONTROL], "no-cache");
    for path in [
        "/docs/0123456789abcdef/index.html",
        "/docs/0123456789abcdef/..%2F..%2Fmetrics",
        "/docs/x/y/z",
        "/docs/swagger-ui.css",
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{path}: the API's JSON error");
    }
}

#[tokio::test]
async fn docs_slash_leads_to_the_page() {
    let app = spawn_app(test_config()).await;
    let response = app.get("/docs/").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.url().path(), "/docs", "followed the redirect");
}

#[tokio::test]
async fn the_docs_are_never_rate_limited_and_spend_no_ones_budget() {
    let app = spawn_app(Config {
        rate_limits: Some(Policy::parse("1/minute").unwrap()),
        ..test_config()
    })
    .await;
    for _ in 0..20 {
        let (response, _) = page(&app).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get("ratelimit-limit").is_none());
    }
    assert_eq!(
        app.fib("1").await.status(),
        StatusCode::OK,
        "the budget is intact"
    );
    assert_eq!(app.fib("1").await.status(), StatusCode::TOO_MANY_REQUESTS);
    let (response, _) = page(&app).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "a limited client still reads the docs"
    );
}

#[tokio::test]
async fn docs_requests_are_counted_under_their_routes() {
    let app = spawn_app(test_config()).await;
    let (response, base) = page(&app).await;
    let text = response.text().await.unwrap();
    app.client
        .get(base.join(&references(&text)[0]).unwrap())
        .send()
        .await
        .unwrap();
    let scrape = app.scrape().await;
    for route in ["/docs", "/docs/{version}/{file}"] {
        assert_eq!(
            scrape.get(
                "http_requests_total",
                &[("method", "GET"), ("route", route), ("status", "200")]
            ),
            1.0,
            "{route}"
        );
    }
}

#[tokio::test]
async fn with_an_admin_listener_the_docs_stay_on_the_public_port() {
    let app = spawn_app(Config {
        admin_listen_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    })
    .await;
    let admin = app.admin_addr.expect("admin bound");
    assert_eq!(page(&app).await.0.status(), StatusCode::OK);
    let on_admin = app
        .client
        .get(format!("http://{admin}/docs"))
        .send()
        .await
        .unwrap();
    assert_eq!(on_admin.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn turned_off_there_is_no_page() {
    let app = spawn_app(Config {
        docs_enabled: false,
        ..test_config()
    })
    .await;
    for path in ["/docs", "/docs/", "/docs/0123456789abcdef/swagger-ui.css"] {
        assert_eq!(
            app.get(path).await.status(),
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    assert_eq!(
        app.get("/openapi.json").await.status(),
        StatusCode::OK,
        "the document stays"
    );
}

/// The `error` of the document's example response `status` of `/fibonacci`.
pub async fn documented_error(app: &TestApp, status: u16) -> String {
    let document: serde_json::Value = app.get("/openapi.json").await.json().await.unwrap();
    let pointer = format!(
        "/paths/~1fibonacci/get/responses/{status}/content/application~1json/example/error"
    );
    document
        .pointer(&pointer)
        .and_then(|e| e.as_str())
        .unwrap_or_else(|| panic!("no example for {status}"))
        .to_owned()
}

/// An instance that requires HS256 JWTs (any audience).
async fn secured_app() -> TestApp {
    spawn_app(config_from(&[
        "--auth-jwt-hs256-secret",
        "hunter2-jwt-secret-of-32-bytes-or-more",
        "--auth-jwt-audience",
        "*",
    ]))
    .await
}

async fn error_of(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.unwrap();
    body["error"].as_str().unwrap().to_owned()
}

/// The seconds in "retry in 52 s" vary, in value and in width ("retry in 9 s" near the
/// end of a window: replacing digit by digit made this test fail then); the rest of the
/// message must not. Each run of digits becomes one `#`.
fn without_digits(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for c in message.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('#') {
            out.push('#');
        }
    }
    out
}

#[tokio::test]
async fn the_documents_error_examples_are_what_the_service_says() {
    let app = spawn_app(config_from(&["--rate-limits", "30/minute"])).await;
    assert_eq!(
        error_of(app.fib("5000").await).await,
        documented_error(&app, 400).await
    );
    let post = app
        .client
        .post(app.url("/fibonacci?n=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(post).await, documented_error(&app, 405).await);
    let mut last = None;
    for _ in 0..30 {
        last = Some(app.fib("1").await);
    }
    assert_eq!(last.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        without_digits(&error_of(app.fib("1").await).await),
        without_digits(&documented_error(&app, 429).await)
    );
    let secured = secured_app().await;
    assert_eq!(
        error_of(secured.fib("1").await).await,
        documented_error(&secured, 401).await
    );
}

/// The probes' documented answers are the ones they give (they once all showed the
/// `/health` body, and `/readyz`'s 503 an error about `n`).
#[tokio::test]
async fn the_probes_documented_answers_are_what_they_answer() {
    let app = spawn_app(config_from(&[])).await;
    let document: serde_json::Value = app.get("/openapi.json").await.json().await.unwrap();
    for path in ["/health", "/livez", "/readyz"] {
        let pointer = format!(
            "/paths/~1{}/get/responses/200/content/application~1json/example",
            &path[1..]
        );
        let documented = document
            .pointer(&pointer)
            .unwrap_or_else(|| panic!("no 200 example for {path}"));
        let answered: serde_json::Value = app.get(path).await.json().await.unwrap();
        assert_eq!(&answered, documented, "{path}");
    }
    let not_ready = document
        .pointer("/paths/~1readyz/get/responses/503/content/application~1json/example/error")
        .and_then(|e| e.as_str())
        .expect("a 503 example for /readyz");
    assert!(not_ready.starts_with("not ready: "), "{not_ready}");
}

/// With JWT auth on, the document declares the bearer scheme on `/fibonacci` (so /docs
/// offers "Authorize" and Try it out sends the token); without it, nothing asks for one.
#[tokio::test]
async fn the_document_asks_for_a_bearer_token_exactly_when_the_service_does() {
    let open = spawn_app(config_from(&[])).await;
    let document: serde_json::Value = open.get("/openapi.json").await.json().await.unwrap();
    assert!(document.pointer("/components/securitySchemes").is_none());
    assert!(document
        .pointer("/paths/~1fibonacci/get/security")
        .is_none());

    let secured = secured_app().await;
    let document: serde_json::Value = secured.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(
        document.pointer("/components/securitySchemes/bearer"),
        Some(&serde_json::json!({"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}))
    );
    assert_eq!(
        document.pointer("/paths/~1fibonacci/get/security"),
        Some(&serde_json::json!([{"bearer": []}]))
    );
    assert!(
        document.pointer("/paths/~1health/get/security").is_none(),
        "the probes need no token"
    );
}
