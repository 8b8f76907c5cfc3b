//! The `fibonacci-api` binary: configuration, telemetry, then the application until a signal.

#![forbid(unsafe_code)]

use std::{process::ExitCode, time::Duration};

use fibonacci_api::{
    config::{Cli, Command, StartError},
    healthcheck, shutdown, telemetry, Application,
};

// jemalloc, not the system's glibc malloc: a request woken by the task that made its Redis
// call runs on that task's worker and frees there what another worker allocated, which
// under glibc took an arena lock (68 % of the Redis limiter row's futex calls); and glibc
// kept the heap a burst of connections grew until a 5-second malloc_trim sweep gave it
// back. jemalloc's background threads purge freed pages after ~1 s by themselves
// (.cargo/config.toml). Figures: docs/performance.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::load() {
        Ok(cli) => cli,
        Err(StartError::Setting(e)) => {
            eprintln!("fibonacci-api: configuration error: {e}");
            return ExitCode::from(2);
        }
        // --help, --version, or a command-line mistake clap explains itself.
        Err(StartError::Usage(e)) => e.exit(),
    };
    let config = cli.config;
    if let Some(Command::Healthcheck { url, timeout_ms }) = &cli.command {
        let timeout = Duration::from_millis(*timeout_ms);
        return match healthcheck::run(url.as_deref(), &config, timeout).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("fibonacci-api: unhealthy: {why}");
                ExitCode::FAILURE
            }
        };
    }
    let telemetry = match telemetry::init(config.log_format) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("fibonacci-api: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("fibonacci-api: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Drain HTTP, then flush spans (the last requests' included), then close Redis.
    let stopped = app.run_until_stopped(shutdown::signal()).await;
    telemetry.shutdown().await;
    drop(stopped);
    ExitCode::SUCCESS
}
