//! The one way tests start the service (in process, or the real binary), and the Redis
//! server some of them need.

use std::{
    net::{IpAddr, SocketAddr, TcpListener as StdListener},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use fibonacci_api::{config::Config, state::App, Application, Stopped};
use tokio::{sync::oneshot, task::JoinHandle};

/// A running instance and a client for it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub state: Arc<App>,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Stopped>>,
}

/// The configuration tests start from: loopback, port 0, no drain wait.
pub fn test_config() -> Config {
    Config {
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        shutdown_drain: Duration::ZERO,
        ..Config::default()
    }
}

/// Starts the app with `config`; it is serving when this returns (the listener is
/// bound before `build` returns, so connections queue until the loop accepts them).
pub async fn spawn_app(config: Config) -> TestApp {
    show_logs_if_asked();
    let app = Application::build(config).await.expect("app builds");
    let addr = app.local_addr();
    let admin_addr = app.admin_addr();
    let state = app.state();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        admin_addr,
        state,
        client: client_from(None),
        shutdown: Some(tx),
        task: Some(task),
    }
}

/// With `TEST_LOG=1`, the in-process apps' log lines go to the test output (filtered by
/// `RUST_LOG`, default `info`); otherwise nothing is installed and nothing is printed.
fn show_logs_if_asked() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    if std::env::var("TEST_LOG").as_deref() != Ok("1") {
        return;
    }
    INSTALLED.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A client whose connections come from `local` (e.g. 127.0.0.2), so tests can be
/// distinct clients on one machine.
pub fn client_from(local: Option<IpAddr>) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(local)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

impl TestApp {
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    pub async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .get(self.url(path_and_query))
            .send()
            .await
            .expect("request sent")
    }

    /// GET /fibonacci?n=… from the default client.
    pub async fn fib(&self, n: &str) -> reqwest::Response {
        self.get(&format!("/fibonacci?n={n}")).await
    }

    /// The scrape of `/metrics`, parsed.
    pub async fn scrape(&self) -> Scrape {
        let text = self.get("/metrics").await.text().await.unwrap();
        Scrape::parse(&text)
    }

    /// Sends the shutdown signal (as SIGTERM would) and returns at once.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Signals shutdown and waits for the drain to finish.
    pub async fn stop(mut self) {
        self.signal_shutdown();
        if let Some(task) = self.task.take() {
            task.await.expect("app task ends cleanly");
        }
    }
}

/// A Prometheus scrape, parsed into samples: one per line, histograms as their
/// `_bucket`, `_sum` and `_count` lines.
pub struct Scrape {
    pub samples: Vec<Sample>,
}

/// One line of the exposition format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub metric: String,
    pub labels: Labels,
    pub value: f64,
}

/// A sample's labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Labels(std::collections::BTreeMap<String, String>);

impl Labels {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// `name="value",…}` with the exposition format's escapes, up to the closing brace; the
/// rest of the line after it. Quote-aware: a route template's `{…}` is part of a value.
fn parse_labels(mut text: &str) -> Option<(Labels, &str)> {
    let mut labels = std::collections::BTreeMap::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(rest) = text.strip_prefix('}') {
            return Some((Labels(labels), rest));
        }
        let (name, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(name.trim().to_owned(), value);
        text = &rest[end + 1..];
    }
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (metric, labels, rest) = match line.split_once('{') {
                    Some((metric, rest)) if !metric.contains(' ') => {
                        let (labels, rest) =
                            parse_labels(rest).unwrap_or_else(|| panic!("bad labels in {line:?}"));
                        (metric, labels, rest)
                    }
                    _ => {
                        let (metric, rest) = line.split_once(' ').expect("name value");
                        (metric, Labels::default(), rest)
                    }
                };
                let value = rest.split_whitespace().next().expect("a value");
                let value = match value {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v
                        .parse()
                        .unwrap_or_else(|_| panic!("bad value in {line:?}")),
                };
                Sample {
                    metric: metric.to_owned(),
                    labels,
                    value,
                }
            })
            .collect();
        Self { samples }
    }

    /// The value of the series `name{labels}` (exact label set), if present.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.metric == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// A counter or gauge that must be there.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?}"))
    }

    /// The number of observations of a histogram (its `_count`).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(&format!("{name}_count"), labels)
            .or_else(|| self.value(name, labels))
            .unwrap_or(0.0)
    }
}

