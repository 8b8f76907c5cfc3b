//! Optional JWT authentication: 401s that explain without leaking, and rate limits
//! keyed on the token's subject.

use std::{net::IpAddr, sync::Arc};

use fibonacci_api::{
    auth::{Authenticator, KeySource},
    config::Config,
    ratelimit::Policy,
};
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

async fn app_with_auth(limits: &str) -> TestApp {
    let auth = Authenticator::new(
        KeySource {
            hs256_secret: Some(SECRET),
            ..Default::default()
        },
        Some("fibonacci-api"),
        None,
    )
    .unwrap();
    spawn_app(Config {
        auth: Some(Arc::new(auth)),
        rate_limits: Some(Policy::parse(limits).unwrap()),
        ..test_config()
    })
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
