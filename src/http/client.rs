//! Who the client of a request is: the TCP peer, or behind trusted proxies the rightmost
//! `X-Forwarded-For` entry that is not itself a trusted proxy.
//!
//! Never the leftmost entry: the client writes that one. Each proxy appends the address
//! it received the request from, so reading from the right, the first address that is
//! not one of ours was written by one of ours, about its peer.

use std::net::IpAddr;

use http::HeaderValue;
use ipnet::IpNet;

use crate::ratelimit::client::{canonical, is_trusted};

/// The resolved client address of a request, for handlers and later layers.
#[derive(Debug, Clone, Copy)]
pub struct Client(pub IpAddr);

/// One `X-Forwarded-For` entry: a bare address (as cloud load balancers write it), also
/// tolerating `[v6]`, `v4:port` and `[v6]:port`. Raw bytes: an entry that is not even
/// text is simply not an address.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let entry = std::str::from_utf8(entry.trim_ascii()).ok()?;
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Ok(sock) = entry.parse::<std::net::SocketAddr>() {
        return Some(sock.ip());
    }
    entry
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .and_then(|e| e.parse().ok())
}

/// The client address of a request from `peer` carrying these `X-Forwarded-For` values.
///
/// The header lines are one comma-separated list, in order (RFC 9110 §5.3), read from
/// the right as raw bytes: whatever a client wrote to the left of the address our proxy
/// appended (non-UTF-8 bytes, junk, more lines) is never looked at, so it cannot change
/// the key. Empty list elements are skipped, as the list syntax requires. An entry that
/// is not an address where our proxy's word was expected means the hop is not one we
/// understand: the peer itself is the client then.
pub fn resolve<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a HeaderValue>,
    trusted: &[IpNet],
) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !is_trusted(peer, trusted) {
        return peer;
    }
    let mut leftmost = None;
    let entries = forwarded_for
        .rev()
        .flat_map(|value| value.as_bytes().rsplit(|b| *b == b','))
        .filter(|entry| !entry.trim_ascii().is_empty());
    for entry in entries {
        let Some(ip) = parse_entry(entry).map(canonical) else {
            return peer;
        };
        if !is_trusted(ip, trusted) {
            return ip;
        }
        leftmost = Some(ip);
    }
    // Every hop is ours: the request started inside; the farthest hop is the client.
    leftmost.unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_rules() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let cases: &[(&str, &[&str], &str, &str)] = &[
            ("203.0.113.9", &[], "203.0.113.9", "no header: the peer"),
            (
                "203.0.113.9",
                &["1.2.3.4"],
                "203.0.113.9",
                "untrusted peer: its header is ignored",
            ),
            (
                "10.0.0.2",
                &["198.51.100.7"],
                "198.51.100.7",
                "one trusted proxy",
            ),
            (
                "10.0.0.2",
                &["6.6.6.6, 198.51.100.7"],
                "198.51.100.7",
                "forged leftmost entry ignored",
            ),
            (
                "10.0.0.2",
                &["198.51.100.7, 10.0.0.3"],
                "198.51.100.7",
                "two proxies of ours",
            ),
            (
                "10.0.0.2",
                &["6.6.6.6", "198.51.100.7, 10.0.0.3"],
                "198.51.100.7",
                "several headers",
            ),
            (
                "10.0.0.2",
                &["10.0.0.5"],
                "10.0.0.5",
                "all hops ours: the farthest",
            ),
            (
                "10.0.0.2",
                &["6.6.6.6, garbage"],
                "10.0.0.2",
                "garbage: back to the peer",
            ),
            ("10.0.0.2", &[""], "10.0.0.2", "empty header: the peer"),
            (
                "10.0.0.2",
                &["198.51.100.7,"],
                "198.51.100.7",
                "an empty trailing element is skipped",
            ),
            (
                "10.0.0.2",
                &["garbage, 198.51.100.7"],
                "198.51.100.7",
                "garbage left of the client does not matter",
            ),
            (
                "10.0.0.2",
                &["198.51.100.7:4431"],
                "198.51.100.7",
                "address with port",
            ),
            (
                "10.0.0.2",
                &["[2001:db8::1]:443"],
                "2001:db8::1",
                "bracketed IPv6 with port",
            ),
            (
                "::ffff:10.0.0.2",
                &["198.51.100.7"],
                "198.51.100.7",
                "mapped peer is trusted",
            ),
            ("fd00::1", &["2001:db8::7"], "2001:db8::7", "IPv6 proxy"),
            (
                "::ffff:203.0.113.9",
                &[],
                "203.0.113.9",
                "mapped address is IPv4",
            ),
        ];
        for (peer, headers, expected, why) in cases {
            let values: Vec<HeaderValue> = headers
                .iter()
                .map(|h| HeaderValue::from_str(h).unwrap())
                .collect();
            assert_eq!(
                resolve(ip(peer), values.iter(), &trusted),
                ip(expected),
                "{why}"
            );
        }
    }

    #[test]
    fn bytes_left_of_the_client_are_never_read() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let cases: &[(&[&[u8]], &str, &str)] = &[
            (
                &[b"\x80, 198.51.100.7"],
                "198.51.100.7",
                "non-UTF-8 on the left",
            ),
            (
                &[b"\x80", b"198.51.100.7, 10.0.0.3"],
                "198.51.100.7",
                "in an earlier line",
            ),
            (
                &[b"198.51.100.7 \x80"],
                "10.0.0.2",
                "junk in the client's own entry: the peer",
            ),
            (&[b"\xff"], "10.0.0.2", "nothing but junk: the peer"),
        ];
        for (lines, expected, why) in cases {
            let values: Vec<HeaderValue> = lines
                .iter()
                .map(|l| HeaderValue::from_bytes(l).unwrap())
                .collect();
            assert_eq!(
                resolve(ip("10.0.0.2"), values.iter(), &trusted),
                ip(expected),
                "{why}"
            );
        }
    }

    #[test]
    fn nothing_is_trusted_by_default() {
        let values = [HeaderValue::from_static("198.51.100.7")];
        assert_eq!(resolve(ip("10.0.0.2"), values.iter(), &[]), ip("10.0.0.2"));
    }
}