/// A private `redis-server` on a free port, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Extra arguments (TLS, a password) and the URL that reaches the server with them.
    args: Vec<String>,
    url: String,
}

/// Waits until the `redis-server` just started as `child` answers at `url` as itself (its
/// pid): true; false if it exited, or another process answers there (then it is stopped).
fn answers_itself(child: &mut Child, url: &str) -> bool {
    let pid = format!("process_id:{}", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        let info = redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .and_then(|mut c| redis::cmd("INFO").arg("server").query::<String>(&mut c));
        if let Ok(info) = info {
            let ours = info.lines().any(|l| l.trim() == pid);
            if !ours {
                let _ = child.kill();
                let _ = child.wait();
            }
            return ours;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server at {url} did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port nothing listens on right now (for servers started outside this process).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts one, or returns `None` (loudly) when `redis-server` is not installed —
    /// unless `REQUIRE_REDIS=1`, which CI sets so it can never pass by skipping.
    pub fn start() -> Option<Self> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                std::env::var("REQUIRE_REDIS").as_deref() != Ok("1"),
                "REQUIRE_REDIS=1 but redis-server is not on PATH"
            );
            eprintln!("\n*** SKIPPING: redis-server is not on PATH (install it, or set REQUIRE_REDIS=1 to fail instead) ***\n");
            return None;
        }
        // The port is free when picked, but another process may take it before our
        // server binds it: then that server exits, and another port is tried.
        for _ in 0..5 {
            let port = free_port();
            let mut server = Self {
                port,
                child: None,
                args: vec!["--port".into(), port.to_string()],
                url: format!("redis://127.0.0.1:{port}/0"),
            };
            if server.try_launch() {
                return Some(server);
            }
        }
        panic!("redis-server could not bind a free port in 5 tries");
    }

    /// A server that speaks only TLS (a throwaway self-signed certificate made with
    /// `openssl`) and requires `password`; its URL is `rediss://:password@…#insecure`
    /// (the fragment skips certificate verification: the certificate is our own).
    pub fn start_tls(password: &str) -> Option<Self> {
        let mut server = Self::start()?;
        server.kill();
        let dir = std::env::temp_dir().join(format!("redis-tls-{}", server.port));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = self_signed_certificate(&dir);
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        server.args = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            server.port.to_string(),
            "--tls-cert-file".into(),
            path(&cert),
            "--tls-key-file".into(),
            path(&key),
            "--tls-ca-cert-file".into(),
            path(&cert),
            "--tls-auth-clients".into(),
            "no".into(),
            "--requirepass".into(),
            password.into(),
        ];
        server.url = format!("rediss://:{password}@127.0.0.1:{}/0#insecure", server.port);
        server.launch();
        Some(server)
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Starts the server on its port; panics if it cannot (a restart must keep the port
    /// the service was given).
    fn launch(&mut self) {
        assert!(
            self.try_launch(),
            "redis-server could not bind port {} again",
            self.port
        );
    }

    /// Starts the server and waits until *it* answers on its port: whether that worked,
    /// or the port was taken (the server exits, or whoever answers has another pid).
    fn try_launch(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(&self.args)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let started = answers_itself(&mut child, &self.url());
        if started {
            self.child = Some(child);
        }
        started
    }

    /// Kills it (as a crash would); `restart` brings it back on the same port, empty.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// A synchronous connection for planting and inspecting values.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

#[test]
fn a_redis_port_taken_meanwhile_is_noticed_not_mistaken_for_ours() {
    let Some(first) = RedisServer::start() else {
        return;
    };
    let mut second = RedisServer {
        port: first.port,
        child: None,
        args: vec!["--port".into(), first.port.to_string()],
        url: first.url(),
    };
    assert!(
        !second.try_launch(),
        "the first server answers on the port: the second must not take it for itself"
    );
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits, polling, until `check` holds or `timeout` passes; for effects that happen in
/// the background (a write-back, a breaker closing), never for the app to start.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A TCP server that accepts connections and never answers: as `REDIS_URL`, every cache
/// miss waits exactly `REDIS_TIMEOUT_MS` there, which holds a request in flight for as
/// long as a test needs, whatever the machine's speed.
pub async fn black_hole() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// A configuration whose cache misses stall in a black hole for `stall`.
pub async fn stalling(stall: Duration) -> Config {
    Config {
        redis_url: Some(format!("redis://{}", black_hole().await)),
        redis_timeout: stall,
        rate_limits: None,
        ..test_config()
    }
}

/// The real binary, started with `env` on port 0, its stdout lines collected.
pub struct Binary {
    child: Child,
    pub addr: SocketAddr,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Starts the binary with a clean environment plus `env` (over test defaults: loopback
/// port 0, JSON logs, no drain, no limits) and returns once it logs that it serves,
/// with the address it actually bound. With `TEST_LOG=1` its lines are echoed.
pub async fn spawn_binary(env: &[(&str, String)]) -> Binary {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fibonacci-api"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env("SHUTDOWN_DRAIN_SECONDS", "0")
        .env("RATE_LIMITS", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some((_, filter)) = env.iter().find(|(k, _)| *k == "RUST_LOG") {
        // However quiet the test wants the logs, the line with the address must come.
        cmd.env("RUST_LOG", format!("{filter},fibonacci_api::serving=info"));
    }
    let mut child = KillOnDrop(Some(cmd.spawn().expect("the binary starts")));
    let stdout = child.child().stdout.take().expect("piped");
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (serving_tx, serving_rx) = std::sync::mpsc::channel();
    let sink = lines.clone();
    let echo = std::env::var("TEST_LOG").as_deref() == Ok("1");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if echo {
                eprintln!("[binary] {line}");
            }
            if let Some(addr) = serving_addr(&line) {
                let _ = serving_tx.send(addr);
            }
            sink.lock().unwrap().push(line);
        }
    });
    let addr =
        tokio::task::spawn_blocking(move || serving_rx.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("the binary logs that it serves (run with TEST_LOG=1 to see its output)");
    Binary {
        child: child.disarm(),
        addr: addr.parse().expect("a socket address"),
        lines,
        reader: Some(reader),
    }
}

/// The bound address from the "serving" line, in JSON or text format.
fn serving_addr(line: &str) -> Option<String> {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        return (json["message"] == "serving")
            .then(|| json["addr"].as_str().unwrap_or_default().to_owned());
    }
    let rest = line.split(" serving ").nth(1)?;
    let addr = rest.split("addr=\"").nth(1)?;
    Some(addr.split('"').next()?.to_owned())
}

impl Binary {
    /// Sends SIGTERM and returns at once (the drain is the caller's to watch).
    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }

    /// `http://addr`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The log lines so far, as written.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The log lines so far, parsed (non-JSON lines are skipped).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// SIGTERM, then the exit status and every line it wrote.
    pub fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = self.child.wait().unwrap();
        // The pipe closes with the process: joining the reader means every line is in.
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        let lines = self.lines.lock().unwrap().clone();
        (status, lines)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway self-signed certificate for 127.0.0.1 made with `openssl` in `dir`:
/// (certificate, key).
fn self_signed_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(made.success(), "openssl made a certificate");
    (cert, key)
}

/// Kills a child process that a failed start would leave behind.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("armed")
    }

    fn disarm(mut self) -> Child {
        self.0.take().expect("armed")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A private Redis Cluster: three masters and three replicas on free ports (each with its
/// bus on port + 10000), created with `redis-cli --cluster create`, removed when dropped.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    /// Nodes stopped with SIGSTOP: they accept connections and never answer.
    frozen: Vec<u16>,
    dir: std::path::PathBuf,
    /// With [`RedisCluster::start_tls`]: each node's TLS port (by the index of its
    /// plain one, which the helpers here keep using), where the cluster's bus runs too.
    pub tls_ports: Vec<u16>,
}

/// A port that is free, and whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        // Bus ports (+10000) stay below the kernel's ephemeral range (32768 up), where
        // outgoing connections would take them.
        let candidate: u16 = 10_000 + rand::random::<u16>() % 12_000;
        let free = |p: u16| StdListener::bind(("127.0.0.1", p)).is_ok();
        if free(candidate) && free(candidate + 10_000) {
            return candidate;
        }
    }
}

