//! Every documented setting changes what the service does. For each one, the real binary
//! runs twice, with a baseline and with the setting changed (everything else equal), and
//! one observation a user could make must differ. The list itself is checked against the
//! README's configuration table and the binary's `--help`, so a new setting without a
//! row here, or a row without its documentation, fails too.

use std::{
    collections::BTreeSet,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{routing::get, Router};
use jsonwebtoken::{jwk::Jwk, Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::helpers::{black_hole, client_from, spawn_binary, Binary, Scrape};

type Observation = Pin<Box<dyn Future<Output = String> + Send>>;
type Probe = fn(Arc<Binary>) -> Observation;

/// One row: `var` at `baseline` (None: unset) and at `changed`, with `env` common to
/// both, observed by `probe`.
struct Case {
    var: &'static str,
    baseline: Option<String>,
    changed: String,
    env: Vec<(&'static str, String)>,
    /// Set only with the changed value: what the setting cannot be used without.
    with: Vec<(&'static str, String)>,
    probe: Probe,
}

/// Settings that are OpenTelemetry's own, proven by the tracing tests named here.
const PROVEN_ELSEWHERE: &[(&str, &str)] = &[
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "spans_arrive_over_http_and_log_lines_carry_the_trace_id",
    ),
    (
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "spans_arrive_over_grpc_even_with_logs_at_warn",
    ),
    ("OTEL_SERVICE_NAME", "otel_settings_change_what_is_exported"),
    (
        "OTEL_RESOURCE_ATTRIBUTES",
        "otel_settings_change_what_is_exported",
    ),
    ("OTEL_SDK_DISABLED", "otel_settings_change_what_is_exported"),
    (
        "OTEL_TRACES_SAMPLER",
        "spans_arrive_over_http_and_log_lines_carry_the_trace_id",
    ),
    (
        "OTEL_TRACES_SAMPLER_ARG",
        "spans_arrive_over_http_and_log_lines_carry_the_trace_id",
    ),
];

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// The status of `GET path` (or "error" if no answer came).
async fn status(b: &Binary, path: &str, headers: &[(&str, &str)]) -> String {
    let mut request = client().get(format!("{}{path}", b.base()));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    match request.send().await {
        Ok(r) => r.status().as_u16().to_string(),
        Err(_) => "error".into(),
    }
}

/// Statuses of a sequence of `GET path`s, comma-separated.
async fn statuses(b: &Binary, requests: &[(&str, &[(&str, &str)])]) -> String {
    let mut out = Vec::new();
    for (path, headers) in requests {
        out.push(status(b, path, headers).await);
    }
    out.join(",")
}

/// A sample of the binary's own scrape.
async fn metric(b: &Binary, name: &str, labels: &[(&str, &str)]) -> String {
    let text = client()
        .get(format!("{}/metrics", b.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    format!("{:?}", Scrape::parse(&text).value(name, labels))
}

/// Whether a connection from `local` that sent `what`, then read nothing for `pause`, is
/// closed by the server within `pause + within`.
async fn closed_within(
    addr: SocketAddr,
    local: &str,
    what: &[u8],
    pause: Duration,
    within: Duration,
) -> String {
    use tokio::io::AsyncReadExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .bind(SocketAddr::new(local.parse().unwrap(), 0))
        .unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let _ = stream.write_all(what).await;
    tokio::time::sleep(pause).await;
    let mut buf = vec![0u8; 1 << 16];
    let drained = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    // Reading drains what was answered; only the server closing ends the loop.
    match tokio::time::timeout(within, drained).await {
        Ok(()) => "closed".into(),
        Err(_) => "open".into(),
    }
}

/// `n` fresh connections from 127.0.0.1, one `/health` each: how many were served.
async fn served_of_fresh_connections(b: &Binary, n: usize) -> String {
    let mut served = 0;
    for _ in 0..n {
        served += usize::from(status_fresh(b).await == "200");
    }
    (served == n).to_string()
}

async fn status_fresh(b: &Binary) -> String {
    match client_from(Some("127.0.0.1".parse().unwrap()))
        .get(format!("{}/health", b.base()))
        .send()
        .await
    {
        Ok(r) => r.status().as_u16().to_string(),
        Err(_) => "error".into(),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes!!";

fn hs256(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A JWKS with the fixture RSA key under `kid` "k1".
fn jwks() -> String {
    let pem = std::fs::read(fixture("rsa-private.pem")).unwrap();
    let key = EncodingKey::from_rsa_pem(&pem).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".into());
    json!({ "keys": [jwk] }).to_string()
}

/// A loopback JWKS endpoint for the whole test.
async fn jwks_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = jwks();
    let router = Router::new().route(
        "/jwks.json",
        get(move || {
            let body = body.clone();
            async move { body }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}/jwks.json")
}

fn boxed<F: Future<Output = String> + Send + 'static>(f: F) -> Observation {
    Box::pin(f)
}

async fn cases() -> Vec<Case> {
    let hole = black_hole().await.to_string();
    let jwks_file = std::env::temp_dir().join(format!("settings-jwks-{}.json", std::process::id()));
    std::fs::write(&jwks_file, jwks()).unwrap();
    let jwks_url = jwks_endpoint().await;
    let s = |v: &str| v.to_string();
    let case =
        |var, baseline: Option<&str>, changed: &str, env: &[(&'static str, &str)], probe| Case {
            var,
            baseline: baseline.map(s),
            changed: s(changed),
            env: env.iter().map(|(k, v)| (*k, s(v))).collect(),
            with: vec![],
            probe,
        };
    // A key source: auth needs an audience, which is itself an error without one.
    let key_source = |var, changed: &str, probe| Case {
        with: vec![("AUTH_JWT_AUDIENCE", s("*"))],
        ..case(var, None, changed, &[], probe)
    };
    let redis = format!("redis://{hole}");
    vec![
        case("LISTEN_ADDR", Some("127.0.0.1:0"), "[::1]:0", &[], |b| {
            boxed(async move { b.addr.is_ipv6().to_string() })
        }),
        case("ADMIN_LISTEN_ADDR", None, "127.0.0.1:0", &[], |b| {
            boxed(async move { status(&b, "/metrics", &[]).await })
        }),
        case("DOCS_ENABLED", None, "false", &[], |b| {
            boxed(async move { status(&b, "/docs", &[]).await })
        }),
        case("MAX_N", None, "2000", &[], |b| {
            boxed(async move { status(&b, "/fibonacci?n=1500", &[]).await })
        }),
        case("RATE_LIMITS", Some("off"), "1/minute", &[], |b| {
            boxed(
                async move { statuses(&b, &[("/fibonacci?n=1", &[]), ("/fibonacci?n=1", &[])]).await },
            )
        }),
        case(
            "TRUSTED_PROXIES",
            None,
            "127.0.0.1",
            &[("RATE_LIMITS", "1/minute")],
            |b| {
                boxed(async move {
                    statuses(
                        &b,
                        &[
                            ("/fibonacci?n=1", &[("x-forwarded-for", "198.51.100.1")]),
                            ("/fibonacci?n=1", &[("x-forwarded-for", "198.51.100.2")]),
                        ],
                    )
                    .await
                })
            },
        ),
        case(
            "RATE_LIMIT_IPV6_48_FACTOR",
            None,
            "1",
            &[
                ("RATE_LIMITS", "1/minute"),
                ("TRUSTED_PROXIES", "127.0.0.1"),
            ],
            |b| {
                boxed(async move {
                    statuses(
                        &b,
                        &[
                            ("/fibonacci?n=1", &[("x-forwarded-for", "2001:db8:9:1::1")]),
                            ("/fibonacci?n=1", &[("x-forwarded-for", "2001:db8:9:2::1")]),
                            ("/fibonacci?n=1", &[("x-forwarded-for", "2001:db8:9:3::1")]),
                        ],
                    )
                    .await
                })
            },
        ),
        case("REDIS_URL", None, &redis, &[], |b| {
            boxed(async move { metric(&b, "redis_up", &[]).await })
        }),
        case("REDIS_CLUSTER_NODES", None, &redis, &[], |b| {
            boxed(async move { metric(&b, "redis_up", &[]).await })
        }),
        case(
            "REDIS_TIMEOUT_MS",
            None,
            "5000",
            &[("REDIS_URL", &redis), ("REQUEST_TIMEOUT_MS", "1500")],
            |b| boxed(async move { status(&b, "/fibonacci?n=77", &[]).await }),
        ),
        case("CACHE_MAX_BYTES", None, "0", &[], |b| {
            boxed(async move {
                statuses(&b, &[("/fibonacci?n=10", &[]), ("/fibonacci?n=10", &[])]).await;
                metric(
                    &b,
                    "fibonacci_cache_requests_total",
                    &[("tier", "memory"), ("result", "hit")],
                )
                .await
            })
        }),
        // With no drain the listener closes at once; with a long one a new connection is
        // still served well after SIGTERM. Watched through the log, not a fixed sleep, so a
        // loaded machine cannot turn the long drain's answer into an error.
        case("SHUTDOWN_DRAIN_SECONDS", Some("0"), "30", &[], |b| {
            boxed(async move {
                b.sigterm();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while tokio::time::Instant::now() < deadline {
                    if b.lines()
                        .iter()
                        .any(|l| l.contains("no longer accepting connections"))
                    {
                        return "stopped accepting".to_owned();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                status_fresh(&b).await
            })
        }),
        case("LOG_FORMAT", None, "text", &[], |b| {
            boxed(async move {
                let first = b.lines().first().cloned().unwrap_or_default();
                serde_json::from_str::<serde_json::Value>(&first)
                    .is_ok()
                    .to_string()
            })
        }),
        case(
            "CORS_ALLOWED_ORIGINS",
            None,
            "https://app.example.com",
            &[],
            |b| {
                boxed(async move {
                    let response = client()
                        .get(format!("{}/fibonacci?n=3", b.base()))
                        .header("origin", "https://app.example.com")
                        .send()
                        .await
                        .unwrap();
                    format!(
                        "{:?}",
                        response.headers().get("access-control-allow-origin")
                    )
                })
            },
        ),
        case(
            "REQUEST_TIMEOUT_MS",
            None,
            "300",
            &[("REDIS_URL", &redis), ("REDIS_TIMEOUT_MS", "2000")],
            |b| boxed(async move { status(&b, "/fibonacci?n=78", &[]).await }),
        ),
        case("HEADER_READ_TIMEOUT_MS", None, "200", &[], |b| {
            boxed(async move {
                closed_within(
                    b.addr,
                    "127.0.0.1",
                    b"",
                    Duration::ZERO,
                    Duration::from_millis(1500),
                )
                .await
            })
        }),
        case(
            "MAX_CONNECTIONS",
            None,
            "2",
            &[("HEADER_READ_TIMEOUT_MS", "30000")],
            |b| {
                boxed(async move {
                    let _held = hold(b.addr, "127.0.0.1", 2).await;
                    status_fresh(&b).await
                })
            },
        ),
        case(
            "MAX_CONNECTIONS_PER_ADDRESS",
            Some("64"),
            "2",
            &[("HEADER_READ_TIMEOUT_MS", "30000")],
            |b| {
                boxed(async move {
                    let _held = hold(b.addr, "127.0.0.1", 2).await;
                    status_fresh(&b).await
                })
            },
        ),
        case("CONNECTION_RATE_PER_ADDRESS", Some("64"), "2", &[], |b| {
            boxed(async move { served_of_fresh_connections(&b, 6).await })
        }),
        case(
            "WRITE_TIMEOUT_MS",
            None,
            "200",
            &[("MAX_N", "100000"), ("RATE_LIMITS", "off")],
            |b| {
                boxed(async move {
                    let pipelined =
                        "GET /fibonacci?n=100000 HTTP/1.1\r\nHost: x\r\n\r\n".repeat(300);
                    // Not reading for a while: long enough to stall the server's writes.
                    closed_within(
                        b.addr,
                        "127.0.0.1",
                        pipelined.as_bytes(),
                        Duration::from_millis(1500),
                        Duration::from_millis(1500),
                    )
                    .await
                })
            },
        ),
        case(
            "MAX_IN_FLIGHT",
            None,
            "1",
            &[("REDIS_URL", &redis), ("REDIS_TIMEOUT_MS", "1500")],
            |b| {
                boxed(async move {
                    let first = {
                        let b = b.clone();
                        tokio::spawn(async move { status(&b, "/fibonacci?n=71", &[]).await })
                    };
                    // The first is in flight once a scrape counts it besides itself.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    while metric(&b, "http_requests_in_flight", &[]).await != "Some(2.0)"
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let second = status(&b, "/fibonacci?n=72", &[]).await;
                    let _ = first.await;
                    second
                })
            },
        ),
        case(
            "RATE_LIMIT_MAX_KEYS",
            None,
            "64",
            &[
                ("RATE_LIMITS", "2/minute"),
                ("TRUSTED_PROXIES", "127.0.0.1"),
            ],
            |b| {
                boxed(async move {
                    let from = |ip: String| {
                        let b = b.clone();
                        async move {
                            status(&b, "/fibonacci?n=1", &[("x-forwarded-for", ip.as_str())]).await
                        }
                    };
                    from("198.51.100.200".into()).await;
                    // 300 others, each at its limit: the limiter keeps them over a client
                    // halfway there, which a 64-key bound then forgets.
                    for i in 0..300u32 {
                        let ip = format!("10.{}.{}.1", i / 250, i % 250);
                        from(ip.clone()).await;
                        from(ip).await;
                    }
                    let again = from("198.51.100.200".into()).await;
                    let then = from("198.51.100.200".into()).await;
                    format!("{again},{then}")
                })
            },
        ),
        key_source("AUTH_JWT_HS256_SECRET", SECRET, |b| {
            boxed(async move { status(&b, "/fibonacci?n=5", &[]).await })
        }),
        key_source(
            "AUTH_JWT_PUBLIC_KEY_FILE",
            &fixture("rsa-public.pem"),
            |b| boxed(async move { status(&b, "/fibonacci?n=5", &[]).await }),
        ),
        key_source("AUTH_JWT_JWKS_FILE", &jwks_file.to_string_lossy(), |b| {
            boxed(async move { status(&b, "/fibonacci?n=5", &[]).await })
        }),
        key_source("AUTH_JWT_JWKS_URL", &jwks_url, |b| {
            boxed(async move { status(&b, "/fibonacci?n=5", &[]).await })
        }),
        case(
            "AUTH_JWT_AUDIENCE",
            Some("*"),
            "another-service",
            &[("AUTH_JWT_HS256_SECRET", SECRET)],
            |b| {
                boxed(async move {
                    let token =
                        hs256(json!({"sub": "a", "exp": now() + 300, "aud": "fibonacci-api"}));
                    let bearer = format!("Bearer {token}");
                    status(&b, "/fibonacci?n=5", &[("authorization", bearer.as_str())]).await
                })
            },
        ),
        case(
            "AUTH_JWT_ISSUER",
            None,
            "https://issuer.example",
            &[
                ("AUTH_JWT_HS256_SECRET", SECRET),
                ("AUTH_JWT_AUDIENCE", "*"),
            ],
            |b| {
                boxed(async move {
                    let token = hs256(
                        json!({"sub": "a", "exp": now() + 300, "aud": "x", "iss": "https://elsewhere.example"}),
                    );
                    let bearer = format!("Bearer {token}");
                    status(&b, "/fibonacci?n=5", &[("authorization", bearer.as_str())]).await
                })
            },
        ),
    ]
}

/// `count` idle connections from `local`, kept open while the result lives.
async fn hold(addr: SocketAddr, local: &str, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..count {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(local.parse().unwrap(), 0))
            .unwrap();
        held.push(socket.connect(addr).await.unwrap());
    }
    // Accepted (or refused) before the caller's next connection arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    held
}

/// What one case observes with `value` for its variable (None: unset).
async fn observe(case: &Case, value: Option<&String>) -> String {
    let mut env: Vec<(&str, String)> = case.env.clone();
    if let Some(value) = value {
        env.push((case.var, value.clone()));
        if Some(value) == Some(&case.changed) {
            env.extend(case.with.iter().cloned());
        }
    }
    let binary = Arc::new(spawn_binary(&env).await);
    (case.probe)(binary).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_setting_changes_what_the_service_does() {
    let cases = cases().await;
    let mut checks = tokio::task::JoinSet::new();
    for case in cases.iter() {
        let case = Case {
            var: case.var,
            baseline: case.baseline.clone(),
            changed: case.changed.clone(),
            env: case.env.clone(),
            with: case.with.clone(),
            probe: case.probe,
        };
        checks.spawn(async move {
            let before = observe(&case, case.baseline.as_ref()).await;
            let after = observe(&case, Some(&case.changed)).await;
            (case.var, case.changed, before, after)
        });
    }
    let mut same = Vec::new();
    while let Some(result) = checks.join_next().await {
        let (var, changed, before, after) = result.unwrap();
        if before == after {
            same.push(format!(
                "{var}={changed:?} changed nothing observable ({before})"
            ));
        }
    }
    assert!(same.is_empty(), "{same:#?}");

    // The table covers exactly what is documented and what the binary accepts.
    let covered: BTreeSet<&str> = cases
        .iter()
        .map(|c| c.var)
        .chain(PROVEN_ELSEWHERE.iter().map(|(var, _)| *var))
        .collect();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("## Configuration")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .unwrap();
    let documented: BTreeSet<&str> = table
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| l.split('|').nth(1).unwrap().split(','))
        .map(|v| v.trim().trim_matches('`'))
        .collect();
    assert_same(
        &documented,
        &covered,
        "the README's configuration table",
        "this test's cases",
    );
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_fibonacci-api"))
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let accepted: BTreeSet<&str> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split([']', '=']).next())
        .collect();
    let ours: BTreeSet<&str> = covered
        .iter()
        .copied()
        .filter(|v| !v.starts_with("OTEL_"))
        .collect();
    assert_same(&accepted, &ours, "--help", "this test's cases");
    let sources = [include_str!("tracing.rs")];
    for (var, test) in PROVEN_ELSEWHERE {
        assert!(
            sources
                .iter()
                .any(|s| s.contains(&format!("async fn {test}("))),
            "{var}: no test named {test}"
        );
    }
}

/// Two lists of settings that must agree, the difference named when they don't.
fn assert_same(a: &BTreeSet<&str>, b: &BTreeSet<&str>, a_name: &str, b_name: &str) {
    let only_a: Vec<_> = a.difference(b).collect();
    let only_b: Vec<_> = b.difference(a).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "settings in {a_name} but not in {b_name}: {only_a:?}; in {b_name} but not in {a_name}: {only_b:?}"
    );
}
