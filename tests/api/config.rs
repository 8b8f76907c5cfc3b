//! Start-up with bad settings: the real binary, one line naming the variable, non-zero exit.

use std::process::Command;

fn run_with(env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fibonacci-api"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd.env("LISTEN_ADDR", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

#[test]
fn a_bad_setting_stops_start_up_with_one_line() {
    let cases = [
        ("MAX_N", "lots", "MAX_N"),
        ("RATE_LIMITS", "30/fortnight", "RATE_LIMITS"),
        ("TRUSTED_PROXIES", "10.0.0.0/99", "TRUSTED_PROXIES"),
        ("REDIS_TIMEOUT_MS", "0", "REDIS_TIMEOUT_MS"),
        ("CACHE_MAX_BYTES", "64MB", "CACHE_MAX_BYTES"),
        ("LOG_FORMAT", "yaml", "LOG_FORMAT"),
        ("LISTEN_ADDR", "nowhere", "LISTEN_ADDR"),
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "carrier-pigeon",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ];
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
