//! Server hygiene: slow and abusive clients cannot take the service down.

use std::time::Duration;

use fibonacci_api::config::Config;
use reqwest::StatusCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::helpers::{eventually, spawn_app, stalling, test_config};

/// Reads until the server closes the connection (or `limit` passes), returning what came.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()?;
    Some(String::from_utf8_lossy(&seen).into_owned())
}

fn quick_timeouts() -> Config {
    quick_timeouts_of(Duration::from_millis(300))
}

fn quick_timeouts_of(header_read_timeout: Duration) -> Config {
    Config {
        header_read_timeout,
        rate_limits: None,
        ..test_config()
    }
}

#[tokio::test]
async fn clients_that_never_finish_their_headers_are_cut_off() {
    let app = spawn_app(quick_timeouts()).await;
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    assert!(
        read_until_closed(&mut silent, Duration::from_secs(5))
            .await
            .is_some(),
        "a connection that sends nothing is closed"
    );
    let mut trickler = TcpStream::connect(app.addr).await.unwrap();
    trickler
        .write_all(b"GET /fibonacci?n=1 HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut trickler, Duration::from_secs(5))
            .await
            .is_some(),
        "a request head never finished is closed"
    );
    assert_eq!(
        app.fib("1").await.status(),
        StatusCode::OK,
        "and the service is fine"
    );
    app.stop().await;
}

