//! The accept loop: hyper with our own limits instead of `axum::serve`, whose header
//! timeout is fixed and which has no cap on connections.
//!
//! - HTTP/1.1 only: what load balancers speak to backends. (hyper-util's auto builder,
//!   which would add h2c, first waits for bytes to sniff the protocol, and a client that
//!   sends nothing would hold its connection forever.)
//! - A header-read timeout cuts clients that never finish their request head (including
//!   ones that send nothing at all).
//! - A cap on open connections: past it, new connections are closed at once rather than
//!   queued, so the process never runs out of file descriptors.
//! - Oversized heads get hyper's 431 (headers) or 414 (URI), never a crash.
//! - Shutdown stops accepting, lets in-flight requests finish within a deadline, and
//!   closes idle keep-alive connections.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{extract::ConnectInfo, Router};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tower::ServiceExt;

/// The limits a listener enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// How long in-flight requests get to finish once accepting stops.
    pub drain_deadline: Duration,
}

/// Largest request head: generous for real clients, far below memory trouble.
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Serves `router` on `listener` until `stop` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: impl std::future::Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = limits.max_connections, "connection limit reached: closing new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone().map_request(
            move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req
            },
        ));
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(limits.drain_deadline) => {
            tracing::warn!(deadline = ?limits.drain_deadline, "drain deadline passed: closing remaining connections");
        }
    }
}