impl RedisCluster {
    /// Starts one (node timeout `node_timeout_ms`: how long before a dead master's
    /// replica takes over), or `None` when `redis-server` is missing and skipping is
    /// allowed (see [`RedisServer::start`]).
    pub fn start(node_timeout_ms: u64) -> Option<Self> {
        Self::start_with(node_timeout_ms, false)
    }

    /// Like [`RedisCluster::start`], and each node also serves TLS (a throwaway
    /// certificate) on a port of its own, announced there to TLS clients
    /// ([`RedisCluster::tls_seeds`]); the bus between the nodes runs on TLS too.
    pub fn start_tls(node_timeout_ms: u64) -> Option<Self> {
        Self::start_with(node_timeout_ms, true)
    }

    fn start_with(node_timeout_ms: u64, tls: bool) -> Option<Self> {
        // Only to apply the same installed-or-skip rule.
        drop(RedisServer::start()?);
        let dir = std::env::temp_dir().join(format!(
            "redis-cluster-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = Self {
            ports: Vec::new(),
            children: Vec::new(),
            frozen: Vec::new(),
            dir,
            tls_ports: Vec::new(),
        };
        if tls {
            self_signed_certificate(&cluster.dir);
        }
        for _ in 0..6 {
            // As for one server: a port taken between the pick and the bind is picked again.
            let launched = (0..5).any(|_| {
                let taken: Vec<u16> = cluster
                    .ports
                    .iter()
                    .chain(&cluster.tls_ports)
                    .copied()
                    .collect();
                let pick = || loop {
                    let p = free_cluster_port();
                    if !taken.contains(&p) {
                        break p;
                    }
                };
                let port = pick();
                let tls_port = tls.then(|| loop {
                    let p = pick();
                    if p != port {
                        break p;
                    }
                });
                match cluster.launch(port, tls_port, node_timeout_ms) {
                    Some(child) => {
                        cluster.ports.push(port);
                        cluster.tls_ports.extend(tls_port);
                        cluster.children.push(Some(child));
                        true
                    }
                    None => false,
                }
            });
            assert!(
                launched,
                "a cluster node could not bind a free port in 5 tries"
            );
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create");
        cluster.wait_until_ok(Duration::from_secs(30));
        Some(cluster)
    }

    /// A node on `port`, once it answers there itself (not another process that took
    /// the port meanwhile); `None` if it could not have the port.
    fn launch(&self, port: u16, tls_port: Option<u16>, node_timeout_ms: u64) -> Option<Child> {
        let mut command = Command::new("redis-server");
        if let Some(tls_port) = tls_port {
            let (cert, key) = (self.dir.join("cert.pem"), self.dir.join("key.pem"));
            command
                .args(["--tls-port", &tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(&cert)
                .args(["--tls-auth-clients", "no"])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"]);
        }
        let mut child = command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-node-timeout", &node_timeout_ms.to_string()])
            // Replicas sync at once (not after the default 5 s batching delay), and a
            // replica may take over however long it has been out of touch.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--cluster-replica-validity-factor", "0"])
            .arg("--cluster-config-file")
            .arg(self.dir.join(format!("nodes-{port}.conf")))
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        answers_itself(&mut child, &format!("redis://127.0.0.1:{port}")).then_some(child)
    }

    /// The seed URLs, as `REDIS_CLUSTER_NODES` takes them.
    pub fn seeds(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The TLS seed URLs of a cluster from [`RedisCluster::start_tls`] (the fragment
    /// skips certificate verification: the certificate is our own).
    pub fn tls_seeds(&self) -> Vec<String> {
        self.tls_ports
            .iter()
            .map(|p| format!("rediss://127.0.0.1:{p}#insecure"))
            .collect()
    }

    /// The TLS port of the node on plain `port`.
    pub fn tls_port_of(&self, port: u16) -> u16 {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        self.tls_ports[i]
    }

    /// A synchronous cluster connection for planting and inspecting values.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(self.seeds())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// `CLUSTER INFO` of the node on `port`, if it answers.
    fn info(port: u16) -> Option<String> {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .ok()?
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        redis::cmd("CLUSTER").arg("INFO").query(&mut conn).ok()
    }

    /// `INFO replication` of the node on `port`, if it answers.
    fn replication(port: u16) -> Option<String> {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .ok()?
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        redis::cmd("INFO").arg("replication").query(&mut conn).ok()
    }

    /// Waits until every live node says every slot is served and every live replica is
    /// in sync with its master (so that it can take over).
    pub fn wait_until_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .ports
                .iter()
                .zip(&self.children)
                .filter(|(p, c)| c.is_some() && !self.frozen.contains(p))
                .all(|(p, _)| {
                    Self::info(*p).is_some_and(|i| i.contains("cluster_state:ok"))
                        && Self::replication(*p).is_some_and(|r| {
                            r.contains("role:master") || r.contains("master_link_status:up")
                        })
                });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The ports of the masters and of the replicas, as the cluster sees them now.
    pub fn roles(&self) -> (Vec<u16>, Vec<u16>) {
        let (mut masters, mut replicas) = (Vec::new(), Vec::new());
        for (port, child) in self.ports.iter().zip(&self.children) {
            if child.is_none() || self.frozen.contains(port) {
                continue;
            }
            let Ok(mut conn) = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
            else {
                continue;
            };
            let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut conn).unwrap();
            match &role[0] {
                redis::Value::BulkString(r) if r == b"master" => masters.push(*port),
                _ => replicas.push(*port),
            }
        }
        (masters, replicas)
    }

    /// Kills (SIGKILL) the node on `port`, as a crash would.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (SIGSTOP) the node on `port`, as a frozen VM or a partition would: its
    /// connections stay open and nothing answers. Killed like the others when dropped.
    pub fn freeze(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        let pid = self.children[i].as_ref().expect("running").id().to_string();
        assert!(Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success());
        self.frozen.push(port);
    }

    /// The port of the master that serves `key` now, asked of a node that answers.
    pub fn owner_of(&self, key: &str) -> u16 {
        let port = self
            .ports
            .iter()
            .zip(&self.children)
            .find(|(p, c)| c.is_some() && !self.frozen.contains(p))
            .map(|(p, _)| *p)
            .expect("a live node");
        let mut conn = Self::node(port);
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .unwrap();
        // Each entry: [start, end, [ip, port, id], replicas...].
        let slots: Vec<(u16, u16, (String, u16))> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query::<Vec<redis::Value>>(&mut conn)
            .unwrap()
            .into_iter()
            .map(|entry| {
                let redis::Value::Array(items) = entry else {
                    panic!("CLUSTER SLOTS entry")
                };
                let start: u16 = redis::from_redis_value(items[0].clone()).unwrap();
                let end: u16 = redis::from_redis_value(items[1].clone()).unwrap();
                let redis::Value::Array(master) = &items[2] else {
                    panic!("CLUSTER SLOTS master")
                };
                let ip: String = redis::from_redis_value(master[0].clone()).unwrap();
                let port: u16 = redis::from_redis_value(master[1].clone()).unwrap();
                (start, end, (ip, port))
            })
            .collect();
        slots
            .into_iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, (_, port))| port)
            .expect("every slot is served")
    }

    /// A connection to the node on `port` alone (no cluster routing).
    pub fn node(port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// The node id of the node on `port`.
    pub fn node_id(port: u16) -> String {
        let mut conn = Self::node(port);
        redis::cmd("CLUSTER").arg("MYID").query(&mut conn).unwrap()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `EVALSHA` calls the Redis behind `conn` has executed since its statistics were
/// last reset (`CONFIG RESETSTAT`, [`reset_stats`]).
pub fn evalsha_calls(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

/// Resets the command statistics of the Redis behind `conn`.
pub fn reset_stats(conn: &mut redis::Connection) {
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(conn)
        .unwrap();
}