#[tokio::test]
async fn oversized_headers_get_431_not_a_crash() {
    let app = spawn_app(quick_timeouts()).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let huge = "a".repeat(64 * 1024);
    let request = format!("GET /fibonacci?n=1 HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let reply = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    assert!(
        reply.starts_with("HTTP/1.1 431"),
        "got {:?}",
        reply.lines().next()
    );
    assert_eq!(app.fib("1").await.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_stalled_connections_do_not_block_a_fresh_client() {
    let app = spawn_app(Config {
        rate_limits: None,
        ..test_config()
    })
    .await;
    // 300 held for real: spread over five addresses, each under its per-address cap.
    let mut stalled = Vec::new();
    for i in 0..300 {
        let local = format!("127.0.0.{}", 10 + i % 5);
        let mut s = idle_connections(&app, &local, 1).await.pop().unwrap();
        s.write_all(b"GET /fibonacci?n=5 HTTP/1.1\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    let fresh = crate::helpers::client_from(Some("127.0.0.2".parse().unwrap()));
    let response = fresh.get(app.url("/fibonacci?n=20")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"n":20,"fibonacci":6765}"#
    );
    drop(stalled);
    app.stop().await;
}

/// `count` keep-alive connections to `addr`, each served `request` once (a 200) and
/// kept open.
async fn hold_served(addr: std::net::SocketAddr, request: &[u8], count: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..count {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "connection {} served",
            held.len() + 1
        );
        held.push(s);
    }
    held
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_are_closed_at_once() {
    let app = spawn_app(Config {
        max_connections: 4,
        header_read_timeout: Duration::from_secs(30),
        ..quick_timeouts()
    })
    .await;
    let held = hold_served(app.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 4).await;
    let mut extra = TcpStream::connect(app.addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let reply = read_until_closed(&mut extra, Duration::from_secs(5)).await;
    assert_eq!(
        reply.as_deref(),
        Some(""),
        "closed without an answer, not left hanging"
    );
    drop(held);
    eventually(
        Duration::from_secs(5),
        "capacity returns when connections close",
        || async {
            app.client
                .get(app.url("/health"))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn the_admin_listener_has_its_own_small_connection_cap() {
    use fibonacci_api::http::server::ADMIN_MAX_CONNECTIONS;
    let app = spawn_app(Config {
        admin_listen_addr: Some("127.0.0.1:0".parse().unwrap()),
        max_connections: 4 * ADMIN_MAX_CONNECTIONS,
        max_connections_per_address: 0,
        connection_rate_per_address: 0,
        header_read_timeout: Duration::from_secs(30),
        ..quick_timeouts()
    })
    .await;
    let admin = app.admin_addr.expect("admin bound");
    let probe = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n";
    let held = hold_served(admin, probe, ADMIN_MAX_CONNECTIONS).await;
    let mut extra = TcpStream::connect(admin).await.unwrap();
    let _ = extra.write_all(probe).await;
    let reply = read_until_closed(&mut extra, Duration::from_secs(5)).await;
    assert_eq!(
        reply.as_deref(),
        Some(""),
        "past ADMIN_MAX_CONNECTIONS the admin port closes new connections, so it adds at most that many to what MAX_CONNECTIONS lets clients hold"
    );
    let response = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the API port keeps its own MAX_CONNECTIONS"
    );
    drop(held);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_in_flight_the_api_sheds_load_but_probes_answer() {
    let app = spawn_app(Config {
        max_in_flight: 1,
        ..stalling(Duration::from_millis(1500)).await
    })
    .await;
    let slow = tokio::spawn(app.client.get(app.url("/fibonacci?n=999")).send());
    let state = app.state.clone();
    eventually(
        Duration::from_secs(5),
        "the slow request holds the only permit",
        || {
            let busy = crate::helpers::Scrape::parse(&state.metrics.render())
                .get("http_requests_in_flight", &[])
                >= 1.0;
            async move { busy }
        },
    )
    .await;
    let shed = app.fib("5").await;
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.headers()["retry-after"], "1");
    let body: serde_json::Value = shed.json().await.unwrap();
    assert_eq!(
        body["error"],
        crate::docs::documented_error(&app, 503).await,
        "the document's example is what a shed request gets"
    );
    assert_eq!(
        app.get("/readyz").await.status(),
        StatusCode::OK,
        "probes are not shed"
    );
    assert_eq!(
        app.get("/health").await.status(),
        StatusCode::OK,
        "health is not shed"
    );
    assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_a_503() {
    let app = spawn_app(Config {
        request_timeout: Duration::from_millis(100),
        ..stalling(Duration::from_secs(3)).await
    })
    .await;
    let response = app.fib("777").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(app.get("/health").await.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_subcommand_passes_against_a_live_instance() {
    let app = spawn_app(test_config()).await;
    let url = app.url("/livez");
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_fibonacci-api"))
            .args(["healthcheck", "--url", &url])
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(status.success());
    app.stop().await;
}

/// Runs `fibonacci-api healthcheck` (no URL) with only `env` set, as a container would.
async fn healthcheck_with(env: &[(&str, String)]) -> bool {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_fibonacci-api"))
            .env_clear()
            .envs(env)
            .args(["healthcheck", "--timeout-ms", "2000"])
            .status()
            .unwrap()
            .success()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_probes_where_the_configuration_listens() {
    let app = spawn_app(test_config()).await;
    let port = app.addr.port();
    for listen in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
        assert!(
            healthcheck_with(&[("LISTEN_ADDR", listen.clone())]).await,
            "LISTEN_ADDR={listen}: the probe must follow the configured port"
        );
    }
    let other = crate::helpers::free_port();
    assert!(
        !healthcheck_with(&[("LISTEN_ADDR", format!("0.0.0.0:{other}"))]).await,
        "nothing listens on {other}: unhealthy"
    );
    app.stop().await;

    let app = spawn_app(Config {
        admin_listen_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    })
    .await;
    let (public, admin) = (app.addr.port(), app.admin_addr.unwrap().port());
    assert!(
        healthcheck_with(&[
            ("LISTEN_ADDR", format!("127.0.0.1:{public}")),
            ("ADMIN_LISTEN_ADDR", format!("0.0.0.0:{admin}")),
        ])
        .await,
        "with an admin listener the probe goes there"
    );
    assert!(
        !healthcheck_with(&[
            ("LISTEN_ADDR", format!("127.0.0.1:{public}")),
            ("ADMIN_LISTEN_ADDR", format!("0.0.0.0:{other}")),
        ])
        .await,
        "the admin port, not the public one, decides"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_wildcard_ipv6_listener_serves_ipv4_and_ipv6_clients() {
    let app = spawn_app(Config {
        listen_addr: "[::]:0".parse().unwrap(),
        ..test_config()
    })
    .await;
    let port = app.addr.port();
    for host in ["127.0.0.1", "[::1]"] {
        let status = app
            .client
            .get(format!("http://{host}:{port}/fibonacci?n=10"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{host} could not connect to [::]:{port}: {e}"))
            .status();
        assert_eq!(status, StatusCode::OK, "{host}");
    }
    app.stop().await;
}

/// Whether a fresh connection from `local` gets a 200 for `/health`.
async fn health_from(app: &crate::helpers::TestApp, local: &str) -> bool {
    crate::helpers::client_from(Some(local.parse().unwrap()))
        .get(app.url("/health"))
        .send()
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
}

/// Opens `count` connections from `local` that send nothing.
async fn idle_connections(
    app: &crate::helpers::TestApp,
    local: &str,
    count: usize,
) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..count {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::new(local.parse().unwrap(), 0))
            .unwrap();
        held.push(socket.connect(app.addr).await.unwrap());
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_every_connection_slot_cannot_lock_out_another() {
    let app = spawn_app(Config {
        max_connections: 200,
        max_connections_per_address: 50,
        connection_rate_per_address: 0,
        ..quick_timeouts_of(Duration::from_secs(30))
    })
    .await;
    let _held = idle_connections(&app, "127.0.0.1", 200).await;
    let open = || async {
        crate::helpers::Scrape::parse(
            &crate::helpers::client_from(Some("127.0.0.3".parse().unwrap()))
                .get(app.url("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        )
        .get("http_connections_open", &[])
    };
    eventually(
        Duration::from_secs(10),
        "the idle sockets are accepted or refused",
        || async { open().await == 51.0 },
    )
    .await;
    assert!(
        health_from(&app, "127.0.0.2").await,
        "a second address still gets /health while the first holds {} sockets",
        200
    );
    let refused = crate::helpers::Scrape::parse(&app.state.metrics.render()).get(
        "http_connections_refused_total",
        &[("reason", "per_address")],
    );
    assert_eq!(refused, 150.0, "the first address's sockets past its 50");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_are_rate_limited_per_address_except_for_trusted_proxies() {
    let app = spawn_app(Config {
        connection_rate_per_address: 10,
        trusted_proxies: vec!["127.0.0.5/32".parse().unwrap()],
        ..test_config()
    })
    .await;
    let mut served = 0;
    for _ in 0..30 {
        served += usize::from(health_from(&app, "127.0.0.4").await);
    }
    assert!(
        (10..=12).contains(&served),
        "a burst of 10 new connections, then 10 per second: {served} of 30 served"
    );
    let mut proxied = 0;
    for _ in 0..30 {
        proxied += usize::from(health_from(&app, "127.0.0.5").await);
    }
    assert_eq!(proxied, 30, "a trusted proxy is many clients: exempt");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pipelines_and_never_reads_is_cut_off_at_the_write_deadline() {
    let app = spawn_app(Config {
        max_n: 100_000,
        write_timeout: Duration::from_millis(300),
        ..quick_timeouts_of(Duration::from_secs(30))
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(app.addr).await.unwrap();
    // 300 answers of ~21 kB each: far more than the socket buffers hold.
    let request = "GET /fibonacci?n=100000 HTTP/1.1\r\nHost: x\r\n\r\n".repeat(300);
    let _ = stream.write_all(request.as_bytes()).await;
    let open = || async { app.scrape().await.get("http_connections_open", &[]) };
    // Only the scrape's own connection once the server has cut the reader off (or before
    // it was even accepted: then the read below waits for the cut).
    eventually(
        Duration::from_secs(10),
        "the server to cut the reader off",
        || async { open().await == 1.0 },
    )
    .await;
    let received = read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("the server closes the connection");
    let answered = received.matches("HTTP/1.1 200").count();
    assert!(answered >= 1, "it was being served: {answered} answers");
    assert!(
        answered < 300,
        "cut off, not served to the end: {answered} answers"
    );
    app.stop().await;
}

/// Server-side sockets of the connection `server` ⇄ `client` in /proc/net/tcp, as
/// (state, bytes queued to send): what the kernel still holds for it.
fn kernel_sockets(server: u16, client: u16) -> Vec<(u8, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = |addr: &str| u16::from_str_radix(addr.split(':').nth(1)?, 16).ok();
            let (local, remote) = (port(fields.get(1)?)?, port(fields.get(2)?)?);
            let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
            let queued = u64::from_str_radix(fields.get(4)?.split(':').next()?, 16).ok()?;
            (local == server && remote == client).then_some((state, queued))
        })
        .collect()
}

/// Connects with a tiny receive window, sends `requests` pipelined and never reads;
/// returns the stream and its local port.
async fn never_reading(app: &crate::helpers::TestApp, requests: usize) -> (TcpStream, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    let mut stream = socket.connect(app.addr).await.unwrap();
    let port = stream.local_addr().unwrap().port();
    let request = "GET /fibonacci?n=1000 HTTP/1.1\r\nHost: x\r\n\r\n".repeat(requests);
    let _ = stream.write_all(request.as_bytes()).await;
    (stream, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_leaves_no_orphaned_socket_behind() {
    // Two ways a connection ends with answers unread: its writes stall (far more than the
    // buffers hold: the write deadline), or everything fits in the kernel's buffers and
    // the connection idles out (the header-read timeout) with the answers still queued.
    for (requests, why) in [
        (4000, "stalled writes"),
        (60, "answers queued at an idle close"),
    ] {
        let app = spawn_app(Config {
            write_timeout: Duration::from_millis(300),
            ..quick_timeouts_of(Duration::from_millis(500))
        })
        .await;
        let (stream, client_port) = never_reading(&app, requests).await;
        eventually(
            Duration::from_secs(10),
            "the server to close it",
            || async { app.scrape().await.get("http_connections_open", &[]) == 1.0 },
        )
        .await;
        // A plain close would leave the kernel holding the unsent answers in FIN-WAIT-1
        // for as long as the client keeps its window shut: memory no process accounts for.
        let server_port = app.addr.port();
        eventually(Duration::from_secs(5), why, || {
            let left = kernel_sockets(server_port, client_port);
            async move {
                left.iter()
                    .all(|(state, queued)| *state >= 6 && *queued == 0)
            }
        })
        .await;
        drop(stream);
        app.stop().await;
    }
}
