//! Start-up with bad settings: the real binary, one line naming the variable, non-zero exit.

use std::process::Command;

/// Runs the binary with `env`, expecting it to stop by itself (a bad setting). One still
/// running after 20 s has started serving instead: it is killed and the test fails.
fn run_with(env: &[(&str, &str)]) -> std::process::Output {
    use std::{
        process::Stdio,
        time::{Duration, Instant},
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fibonacci-api"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("the binary runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{env:?}: the service started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_bad_setting_stops_start_up_with_one_line() {
    let cases = [
        ("MAX_N", "lots", "MAX_N"),
        ("RATE_LIMITS", "30/fortnight", "RATE_LIMITS"),
        ("TRUSTED_PROXIES", "10.0.0.0/99", "TRUSTED_PROXIES"),
        ("TRUSTED_PROXIES", "0.0.0.0/0", "TRUSTED_PROXIES"),
        ("TRUSTED_PROXIES", "10.0.0.1,::/0", "TRUSTED_PROXIES"),
        ("TRUSTED_PROXIES", "1.2.3.4/8", "TRUSTED_PROXIES"),
        ("RUST_LOG", "info,fibonacci_api=loud", "RUST_LOG"),
        ("OTEL_TRACES_SAMPLER", "bogus", "OTEL_TRACES_SAMPLER"),
        ("REDIS_TIMEOUT_MS", "0", "REDIS_TIMEOUT_MS"),
        ("CACHE_MAX_BYTES", "64MB", "CACHE_MAX_BYTES"),
        ("LOG_FORMAT", "yaml", "LOG_FORMAT"),
        ("DOCS_ENABLED", "yes", "DOCS_ENABLED"),
        ("LISTEN_ADDR", "nowhere", "LISTEN_ADDR"),
        (
            "REDIS_CLUSTER_NODES",
            "unix:///tmp/redis.sock",
            "REDIS_CLUSTER_NODES",
        ),
        (
            "REDIS_CLUSTER_NODES",
            "redis://:x@[::1",
            "REDIS_CLUSTER_NODES",
        ),
        (
            "REDIS_CLUSTER_NODES",
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001/3",
            "REDIS_CLUSTER_NODES",
        ),
        // The first seed's credentials serve every node: none there and a password on
        // another seed would run without it.
        (
            "REDIS_CLUSTER_NODES",
            "redis://127.0.0.1:7000,redis://:hunter2@127.0.0.1:7001",
            "REDIS_CLUSTER_NODES",
        ),
        (
            "REDIS_CLUSTER_NODES",
            "redis://alice:hunter2@127.0.0.1:7000,redis://bob:hunter2@127.0.0.1:7001",
            "REDIS_CLUSTER_NODES",
        ),
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "carrier-pigeon",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ];
    let both = run_with(&[
        ("REDIS_URL", "redis://:hunter2@a:6379"),
        ("REDIS_CLUSTER_NODES", "redis://:hunter2@b:6379"),
    ]);
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert_eq!(
        both.status.code(),
        Some(2),
        "REDIS_URL and REDIS_CLUSTER_NODES: {stderr}"
    );
    assert!(
        stderr.lines().count() == 1
            && stderr.contains("REDIS_CLUSTER_NODES")
            && stderr.contains("REDIS_URL")
            && !stderr.contains("hunter2"),
        "one line naming both, no secret: {stderr:?}"
    );
    for (var, value, named) in cases {
        let mut env = vec![(var, value)];
        if var == "OTEL_EXPORTER_OTLP_PROTOCOL" {
            env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1"));
        }
        let out = run_with(&env);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: exit status");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<_> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{var}={value}: one line, got {stderr:?}");
        assert!(
            lines[0].contains(named) && lines[0].contains("expected"),
            "{var}={value}: {stderr:?}"
        );
    }
}

// A variable that turns something on when set must not be set blank: an empty Secret
// key would otherwise turn Redis or authentication off without a word (no Redis: no
// `redis_up`, so no alert either).
#[test]
fn a_blank_value_for_a_setting_that_turns_something_on_stops_start_up() {
    for var in [
        "REDIS_URL",
        "REDIS_CLUSTER_NODES",
        "ADMIN_LISTEN_ADDR",
        "AUTH_JWT_HS256_SECRET",
        "AUTH_JWT_PUBLIC_KEY_FILE",
        "AUTH_JWT_JWKS_FILE",
        "AUTH_JWT_JWKS_URL",
        "AUTH_JWT_ISSUER",
    ] {
        for blank in ["", "  "] {
            let stderr = assert_refused(&[(var, blank)], var, "blank");
            assert!(
                stderr.contains("unset"),
                "{var}: says to unset it: {stderr}"
            );
        }
    }
}

#[test]
fn the_healthcheck_subcommand_fails_when_nothing_answers() {
    let port = crate::helpers::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_fibonacci-api"))
        .args([
            "healthcheck",
            "--url",
            &format!("http://127.0.0.1:{port}/livez"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "nothing listens on {port}");
}

fn assert_refused(env: &[(&str, &str)], named: &str, why: &str) -> String {
    let out = run_with(env);
    assert_eq!(out.status.code(), Some(2), "{why}: exit status");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{why}: one line, got {stderr:?}");
    assert!(
        lines[0].contains(&format!("invalid {named}=")) && lines[0].contains("expected"),
        "{why}: {stderr:?}"
    );
    stderr
}

const SECRET_32: &str = "hunter2-jwt-secret-of-32-bytes-or-more";

#[test]
fn auth_without_an_audience_refuses_to_start() {
    let stderr = assert_refused(
        &[("AUTH_JWT_HS256_SECRET", SECRET_32)],
        "AUTH_JWT_AUDIENCE",
        "a token minted for another service must not be accepted by default",
    );
    assert!(
        stderr.contains('*'),
        "the line says how to opt out: {stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn a_bad_jwks_url_refuses_to_start() {
    for (url, why) in [
        ("not a url", "not a URL"),
        (
            "http://idp.example/.well-known/jwks.json",
            "plain http to a remote host: anyone on the path could swap the keys",
        ),
        ("ftp://idp.example/jwks", "not http(s)"),
    ] {
        assert_refused(
            &[
                ("AUTH_JWT_JWKS_URL", url),
                ("AUTH_JWT_AUDIENCE", "fibonacci-api"),
            ],
            "AUTH_JWT_JWKS_URL",
            why,
        );
    }
    let stderr = assert_refused(
        &[
            ("AUTH_JWT_JWKS_URL", "https://idp.example/jwks"),
            ("AUTH_JWT_PUBLIC_KEY_FILE", "/some/key.pem"),
            ("AUTH_JWT_AUDIENCE", "fibonacci-api"),
        ],
        "AUTH_JWT_*",
        "two key sources",
    );
    assert!(stderr.contains("AUTH_JWT_JWKS_URL"), "{stderr}");
}

/// `--help` shows each setting's current environment value, except for secrets.
#[test]
fn help_never_shows_secret_values() {
    let secrets = [
        ("REDIS_URL", "redis://:hunter2-redis@redis.internal:6379/0"),
        (
            "REDIS_CLUSTER_NODES",
            "redis://:hunter2-cluster@10.0.0.1:6379,redis://:hunter2-cluster@10.0.0.2:6379",
        ),
        ("AUTH_JWT_HS256_SECRET", SECRET_32),
        (
            "AUTH_JWT_JWKS_URL",
            "https://client:hunter2-jwks@idp.example/jwks?token=hunter2-query",
        ),
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_fibonacci-api"))
        .env_clear()
        .env("MAX_N", "777")
        .envs(secrets)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("MAX_N=777"),
        "--help shows ordinary env values, so the check below means something: {help}"
    );
    for (var, _) in secrets {
        assert!(help.contains(var), "{var} is documented in --help");
    }
    assert!(!help.contains("hunter2"), "a secret in --help: {help}");
}

/// `Debug` of the raw settings and of the validated configuration (what a `{:?}` in a
/// log line or a panic message would print) redacts every secret.
#[test]
fn debug_output_redacts_secrets() {
    use clap::Parser;
    use fibonacci_api::config::Cli;
    let cli = Cli::try_parse_from([
        "fibonacci-api",
        "--redis-url",
        "redis://app:hunter2-redis@redis.internal:6379/0",
        "--auth-jwt-hs256-secret",
        SECRET_32,
        "--auth-jwt-audience",
        "fibonacci-api",
    ])
    .unwrap();
    // Parsed, not yet validated: what a `{:?}` before start-up would print.
    let settings = format!("{:?}", cli.config);
    assert!(!settings.contains("hunter2"), "Settings: {settings}");
    let cluster = Cli::try_parse_from([
        "fibonacci-api",
        "--redis-cluster-nodes",
        "rediss://app:hunter2-a@node-a:7000,rediss://app:hunter2-a@node-b:7001",
    ])
    .unwrap();
    let shown = format!("{:?}", cluster.config);
    assert!(
        !shown.contains("hunter2") && shown.contains("node-b:7001"),
        "{shown}"
    );
    let shown = format!(
        "{:?}",
        fibonacci_api::config::Config::from_args(&[
            "--redis-cluster-nodes",
            "rediss://app:hunter2-a@node-a:7000,rediss://app:hunter2-a@node-b:7001",
        ])
        .unwrap()
    );
    assert!(
        !shown.contains("hunter2") && shown.contains("node-a:7000"),
        "{shown}"
    );
    assert!(
        settings.contains("redis.internal:6379"),
        "the non-secret part stays useful: {settings}"
    );
    let config = fibonacci_api::config::Config::from_args(&[
        "--redis-url",
        "redis://app:hunter2-redis@redis.internal:6379/0",
        "--auth-jwt-hs256-secret",
        SECRET_32,
        "--auth-jwt-audience",
        "fibonacci-api",
    ])
    .unwrap();
    let config = format!("{config:?}");
    assert!(!config.contains("hunter2"), "Config: {config}");
    assert!(config.contains("redis.internal:6379"), "{config}");
}
