//! Whom a budget belongs to: the key of a client address (an IPv4 address, an IPv6 /64
//! and its /48) or of an authenticated subject. Finding the client address of a request
//! is the HTTP layer's (`http::client`).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

/// The rate-limiting identity of a client: an IPv4 address, an IPv6 /64 (one
/// subscriber's allocation: per-address keys would hand an IPv6 user 2^64 budgets), or
/// with JWT authentication the token's verified subject. An IPv6 /48 is the shared
/// budget of all the /64s in it (what a hosting provider or tunnel broker hands out, so
/// one holder cannot rotate through 65,536 fresh budgets).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKey {
    V4(Ipv4Addr),
    V6Prefix(u64),
    /// The top 48 bits of an IPv6 address, in the low bits.
    V6Net48(u64),
    Subject(std::sync::Arc<str>),
}

impl ClientKey {
    /// The key of an address.
    pub fn of(ip: IpAddr) -> Self {
        match canonical(ip) {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => Self::V6Prefix((u128::from(v6) >> 64) as u64),
        }
    }

    /// The /48 an IPv6 /64 belongs to: the second budget its requests must fit.
    pub fn net48(&self) -> Option<Self> {
        match self {
            Self::V6Prefix(prefix) => Some(Self::V6Net48(prefix >> 16)),
            _ => None,
        }
    }

    /// The part of the key that places it in a Redis Cluster slot (the `{…}` hash tag):
    /// a /64 and its /48 share the /48's, so one script can touch both atomically.
    pub fn slot_tag(&self) -> String {
        match self {
            Self::V6Prefix(prefix) => Self::V6Net48(prefix >> 16).to_string(),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(v4) => write!(f, "{v4}"),
            Self::V6Prefix(prefix) => {
                write!(f, "{}/64", Ipv6Addr::from(u128::from(*prefix) << 64))
            }
            Self::V6Net48(prefix) => {
                write!(f, "{}/48", Ipv6Addr::from(u128::from(*prefix) << 80))
            }
            Self::Subject(subject) => write!(f, "sub:{subject}"),
        }
    }
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) are the IPv4 clients they name.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is one of the trusted proxies.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64() {
        let a = ClientKey::of(ip("2001:db8:1:2:aaaa::1"));
        let b = ClientKey::of(ip("2001:db8:1:2:bbbb::9"));
        let c = ClientKey::of(ip("2001:db8:1:3::1"));
        assert_eq!(a, b, "same /64, same budget");
        assert_ne!(a, c, "neighbouring /64, own budget");
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(a.net48(), c.net48(), "neighbouring /64s share their /48");
        assert_eq!(a.net48().unwrap().to_string(), "2001:db8:1::/48");
        assert_ne!(a.net48(), ClientKey::of(ip("2001:db8:2:2::1")).net48());
        assert_eq!(
            ClientKey::of(ip("192.0.2.1")).net48(),
            None,
            "IPv4 has no /48"
        );
        assert_eq!(
            ClientKey::of(ip("::ffff:192.0.2.1")).to_string(),
            "192.0.2.1"
        );
    }
}
