//! The `healthcheck` subcommand: one HTTP probe of a running instance, for container
//! health checks in an image with no shell or curl.
//!
//! Without a URL it probes `/livez` where this very configuration listens (the admin
//! listener when there is one), so an image run with another `LISTEN_ADDR` stays healthy.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs the subcommand: probes `url`, or else the listener `config` describes.
pub async fn run(
    url: Option<&str>,
    config: &crate::config::Config,
    timeout: Duration,
) -> Result<(), String> {
    if let Some(url) = url {
        return probe_url(url, timeout).await;
    }
    let listen = config.admin_listen_addr.unwrap_or(config.listen_addr);
    probe_listener(&loopback_targets(listen), timeout).await
}

/// The addresses to probe for a server listening on `listen`: a wildcard address is
/// reached over loopback; `[::]` is tried over IPv6 and IPv4, since a dual-stack socket
/// answers both and a kernel without IPv6 makes the server fall back to IPv4.
pub fn loopback_targets(listen: SocketAddr) -> Vec<SocketAddr> {
    let port = listen.port();
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => vec![(Ipv4Addr::LOCALHOST, port).into()],
        IpAddr::V6(ip) if ip.is_unspecified() => vec![
            (Ipv6Addr::LOCALHOST, port).into(),
            (Ipv4Addr::LOCALHOST, port).into(),
        ],
        _ => vec![listen],
    }
}

/// Probes `GET /livez` on the first of `targets` that answers; `Ok` on a 200.
pub async fn probe_listener(targets: &[SocketAddr], timeout: Duration) -> Result<(), String> {
    let mut why = String::from("no address to probe");
    for target in targets {
        match probe(&target.ip().to_string(), target.port(), "/livez", timeout).await {
            Ok(()) => return Ok(()),
            Err(e) => why = e,
        }
    }
    Err(why)
}

/// Probes `url` once; `Ok` on a 200.
pub async fn probe_url(url: &str, timeout: Duration) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("no host in {url:?}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    probe(host, port, path, timeout).await
}

async fn probe(host: &str, port: u16, path: &str, timeout: Duration) -> Result<(), String> {
    let shown = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("http://[{host}]:{port}{path}"),
        _ => format!("http://{host}:{port}{path}"),
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("{shown}: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("{shown}: {e}"))?;
        let mut head = [0u8; 12];
        stream
            .read_exact(&mut head)
            .await
            .map_err(|e| format!("{shown}: {e}"))?;
        match &head[9..12] {
            b"200" => Ok(()),
            status => Err(format!(
                "{shown} answered {}",
                String::from_utf8_lossy(status)
            )),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{shown} did not answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_are_probed_over_loopback() {
        let cases = [
            ("0.0.0.0:8080", vec!["127.0.0.1:8080"]),
            ("[::]:5000", vec!["[::1]:5000", "127.0.0.1:5000"]),
            ("10.1.2.3:9000", vec!["10.1.2.3:9000"]),
            ("[::1]:7", vec!["[::1]:7"]),
        ];
        for (listen, expected) in cases {
            let expected: Vec<SocketAddr> = expected.iter().map(|a| a.parse().unwrap()).collect();
            assert_eq!(
                loopback_targets(listen.parse().unwrap()),
                expected,
                "{listen}"
            );
        }
    }
}
