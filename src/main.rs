//! The `fibonacci-api` binary: configuration, telemetry, then the application until a signal.

use std::{process::ExitCode, time::Duration};

use fibonacci_api::{
    config::{Cli, Command, StartError},
    healthcheck, shutdown, telemetry, Application,
};

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
