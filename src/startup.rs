//! Start-up and shutdown of one instance: build the state, bind the listeners, serve until
//! a signal, drain; and the background tasks (metrics upkeep, the limiter's sweep, the
//! Redis pinger) that run meanwhile.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};

use crate::{config::Config, http, shutdown::Phase, state::App};

/// How often histogram samples are folded into their buckets. Until then the exporter
/// holds every sample (8 bytes each, two histograms per request): with a 5-second period,
/// ~95k requests/s took peak RSS to 23-25 MiB in the perf gate's rounds (14 MiB now).
const UPKEEP_PERIOD: Duration = Duration::from_secs(1);

/// How often the rate limiter's sweep runs: it walks every client held, which once a
/// second would be work for nothing.
const SWEEP_PERIOD: Duration = Duration::from_secs(5);

/// A bound, not yet running, instance.
pub struct Application {
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    app: Arc<App>,
}

/// What is left after the HTTP drain: dropped last, it closes the Redis connection.
pub struct Stopped {
    _app: Arc<App>,
}

impl Application {
    /// Builds the state and binds the listeners (port 0 picks a free port).
    pub async fn build(config: Config) -> std::io::Result<Self> {
        let app = App::new(config).map_err(std::io::Error::other)?;
        if let Some(auth) = &app.config.auth {
            auth.start(); // a JWKS URL starts loading now, in the background
        }
        let listener = http::server::bind(app.config.listen_addr)?;
        let admin_listener = match app.config.admin_listen_addr {
            Some(addr) => Some(http::server::bind(addr)?),
            None => None,
        };
        Ok(Self {
            listener,
            admin_listener,
            app,
        })
    }

    /// The API address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The admin address actually bound, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound"))
    }

    /// The shared state (for tests that look inside).
    pub fn state(&self) -> Arc<App> {
        self.app.clone()
    }

    /// Serves until `shutdown` resolves, then: readiness fails, serving goes on for
    /// `SHUTDOWN_DRAIN_SECONDS` so load balancers notice, accepting stops, and in-flight
    /// requests get the request timeout (plus a second) to finish.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> Stopped {
        let app = self.app;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let limits = http::server::Limits {
            header_read_timeout: app.config.header_read_timeout,
            write_timeout: app.config.write_timeout,
            max_connections: app.config.max_connections,
            drain_deadline: app.config.request_timeout + Duration::from_secs(1),
        };
        let gate = || {
            Arc::new(http::server::gate::Gate::new(
                app.config.trusted_proxies.clone(),
                app.config.max_connections_per_address,
                app.config.connection_rate_per_address,
                app.config.rate_limit_ipv6_48_factor,
                app.config.rate_limit_max_keys,
            ))
        };
        // Ready before the first accept, so no request can see the starting phase.
        app.lifecycle.set(Phase::Serving);
        let addr = self.listener.local_addr().ok();
        let admin_addr = self
            .admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok());
        let mut servers = tokio::task::JoinSet::new();
        servers.spawn(http::server::serve(
            self.listener,
            http::router(app.clone()),
            limits,
            gate(),
            app.metrics.clone(),
            stopped(stop_rx.clone()),
        ));
        if let Some(admin) = self.admin_listener {
            servers.spawn(http::server::serve(
                admin,
                http::admin_router(app.clone()),
                http::server::Limits {
                    max_connections: http::server::ADMIN_MAX_CONNECTIONS,
                    ..limits
                },
                gate(),
                app.metrics.clone(),
                stopped(stop_rx.clone()),
            ));
        }
        let background = spawn_background(&app, stopped(stop_rx.clone()));
        // The bound addresses (port 0 resolved), so whoever started us can find us; a
        // target of its own lets a quiet RUST_LOG keep this one line.
        tracing::info!(
            target: "fibonacci_api::serving",
            addr = addr.map(|a| a.to_string()),
            admin_addr = admin_addr.map(|a| a.to_string()),
            max_n = app.config.max_n,
            redis = app.redis.is_some(),
            docs = app.config.docs_enabled,
            rate_limits = %app.config.rate_limits.as_ref().map_or("off".to_string(), |p| p.to_string()),
            "serving"
        );

        shutdown.await;
        app.lifecycle.set(Phase::Draining);
        tracing::info!(drain = ?app.config.shutdown_drain, "shutdown requested: readiness off, still serving");
        tokio::time::sleep(app.config.shutdown_drain).await;
        tracing::info!("no longer accepting connections; draining in-flight requests");
        let _ = stop_tx.send(true);
        while servers.join_next().await.is_some() {}
        let _ = background.await;
        tracing::info!("HTTP drained");
        Stopped { _app: app }
    }
}

/// Metrics upkeep, the limiter's sweep and the Redis pinger, until `stop`.
fn spawn_background(
    app: &Arc<App>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let app = app.clone();
    tokio::spawn(async move {
        tokio::pin!(stop);
        let pinger = app.redis.clone().map(|redis| {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            (
                tokio::spawn(redis.run_pinger(async {
                    let _ = rx.await;
                })),
                tx,
            )
        });
        let mut upkeep = tokio::time::interval(UPKEEP_PERIOD);
        let mut sweep = tokio::time::interval(SWEEP_PERIOD);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = upkeep.tick() => app.metrics.run_upkeep(),
                _ = sweep.tick() => {
                    if let Some(limiter) = &app.limiter {
                        limiter.sweep();
                    }
                }
            }
        }
        if let Some((task, tx)) = pinger {
            let _ = tx.send(());
            let _ = task.await;
        }
    })
}
