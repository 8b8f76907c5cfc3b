//! Fuzzes the client-address resolution: whatever `X-Forwarded-For` headers arrive, the
//! client is the peer or an address actually written in them, an untrusted peer's
//! headers change nothing, whatever is written left of the client changes nothing, and
//! nothing panics.
#![no_main]

use std::net::{IpAddr, Ipv6Addr};

use fibonacci_api::{http::client::resolve, ratelimit::client::canonical};
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let peer = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&data[..16]).unwrap()));
    // Half the time the peer is a trusted proxy (10.0.0.0/8 as IPv4-mapped IPv6).
    let peer = if data[16] & 1 == 1 {
        IpAddr::from([10, data[0], data[1], data[2]])
    } else {
        peer
    };
    let headers: Vec<HeaderValue> = data[17..]
        .split(|b| *b == b'\n')
        .filter_map(|h| HeaderValue::from_bytes(h).ok())
        .collect();
    let trusted = ["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
    let client = resolve(peer, headers.iter(), &trusted);
    let peer = canonical(peer);
    if !trusted.iter().any(|net: &ipnet::IpNet| net.contains(&peer)) {
        assert_eq!(client, peer, "an untrusted peer's header was believed");
        return;
    }
    if client != peer {
        let written: Vec<IpAddr> = headers
            .iter()
            .flat_map(|h| h.as_bytes().split(|b| *b == b','))
            .filter_map(|entry| std::str::from_utf8(entry).ok())
            .filter_map(any_address)
            .map(canonical)
            .collect();
        assert!(
            written.contains(&client),
            "client {client} appears nowhere in {headers:?}"
        );
        if !trusted.iter().any(|net: &ipnet::IpNet| net.contains(&client)) {
            // Anything a client prepends (another line, any bytes) is left of its address.
            let junk = HeaderValue::from_bytes(&data[16..]).unwrap_or(HeaderValue::from_static("x"));
            let prefixed: Vec<HeaderValue> = std::iter::once(junk).chain(headers.iter().cloned()).collect();
            assert_eq!(
                resolve(peer, prefixed.iter(), &trusted),
                client,
                "bytes left of the client changed the key: {prefixed:?}"
            );
        }
    }
});

/// Every way an entry could spell an address: bare, with a port, bracketed.
fn any_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}
