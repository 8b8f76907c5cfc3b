//! The `fibonacci-api` binary: configuration, telemetry, then the application until a signal.

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use fibonacci_api::{
    config::{Cli, Command},
    healthcheck, shutdown, telemetry, Application,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Healthcheck { url, timeout_ms }) = &cli.command {
        let timeout = Duration::from_millis(*timeout_ms);
        return match healthcheck::run(url.as_deref(), &cli.settings, timeout).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("fibonacci-api: unhealthy: {why}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match cli.settings.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fibonacci-api: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
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
