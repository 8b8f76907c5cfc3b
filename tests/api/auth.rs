//! Optional JWT authentication: 401s that explain without leaking, rate limits keyed on
//! the token's subject, and clients over their limits costing no signature work.

use std::{net::IpAddr, path::PathBuf};

use fibonacci_api::config::Config;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{client_from, spawn_app, test_config, TestApp};

const SECRET: &str = "integration-test-secret-of-sufficient-length";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(sub: &str, exp_offset: i64, aud: &str) -> String {
    let exp = (now() as i64 + exp_offset) as u64;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp, "aud": aud}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The configuration the flags `args` give, as the binary would build it, on port 0.
pub fn config_from(args: &[&str]) -> Config {
    let config = Config::from_args(args).expect("the flags are valid");
    Config {
        listen_addr: test_config().listen_addr,
        shutdown_drain: test_config().shutdown_drain,
        ..config
    }
}

async fn app_with_auth(limits: &str) -> TestApp {
    spawn_app(config_from(&[
        "--auth-jwt-hs256-secret",
        SECRET,
        "--auth-jwt-audience",
        "fibonacci-api",
        "--rate-limits",
        limits,
    ]))
    .await
}

async fn call(app: &TestApp, from: &str, bearer: Option<&str>) -> reqwest::Response {
    let client = client_from(Some(from.parse::<IpAddr>().unwrap()));
    let mut request = client.get(app.url("/fibonacci?n=10"));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn bad_or_missing_tokens_get_a_401_that_does_not_echo_them() {
    let app = app_with_auth("100/minute").await;
    let forged = token("mallory", 300, "fibonacci-api").replace('.', "x.");
    let cases = [
        (None, "missing bearer token"),
        (Some(forged.as_str()), "invalid token"),
        (
            Some(&*token("alice", -3600, "fibonacci-api")),
            "token expired",
        ),
        (Some(&*token("alice", 300, "another-api")), "audience"),
    ];
    for (bearer, says) in cases {
        let response = call(&app, "127.0.0.11", bearer).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{says}");
        let challenge = response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(challenge.starts_with("Bearer realm="), "{challenge}");
        let body: serde_json::Value = response.json().await.unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(says), "{error:?} should say {says:?}");
        if let Some(t) = bearer {
            assert!(
                !error.contains(t) && !challenge.contains(t),
                "the token is echoed"
            );
        }
    }
    let ok = call(
        &app,
        "127.0.0.11",
        Some(&token("alice", 300, "fibonacci-api")),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(
        app.get("/health").await.status(),
        StatusCode::OK,
        "probes need no token"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_budget_follows_the_subject_not_the_address() {
    let app = app_with_auth("2/minute").await;
    let (alice, bob) = (
        token("alice", 300, "fibonacci-api"),
        token("bob", 300, "fibonacci-api"),
    );
    assert_eq!(
        call(&app, "127.0.0.12", Some(&alice)).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "127.0.0.13", Some(&alice)).await.status(),
        StatusCode::OK,
        "alice moved"
    );
    assert_eq!(
        call(&app, "127.0.0.14", Some(&alice)).await.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "a third address does not reset alice's budget"
    );
    assert_eq!(
        call(&app, "127.0.0.12", Some(&bob)).await.status(),
        StatusCode::OK,
        "bob has his own"
    );
    app.stop().await;
}

#[tokio::test]
async fn failed_authentication_is_rate_limited_by_address() {
    let app = app_with_auth("2/minute").await;
    for _ in 0..2 {
        assert_eq!(
            call(&app, "127.0.0.15", Some("garbage")).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        call(&app, "127.0.0.15", Some("garbage")).await.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "guessing tokens is limited like anything else"
    );
    app.stop().await;
}

/// RFC 9110 §11.1: the scheme is case-insensitive; §11.4: one or more spaces separate it
/// from the token68.
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let app = app_with_auth("100/minute").await;
    let good = token("alice", 300, "fibonacci-api");
    let client = client_from(None);
    let cases = [
        (format!("Bearer {good}"), StatusCode::OK, "canonical"),
        (format!("bearer {good}"), StatusCode::OK, "lower case"),
        (format!("BEARER {good}"), StatusCode::OK, "upper case"),
        (format!("bEaReR {good}"), StatusCode::OK, "mixed case"),
        (
            format!("Bearer    {good}"),
            StatusCode::OK,
            "several spaces",
        ),
        (
            format!("Bearer{good}"),
            StatusCode::UNAUTHORIZED,
            "no space",
        ),
        (
            format!("Bearer {good} {good}"),
            StatusCode::UNAUTHORIZED,
            "two tokens",
        ),
        (
            format!("Bearerx {good}"),
            StatusCode::UNAUTHORIZED,
            "another scheme",
        ),
        (
            format!("Basic {good}"),
            StatusCode::UNAUTHORIZED,
            "basic auth",
        ),
    ];
    for (authorization, expected, why) in cases {
        let response = client
            .get(app.url("/fibonacci?n=10"))
            .header("authorization", &authorization)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "{why}: {authorization:.20}…");
    }
    app.stop().await;
}

fn rs256(sub: &str) -> String {
    let key =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa-private.pem")).unwrap()).unwrap();
    encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": sub, "exp": now() + 300, "aud": "fibonacci-api"}),
        &key,
    )
    .unwrap()
}

/// A well-formed RS256 token whose signature does not match: checking it is real work.
fn forged_rs256(sub: &str) -> String {
    let genuine = rs256("someone");
    let mut parts: Vec<String> = genuine.split('.').map(str::to_owned).collect();
    parts[1] = rs256(sub).split('.').nth(1).unwrap().to_owned();
    parts.join(".")
}

