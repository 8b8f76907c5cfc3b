//! JWT keys from an identity provider's JWKS endpoint (`AUTH_JWT_JWKS_URL`), against an
//! in-process endpoint: rotation without a restart, an unreachable or hanging or lying
//! endpoint, and a flood of unknown key ids. Also how each JWK's `use`, `alg`, `crv` and
//! `key_ops` are honoured (through a JWKS file, which shares the rules).

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{body::Body, extract::State, response::Response, routing::get, Router};
use fibonacci_api::config::Config;
use jsonwebtoken::{encode, jwk::Jwk, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{
    auth::{config_from, fixture},
    helpers::{eventually, spawn_app, spawn_binary, TestApp},
};

/// What the test endpoint answers.
#[derive(Clone)]
enum Answer {
    /// 200 with this body.
    Json(String),
    /// 200, chunked, a JSON prefix and then spaces forever.
    Endless,
    /// 200 with a `Content-Length` of this many bytes (spaces).
    Announced(usize),
    /// Holds the first request forever, then answers the rest with this body.
    HangFirst(String),
    /// Answers with this body after this long.
    Slow(Duration, String),
}

/// An identity provider's JWKS endpoint on 127.0.0.1, counting the fetches it serves.
struct Idp {
    addr: std::net::SocketAddr,
    answer: Arc<Mutex<Answer>>,
    fetches: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct IdpState {
    answer: Arc<Mutex<Answer>>,
    fetches: Arc<AtomicUsize>,
    hung: Arc<AtomicBool>,
}

async fn serve_jwks(State(state): State<IdpState>) -> Response {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    let answer = state.answer.lock().unwrap().clone();
    let body = match answer {
        Answer::Json(body) => Body::from(body),
        Answer::Endless => {
            let prefix = futures_util::stream::once(async {
                Ok::<_, Infallible>(bytes::Bytes::from_static(b"{\"keys\":["))
            });
            let spaces = futures_util::stream::repeat_with(|| {
                Ok::<_, Infallible>(bytes::Bytes::from(vec![b' '; 16 * 1024]))
            });
            use futures_util::StreamExt;
            Body::from_stream(prefix.chain(spaces))
        }
        Answer::Announced(len) => Body::from(vec![b' '; len]),
        Answer::Slow(delay, body) => {
            tokio::time::sleep(delay).await;
            Body::from(body)
        }
        Answer::HangFirst(body) => {
            if !state.hung.swap(true, Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Body::from(body)
        }
    };
    Response::builder()
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

impl Idp {
    async fn start(answer: Answer) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, answer)
    }

    /// On a given port: for an endpoint that comes up after the service.
    async fn start_on(port: u16, answer: Answer) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the port is still free");
        Self::serve(listener, answer)
    }

    fn serve(listener: tokio::net::TcpListener, answer: Answer) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = IdpState {
            answer: Arc::new(Mutex::new(answer)),
            fetches: Arc::new(AtomicUsize::new(0)),
            hung: Arc::new(AtomicBool::new(false)),
        };
        let (answer, fetches) = (state.answer.clone(), state.fetches.clone());
        let router = Router::new()
            .route("/jwks", get(serve_jwks))
            .with_state(state);
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            addr,
            answer,
            fetches,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signing_key(file: &str, algorithm: Algorithm) -> EncodingKey {
    let pem = std::fs::read(fixture(file)).unwrap();
    match algorithm {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    }
}

/// The public JWK of a fixture's key, with `kid` and then `edit` applied.
fn jwk(file: &str, algorithm: Algorithm, kid: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let mut jwk = Jwk::from_encoding_key(&signing_key(file, algorithm), algorithm).unwrap();
    jwk.common.key_id = Some(kid.into());
    let mut value = serde_json::to_value(jwk).unwrap();
    edit(&mut value);
    value
}

fn set(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

fn token(file: &str, algorithm: Algorithm, kid: &str, sub: &str) -> String {
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.into());
    encode(
        &header,
        &json!({"sub": sub, "exp": now() + 300, "aud": "fibonacci-api"}),
        &signing_key(file, algorithm),
    )
    .unwrap()
}

async fn status(app: &TestApp, token: &str) -> StatusCode {
    app.client
        .get(app.url("/fibonacci?n=10"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

fn jwks_config(url: &str) -> Config {
    Config {
        rate_limits: None,
        ..config_from(&[
            "--auth-jwt-jwks-url",
            url,
            "--auth-jwt-audience",
            "fibonacci-api",
        ])
    }
}

async fn ready(app: &TestApp) {
    eventually(Duration::from_secs(10), "the keys are loaded", || async {
        app.get("/readyz").await.status() == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn keys_rotate_without_a_restart() {
    let idp = Idp::start(Answer::Json(set(&[jwk(
        "ec-private.pem",
        Algorithm::ES256,
        "2026-01",
        |_| {},
    )])))
    .await;
    let app = spawn_app(jwks_config(&idp.url())).await;
    ready(&app).await;
    let old = token("ec-private.pem", Algorithm::ES256, "2026-01", "alice");
    assert_eq!(status(&app, &old).await, StatusCode::OK);

    // The IdP rotates: a new key under a new kid, the old one withdrawn.
    idp.answer(Answer::Json(set(&[jwk(
        "rsa2-private.pem",
        Algorithm::RS256,
        "2026-02",
        |_| {},
    )])));
    let new = token("rsa2-private.pem", Algorithm::RS256, "2026-02", "alice");
    assert_eq!(
        status(&app, &new).await,
        StatusCode::OK,
        "a token under the new kid is accepted without a restart"
    );
    assert_eq!(
        status(&app, &old).await,
        StatusCode::UNAUTHORIZED,
        "the withdrawn key no longer vouches for anything, even a token verified before"
    );
    assert_eq!(idp.fetches(), 2, "start-up, then once for the new kid");
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_unknown_kids_costs_at_most_one_fetch() {
    let key = jwk("ec-private.pem", Algorithm::ES256, "known", |_| {});
    let idp = Idp::start(Answer::Json(set(&[key]))).await;
    let app = spawn_app(jwks_config(&idp.url())).await;
    ready(&app).await;
    assert_eq!(idp.fetches(), 1);
    let flood = (0..64).map(|i| {
        let token = token(
            "ec-private.pem",
            Algorithm::ES256,
            &format!("made-up-{i}"),
            "mallory",
        );
        let app = &app;
        async move { status(app, &token).await }
    });
    for status in futures_util::future::join_all(flood).await {
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        idp.fetches(),
        2,
        "64 unknown kids, concurrent and sequential, make one refresh"
    );
    let known = token("ec-private.pem", Algorithm::ES256, "known", "alice");
    assert_eq!(status(&app, &known).await, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_idp_delays_readiness_not_start_up() {
    let port = crate::helpers::free_port(); // nothing listens there yet
    let url = format!("http://127.0.0.1:{port}/jwks");
    let app = spawn_app(jwks_config(&url)).await;
    let readyz = app.get("/readyz").await;
    assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(readyz.text().await.unwrap().contains("JWKS"));
    assert_eq!(app.get("/health").await.status(), StatusCode::OK);
    let alice = token("ec-private.pem", Algorithm::ES256, "k1", "alice");
    let refused = app
        .client
        .get(app.url("/fibonacci?n=10"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(
        refused.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "a token cannot be judged yet: retry, don't re-authenticate"
    );
    assert!(refused.headers().contains_key("retry-after"));

    let idp = Idp::start_on(
        port,
        Answer::Json(set(&[jwk(
            "ec-private.pem",
            Algorithm::ES256,
            "k1",
            |_| {},
        )])),
    )
    .await;
    ready(&app).await;
    assert_eq!(status(&app, &alice).await, StatusCode::OK);
    assert!(idp.fetches() >= 1);
    app.stop().await;
}

#[tokio::test]
async fn a_hanging_idp_is_timed_out_and_retried() {
    use fibonacci_api::auth::{Audience, Authenticator, JwksOptions, KeySource};
    let idp = Idp::start(Answer::HangFirst(set(&[jwk(
        "ec-private.pem",
        Algorithm::ES256,
        "k1",
        |_| {},
    )])))
    .await;
    let url = idp.url();
    let auth = Authenticator::new(
        KeySource {
            jwks_url: Some(&url),
            ..Default::default()
        },
        Audience::Exactly("fibonacci-api".into()),
        None,
    )
    .unwrap()
    .with_jwks_options(JwksOptions {
        fetch_timeout: Duration::from_millis(300),
        retry_initial: Duration::from_millis(50),
        ..JwksOptions::default()
    });
    let app = spawn_app(Config {
        auth: Some(Arc::new(auth)),
        ..jwks_config(&url)
    })
    .await;
    ready(&app).await;
    assert_eq!(idp.fetches(), 2, "the hung fetch was abandoned and retried");
    let alice = token("ec-private.pem", Algorithm::ES256, "k1", "alice");
    assert_eq!(status(&app, &alice).await, StatusCode::OK);
    app.stop().await;
}

/// The reason the service gives for the last failed fetch, once there is one.
async fn fetch_error(app: &TestApp) -> String {
    let auth = app.state.config.auth.clone().unwrap();
    eventually(Duration::from_secs(10), "a fetch has failed", || {
        let failed = auth.jwks_error().is_some();
        async move { failed }
    })
    .await;
    auth.jwks_error().unwrap()
}

#[tokio::test]
async fn oversized_overfull_or_malformed_key_sets_are_refused() {
    let too_many: Vec<Value> = (0..101)
        .map(|i| jwk("ec-private.pem", Algorithm::ES256, &format!("k{i}"), |_| {}))
        .collect();
    let cases = [
        (
            Answer::Endless,
            "larger than",
            "an endless body is not read to its end",
        ),
        (
            Answer::Announced(1 << 20),
            "larger than",
            "a 1 MiB Content-Length",
        ),
        (Answer::Json(set(&too_many)), "too many keys", "101 keys"),
        (
            Answer::Json(r#"{"keys": "nope"}"#.into()),
            "not a JWKS",
            "not a key set",
        ),
        (
            Answer::Json(set(&[json!({"kty": "oct", "k": "c2VjcmV0", "kid": "k1"})])),
            "no usable signing key",
            "only a symmetric key",
        ),
    ];
    let alice = token("ec-private.pem", Algorithm::ES256, "k1", "alice");
    for (answer, says, why) in cases {
        let idp = Idp::start(answer).await;
        let app = spawn_app(jwks_config(&idp.url())).await;
        let error = fetch_error(&app).await;
        assert!(error.contains(says), "{why}: {error:?}");
        assert_eq!(
            app.get("/readyz").await.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "{why}"
        );
        assert_eq!(
            status(&app, &alice).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "{why}"
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_keys_it_had() {
    let idp = Idp::start(Answer::Json(set(&[jwk(
        "ec-private.pem",
        Algorithm::ES256,
        "k1",
        |_| {},
    )])))
    .await;
    let app = spawn_app(jwks_config(&idp.url())).await;
    ready(&app).await;
    let alice = token("ec-private.pem", Algorithm::ES256, "k1", "alice");
    assert_eq!(status(&app, &alice).await, StatusCode::OK);
    idp.answer(Answer::Endless);
    let unknown = token("ec-private.pem", Algorithm::ES256, "k2", "mallory");
    assert_eq!(status(&app, &unknown).await, StatusCode::UNAUTHORIZED);
    assert_eq!(idp.fetches(), 2, "the unknown kid made one refresh");
    assert!(fetch_error(&app).await.contains("larger than"));
    let bob = token("ec-private.pem", Algorithm::ES256, "k1", "bob");
    assert_eq!(
        status(&app, &bob).await,
        StatusCode::OK,
        "the keys from before still verify a token never seen"
    );
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn each_jwk_is_used_only_as_it_says() {
    use Algorithm::{ES256, ES384, RS256, RS384, RS512};
    let without_alg = |v: &mut Value| {
        v.as_object_mut().unwrap().remove("alg");
    };
    let keys = [
        jwk("rsa-private.pem", RS256, "enc", |v| v["use"] = json!("enc")),
        jwk("rsa-private.pem", RS256, "encrypt-only", |v| {
            v["key_ops"] = json!(["encrypt"])
        }),
        jwk("rsa-private.pem", RS256, "verify", |v| {
            v["key_ops"] = json!(["verify"]);
            v["use"] = json!("sig");
        }),
        jwk("rsa2-private.pem", RS384, "rs384", |_| {}),
        jwk("rsa-private.pem", RS256, "rsa-no-alg", without_alg),
        jwk("ec384-private.pem", ES384, "p384", without_alg),
        jwk("ec384-private.pem", ES384, "p384-says-es256", |v| {
            v["alg"] = json!("ES256")
        }),
        jwk("ec-private.pem", ES256, "p256", without_alg),
        jwk("rsa1024-private.pem", RS256, "rsa1024", |_| {}),
    ];
    let path = std::env::temp_dir().join(format!("jwks-rules-{}.json", std::process::id()));
    std::fs::write(&path, set(&keys)).unwrap();
    let app = spawn_app(config_from(&[
        "--auth-jwt-jwks-file",
        path.to_str().unwrap(),
        "--auth-jwt-audience",
        "fibonacci-api",
        "--rate-limits",
        "off",
    ]))
    .await;
    std::fs::remove_file(&path).unwrap();
    let (ok, no) = (StatusCode::OK, StatusCode::UNAUTHORIZED);
    let cases = [
        (
            "rsa-private.pem",
            RS256,
            "enc",
            no,
            "use: enc is not for signatures",
        ),
        (
            "rsa-private.pem",
            RS256,
            "encrypt-only",
            no,
            "key_ops without verify",
        ),
        (
            "rsa-private.pem",
            RS256,
            "verify",
            ok,
            "use: sig, key_ops: verify",
        ),
        ("rsa2-private.pem", RS384, "rs384", ok, "alg RS384"),
        (
            "rsa2-private.pem",
            RS256,
            "rs384",
            no,
            "alg pins the algorithm",
        ),
        (
            "rsa-private.pem",
            RS256,
            "rsa-no-alg",
            ok,
            "an RSA key without alg is RS256",
        ),
        (
            "rsa-private.pem",
            RS512,
            "rsa-no-alg",
            no,
            "…and only RS256",
        ),
        (
            "ec384-private.pem",
            ES384,
            "p384",
            ok,
            "the curve P-384 means ES384",
        ),
        (
            "ec384-private.pem",
            ES384,
            "p384-says-es256",
            no,
            "an alg that contradicts the curve disqualifies the key",
        ),
        (
            "ec-private.pem",
            ES256,
            "p256",
            ok,
            "the curve P-256 means ES256",
        ),
        (
            "rsa1024-private.pem",
            RS256,
            "rsa1024",
            no,
            "RSA keys under 2048 bits",
        ),
    ];
    for (file, algorithm, kid, expected, why) in cases {
        let token = token(file, algorithm, kid, "alice");
        assert_eq!(status(&app, &token).await, expected, "{kid}: {why}");
    }
    app.stop().await;
}

/// An HTTPS JWKS endpoint: `openssl s_server` with a throwaway self-signed certificate
/// for 127.0.0.1, serving `jwks` (status line and headers included), stopped on drop.
struct TlsIdp {
    port: u16,
    dir: std::path::PathBuf,
    server: std::process::Child,
}

impl TlsIdp {
    fn start(document: &str) -> Self {
        use std::process::{Command, Stdio};
        let dir = std::env::temp_dir().join(format!(
            "jwks-tls-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            // A server certificate, not a CA: webpki refuses a CA as an end entity.
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(["-keyout", "key.pem", "-out", "cert.pem"])
            .current_dir(&dir)
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs (apt-get install openssl)");
        assert!(made.success(), "openssl made a certificate");
        std::fs::write(
            dir.join("jwks"),
            format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{document}"),
        )
        .unwrap();
        // The port was free when picked; if another process took it before s_server
        // bound it, s_server exits and another port is tried.
        for _ in 0..5 {
            let port = crate::helpers::free_port();
            let mut server = Command::new("openssl")
                .args(["s_server", "-quiet", "-HTTP", "-accept"])
                .arg(format!("127.0.0.1:{port}"))
                .args(["-cert", "cert.pem", "-key", "key.pem"])
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("openssl s_server starts");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                if server.try_wait().unwrap().is_some() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { port, dir, server };
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "s_server did not come up"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("openssl s_server could not bind a free port in 5 tries")
    }
}

impl Drop for TlsIdp {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the binary against `url` with `env` and returns its first JWKS log line
/// (loaded or failed).
async fn first_jwks_outcome(url: &str, env: &[(&str, String)]) -> Value {
    let mut env = env.to_vec();
    env.push(("AUTH_JWT_JWKS_URL", url.into()));
    env.push(("AUTH_JWT_AUDIENCE", "fibonacci-api".into()));
    let binary = spawn_binary(&env).await;
    let outcome = || {
        binary.json_lines().into_iter().find(|line| {
            let message = line["message"].as_str().unwrap_or_default();
            message.starts_with("JWKS loaded") || message.starts_with("JWKS fetch failed")
        })
    };
    // The first fetch starts with the service and is bounded by its 5 s timeout.
    eventually(Duration::from_secs(15), "a JWKS log line", || {
        let seen = outcome().is_some();
        async move { seen }
    })
    .await;
    outcome().unwrap()
}

#[tokio::test]
async fn https_endpoints_are_verified_against_the_system_roots() {
    let idp = TlsIdp::start(&set(&[jwk(
        "ec-private.pem",
        Algorithm::ES256,
        "k1",
        |_| {},
    )]));
    let url = format!("https://127.0.0.1:{}/jwks", idp.port);
    let cert = idp.dir.join("cert.pem").to_string_lossy().into_owned();
    let trusted = first_jwks_outcome(&url, &[("SSL_CERT_FILE", cert)]).await;
    assert_eq!(
        trusted["message"], "JWKS loaded",
        "a private CA made a system root (SSL_CERT_FILE): {trusted}"
    );
    let untrusted = first_jwks_outcome(&url, &[]).await;
    assert_eq!(untrusted["level"], "WARN", "{untrusted}");
    let error = untrusted["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("certificate"),
        "a self-signed certificate nobody trusts is refused: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kids_do_not_park_requests_behind_a_slow_idp() {
    let key = jwk("ec-private.pem", Algorithm::ES256, "known", |_| {});
    let idp = Idp::start(Answer::Json(set(std::slice::from_ref(&key)))).await;
    let app = spawn_app(Config {
        max_in_flight: 8,
        ..jwks_config(&idp.url())
    })
    .await;
    ready(&app).await;
    idp.answer(Answer::Slow(Duration::from_secs(3), set(&[key])));
    // Each unknown kid could ask for a refetch; waiting for the slow one, they would hold
    // every request slot and everyone else would get 503.
    let flood: Vec<_> = (0..32)
        .map(|i| {
            let token = token("ec-private.pem", Algorithm::ES256, &format!("new-{i}"), "m");
            let request = app
                .client
                .get(app.url("/fibonacci?n=10"))
                .bearer_auth(token);
            tokio::spawn(request.send())
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let known = token("ec-private.pem", Algorithm::ES256, "known", "alice");
    assert_eq!(
        status(&app, &known).await,
        StatusCode::OK,
        "a valid token is served while the refetch is slow"
    );
    let mut unauthorized = 0;
    for request in flood {
        let status = request.await.unwrap().unwrap().status();
        unauthorized += usize::from(status == StatusCode::UNAUTHORIZED);
    }
    assert!(
        unauthorized >= 31,
        "unknown kids are refused, not parked: {unauthorized} of 32"
    );
    app.stop().await;
}
