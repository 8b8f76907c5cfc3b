//! The accept loop: hyper with our own limits instead of `axum::serve`, whose header
//! timeout is fixed and which has no cap on connections.
//!
//! - HTTP/1.1 only: what load balancers speak to backends. (hyper-util's auto builder,
//!   which would add h2c, first waits for bytes to sniff the protocol, and a client that
//!   sends nothing would hold its connection forever.)
//! - A header-read timeout cuts clients that never finish their request head (including
//!   ones that send nothing at all).
//! - A cap on open connections: past it, new connections are closed at once rather than
//!   queued, so the process never runs out of file descriptors; and per client address a
//!   cap and a rate ([`gate`]), so one address cannot take every slot.
//! - A write deadline ([`io`]): a client that stops reading its responses is cut off;
//!   at most `MAX_HEAD_BYTES` of pipelined requests are read ahead of the answers.
//! - Oversized heads get hyper's 431 (headers) or 414 (URI), never a crash.
//! - Shutdown stops accepting, lets in-flight requests finish within a deadline, and
//!   closes idle keep-alive connections.

pub mod gate;
pub mod io;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{net::TcpListener, sync::Semaphore};

use super::router::Api;
use crate::metrics::Metrics;

/// The limits a listener enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    /// How long a response may wait on a client that does not read it.
    pub write_timeout: Duration,
    pub max_connections: usize,
    /// How long in-flight requests get to finish once accepting stops.
    pub drain_deadline: Duration,
}

/// Binds a listener. `[::]` is dual-stack whatever the host's `bindv6only` says, so one
/// default serves IPv4-only, IPv6-only and dual-stack clusters; on a kernel with IPv6
/// disabled it falls back to `0.0.0.0` on the same port, with a warning.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match bind_socket(addr) {
        Err(e) if is_wildcard_v6(addr) && ipv6_unavailable(&e) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tracing::warn!(%addr, fallback = %v4, error = %e, "IPv6 is unavailable: listening on IPv4 only");
            bind_socket(v4)
        }
        bound => bound,
    }
}

fn is_wildcard_v6(addr: SocketAddr) -> bool {
    matches!(addr.ip(), std::net::IpAddr::V6(ip) if ip.is_unspecified())
}

/// Whether binding failed because this kernel or namespace has no IPv6.
fn ipv6_unavailable(e: &std::io::Error) -> bool {
    const EAFNOSUPPORT: i32 = 97;
    const EADDRNOTAVAIL: i32 = 99;
    matches!(e.raw_os_error(), Some(EAFNOSUPPORT | EADDRNOTAVAIL))
}

fn bind_socket(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // As std and tokio do: a restarted process can rebind while old sockets sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Open connections the admin listener (`ADMIN_LISTEN_ADDR`) holds: probes and scrapes
/// need a few, and with a cap of its own a flood of API connections cannot lock the
/// kubelet out, nor can the admin port double what `MAX_CONNECTIONS` lets clients hold
/// in memory (docs/reliability.md sizes the pod's memory by it).
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The kernel send buffer of a connection (it reports about twice this).
const SEND_BUFFER_BYTES: usize = 128 * 1024;

/// Largest request head: generous for real clients, far below memory trouble.
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// How often the gate forgets the rate state of addresses at rest.
const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// Serves `api` on `listener` until `stop` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    api: Api,
    limits: Limits,
    gate: Arc<gate::Gate>,
    metrics: Arc<Metrics>,
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
    let mut sweep = tokio::time::interval(SWEEP_PERIOD);
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = sweep.tick() => {
                gate.sweep();
                continue;
            }
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
        // Per address first: one address at its cap must not use up the global slots.
        let admitted = gate.admit(peer.ip()).and_then(|ticket| {
            permits
                .clone()
                .try_acquire_owned()
                .map(|permit| (ticket, permit))
                .map_err(|_| gate::Refusal::Full)
        });
        let (ticket, permit) = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                metrics.connection_refused(refusal.label());
                // Debug, not warn: a flood of refusals would otherwise flood the logs.
                tracing::debug!(%peer, reason = refusal.label(), "connection refused");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Answers the client never reads must not outlive the connection: the kernel
        // aborts a socket whose queued data cannot be sent (a shut window) for this long,
        // the closed ones too, which would otherwise sit in FIN-WAIT-1 holding them.
        let socket = socket2::SockRef::from(&stream);
        let _ = socket.set_tcp_user_timeout(Some(limits.write_timeout));
        // And bound what one connection can park in the kernel: autotuning would let a
        // client that never reads hold megabytes of answers per socket (plenty for
        // F(10^6)'s 209 kB in flight).
        let _ = socket.set_send_buffer_size(SEND_BUFFER_BYTES);
        let service = api.serving(peer);
        let io = io::WriteDeadline::new(TokioIo::new(stream), limits.write_timeout);
        let conn = graceful.watch(builder.serve_connection(io, service));
        let open = metrics.connections_open().clone();
        open.increment(1.0);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            open.decrement(1.0);
            drop((ticket, permit));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_ipv6_stack_falls_back() {
        let errno = std::io::Error::from_raw_os_error;
        assert!(
            ipv6_unavailable(&errno(97)),
            "EAFNOSUPPORT: no IPv6 in this kernel"
        );
        assert!(
            ipv6_unavailable(&errno(99)),
            "EADDRNOTAVAIL: IPv6 disabled here"
        );
        assert!(!ipv6_unavailable(&errno(98)), "EADDRINUSE is a real error");
        assert!(!ipv6_unavailable(&errno(13)), "EACCES is a real error");
        assert!(is_wildcard_v6("[::]:5000".parse().unwrap()));
        assert!(!is_wildcard_v6("[::1]:5000".parse().unwrap()));
        assert!(!is_wildcard_v6("0.0.0.0:5000".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_port_in_use_is_an_error_not_a_fallback() {
        let held = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = held.local_addr().unwrap().port();
        let err = bind(SocketAddr::from(([127, 0, 0, 1], port))).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