async fn rs256_app(limits: &str) -> TestApp {
    spawn_app(config_from(&[
        "--auth-jwt-public-key-file",
        fixture("rsa-public.pem").to_str().unwrap(),
        "--auth-jwt-audience",
        "fibonacci-api",
        "--rate-limits",
        limits,
    ]))
    .await
}

fn seconds(response: &reqwest::Response, header: &str) -> u64 {
    response.headers()[header]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn signature_checks(app: &TestApp) -> u64 {
    app.state.config.auth.as_ref().unwrap().signature_checks()
}

/// Issue 12, item 3: an address over its limit is refused before any signature work.
#[tokio::test]
async fn an_address_over_its_limit_costs_no_signature_work() {
    let app = rs256_app("3/minute").await;
    let alice = rs256("alice");
    assert_eq!(
        call(&app, "127.0.0.21", Some(&alice)).await.status(),
        StatusCode::OK,
        "alice is verified once"
    );
    for i in 0..3 {
        assert_eq!(
            call(&app, "127.0.0.21", Some(&forged_rs256("mallory")))
                .await
                .status(),
            StatusCode::UNAUTHORIZED,
            "forgery {i}: counted against the address"
        );
    }
    let normal = call(&app, "127.0.0.21", Some(&forged_rs256("mallory"))).await;
    assert_eq!(normal.status(), StatusCode::TOO_MANY_REQUESTS);
    let checks = signature_checks(&app);
    for i in 0..20 {
        let response = call(&app, "127.0.0.21", Some(&forged_rs256("mallory"))).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "{i}");
        for header in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-policy"] {
            assert_eq!(
                response.headers()[header],
                normal.headers()[header],
                "{header} as on the limiter's own 429"
            );
        }
        let retry_after = seconds(&response, "retry-after");
        assert!(
            (1..=seconds(&normal, "retry-after")).contains(&retry_after),
            "Retry-After {retry_after}: what is left of the limiter's"
        );
        assert!(
            seconds(&response, "ratelimit-reset") <= seconds(&normal, "ratelimit-reset"),
            "RateLimit-Reset as on the limiter's own 429"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("3 requests per minute"),
            "{body}"
        );
    }
    let carol = call(&app, "127.0.0.21", Some(&rs256("carol"))).await;
    assert_eq!(
        carol.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "a never-seen token from an address over its limit is not even checked"
    );
    assert_eq!(
        signature_checks(&app),
        checks,
        "no signature was verified for an address over its limit"
    );
    assert_eq!(
        call(&app, "127.0.0.21", Some(&alice)).await.status(),
        StatusCode::OK,
        "a token already verified needs no signature work: alice behind the same NAT keeps her own budget"
    );
    assert_eq!(
        call(&app, "127.0.0.22", Some(&rs256("carol")))
            .await
            .status(),
        StatusCode::OK,
        "another address is not affected"
    );
    let scrape = app.scrape().await;
    assert_eq!(
        scrape.get("rate_limit_rejections_total", &[("window", "minute")]),
        22.0,
        "every 429 is counted, the cheap ones included"
    );
    app.stop().await;
}

/// Issue 12, item 3: a valid token over its subject's limit costs a lookup, not a signature.
#[tokio::test]
async fn a_subject_over_its_limit_costs_no_signature_work() {
    let app = rs256_app("2/minute").await;
    let alice = rs256("alice");
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(call(&app, "127.0.0.23", Some(&alice)).await.status());
    }
    assert_eq!(
        seen,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS,
        ]
    );
    assert_eq!(
        signature_checks(&app),
        1,
        "one verification for six requests with one token"
    );
    assert_eq!(
        call(&app, "127.0.0.23", Some(&rs256("bob"))).await.status(),
        StatusCode::OK,
        "a subject over its limit does not block its address"
    );
    app.stop().await;
}

#[tokio::test]
async fn rotating_the_64s_of_a_48_over_its_budget_costs_no_signature_work() {
    let app = spawn_app(config_from(&[
        "--auth-jwt-public-key-file",
        fixture("rsa-public.pem").to_str().unwrap(),
        "--auth-jwt-audience",
        "fibonacci-api",
        "--rate-limits",
        "3/minute",
        "--rate-limit-ipv6-48-factor",
        "2",
        "--trusted-proxies",
        "127.0.0.5",
    ]))
    .await;
    let proxy = client_from(Some("127.0.0.5".parse().unwrap()));
    let forge_from = |i: u32| {
        proxy
            .get(app.url("/fibonacci?n=10"))
            .header("x-forwarded-for", format!("2001:db8:48:{i:x}::1"))
            .bearer_auth(forged_rs256("mallory"))
            .send()
    };
    // The /48 shares 2 × 3 per minute: six forgeries are checked and counted.
    for i in 0..6 {
        assert_eq!(
            forge_from(i).await.unwrap().status(),
            StatusCode::UNAUTHORIZED,
            "{i}"
        );
    }
    assert_eq!(
        forge_from(6).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let checks = signature_checks(&app);
    for i in 7..60 {
        assert_eq!(
            forge_from(i).await.unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS,
            "a fresh /64 of the same /48 ({i})"
        );
    }
    assert_eq!(
        signature_checks(&app),
        checks,
        "no signature checked for a /48 over its shared budget, whichever /64 asks"
    );
    app.stop().await;
}

#[tokio::test]
async fn two_authorization_headers_are_malformed_not_a_choice() {
    let app = app_with_auth("100/minute").await;
    let good = token("alice", 300, "fibonacci-api");
    let response = reqwest::Client::new()
        .get(app.url("/fibonacci?n=10"))
        .header("authorization", format!("Bearer {good}"))
        .header("authorization", "Bearer not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("malformed"),
        "{body}"
    );
    app.stop().await;
}
