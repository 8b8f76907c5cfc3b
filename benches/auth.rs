//! Criterion benchmark of what authentication costs a request, side by side: a signature
//! check (RS256, ES256), a token verified a moment ago (a lookup), and a token from an
//! address refused by the limiter a moment ago (not even parsed).
//!
//! `cargo bench --bench auth` prints the figures; docs/security.md quotes them.

use std::{
    future::Future,
    hint::black_box,
    path::PathBuf,
    pin::pin,
    task::{Context, Poll, Waker},
    time::{SystemTime, UNIX_EPOCH},
};

use criterion::{criterion_group, criterion_main, Criterion};
use fibonacci_api::{
    auth::{Audience, Authenticator, KeySource, Outcome},
    ratelimit::{ClientKey, Unit, Window},
};
use http::HeaderValue;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs a future that never waits (no JWKS URL here, so nothing is fetched).
fn ready<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => unreachable!("authentication with fixed keys never waits"),
    }
}

fn bearer(sub: &str, private: &str, algorithm: Algorithm) -> HeaderValue {
    let pem = std::fs::read(fixture(private)).unwrap();
    let key = match algorithm {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = encode(
        &Header::new(algorithm),
        &serde_json::json!({"sub": sub, "exp": exp, "aud": "fibonacci-api"}),
        &key,
    )
    .unwrap();
    HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
}

/// The same token with another payload: well-formed, its signature never matches, so
/// checking it is the full cost every time (what a client guessing tokens imposes).
fn forged(genuine: &HeaderValue, other: &HeaderValue) -> HeaderValue {
    let genuine: Vec<&str> = genuine.to_str().unwrap().split('.').collect();
    let other: Vec<&str> = other.to_str().unwrap().split('.').collect();
    HeaderValue::from_str(&format!("{}.{}.{}", genuine[0], other[1], genuine[2])).unwrap()
}

fn authentication(c: &mut Criterion) {
    let mut group = c.benchmark_group("authentication");
    for (algorithm, private, public) in [
        (Algorithm::RS256, "rsa-private.pem", "rsa-public.pem"),
        (Algorithm::ES256, "ec-private.pem", "ec-public.pem"),
    ] {
        let auth = Authenticator::new(
            KeySource {
                public_key_file: Some(&fixture(public)),
                ..Default::default()
            },
            Audience::Exactly("fibonacci-api".into()),
            None,
        )
        .unwrap();
        let alice = bearer("alice", private, algorithm);
        let forgery = forged(&alice, &bearer("mallory", private, algorithm));
        let address = ClientKey::of([192, 0, 2, 1].into());
        let throttled = ClientKey::of([192, 0, 2, 2].into());
        let minute = Window {
            limit: 30,
            unit: Unit::Minute,
        };
        auth.throttle(&throttled, minute, 3_600_000);
        assert!(matches!(
            ready(auth.authenticate(Some(&alice), &address)),
            Outcome::Subject(_)
        ));
        group.bench_function(format!("{algorithm:?}/signature_check"), |b| {
            b.iter(|| ready(auth.authenticate(black_box(Some(&forgery)), &address)))
        });
        group.bench_function(format!("{algorithm:?}/verified_token"), |b| {
            b.iter(|| ready(auth.authenticate(black_box(Some(&alice)), &address)))
        });
        group.bench_function(format!("{algorithm:?}/throttled_address"), |b| {
            b.iter(|| ready(auth.authenticate(black_box(Some(&forgery)), &throttled)))
        });
    }
    group.finish();
}

criterion_group!(benches, authentication);
criterion_main!(benches);
