//! Who may open a connection: a cap on connections open at once and a rate of new ones,
//! per client address, so one address cannot take every connection slot from everyone
//! else. Trusted proxies are exempt: a load balancer is many clients.
//!
//! Addresses are keyed as the rate limiter keys them (an IPv4 address, an IPv6 /64).
//! New connections per address are admitted by GCRA (governor's keyed limiter); its
//! state is swept of addresses at rest and bounded in size like the request limiter's.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use crate::ratelimit::{client, ClientKey};

/// Why a connection was refused; the `reason` label of `http_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `MAX_CONNECTIONS` are open already.
    Full,
    /// This address has `MAX_CONNECTIONS_PER_ADDRESS` open already.
    PerAddress,
    /// This address opens connections faster than `CONNECTION_RATE_PER_ADDRESS`.
    Rate,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Full => "max_connections",
            Self::PerAddress => "per_address",
            Self::Rate => "rate",
        }
    }
}

/// The per-address policy of one listener.
pub struct Gate {
    trusted: Vec<IpNet>,
    /// 0: no cap.
    per_address: u32,
    open: OpenCounts,
    rate: Option<DefaultKeyedRateLimiter<ClientKey>>,
    /// Most addresses whose rate state is kept; past it new addresses are not rate
    /// checked (the per-address cap and `MAX_CONNECTIONS` still hold).
    max_rate_keys: usize,
}

/// Connections open per address.
type OpenCounts = Arc<Mutex<HashMap<ClientKey, u32>>>;

/// Holds one address's slot while its connection lives.
pub struct Ticket {
    slot: Option<(OpenCounts, ClientKey)>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((open, key)) = self.slot.take() {
            let mut open = open.lock().expect("not poisoned");
            if let Some(count) = open.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&key);
                }
            }
        }
    }
}

impl Gate {
    /// A gate with at most `per_address` connections open and `rate_per_second` new ones
    /// per second (bursts of as many) per address; 0 turns either off.
    pub fn new(
        trusted: Vec<IpNet>,
        per_address: u32,
        rate_per_second: u32,
        max_rate_keys: usize,
    ) -> Self {
        Self {
            trusted,
            per_address,
            open: Arc::default(),
            rate: NonZeroU32::new(rate_per_second)
                .map(|rate| RateLimiter::keyed(Quota::per_second(rate))),
            max_rate_keys,
        }
    }

    /// Admits a connection from `peer`, or says why not.
    pub fn admit(&self, peer: IpAddr) -> Result<Ticket, Refusal> {
        let peer = client::canonical(peer);
        if client::is_trusted(peer, &self.trusted) {
            return Ok(Ticket { slot: None });
        }
        let key = ClientKey::of(peer);
        if let Some(rate) = &self.rate {
            if rate.len() < self.max_rate_keys && rate.check_key(&key).is_err() {
                return Err(Refusal::Rate);
            }
        }
        if self.per_address == 0 {
            return Ok(Ticket { slot: None });
        }
        let mut open = self.open.lock().expect("not poisoned");
        let count = open.entry(key.clone()).or_insert(0);
        if *count >= self.per_address {
            return Err(Refusal::PerAddress);
        }
        *count += 1;
        Ok(Ticket {
            slot: Some((self.open.clone(), key)),
        })
    }

    /// Forgets the rate state of addresses at rest; call periodically.
    pub fn sweep(&self) {
        if let Some(rate) = &self.rate {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
    }

    /// Addresses holding connections now (for tests).
    pub fn addresses_open(&self) -> usize {
        self.open.lock().expect("not poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_cap_is_per_address_and_freed_when_connections_close() {
        let gate = Gate::new(vec![], 2, 0, 1000);
        let a1 = gate.admit(ip("192.0.2.1")).unwrap();
        let _a2 = gate.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(gate.admit(ip("192.0.2.1")).err(), Some(Refusal::PerAddress));
        assert!(
            gate.admit(ip("192.0.2.2")).is_ok(),
            "another address is untouched"
        );
        drop(a1);
        assert!(
            gate.admit(ip("192.0.2.1")).is_ok(),
            "a closed connection frees its slot"
        );
    }

    #[test]
    fn an_ipv6_64_is_one_address_and_mapped_ipv4_is_ipv4() {
        let gate = Gate::new(vec![], 1, 0, 1000);
        let _held = gate.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            gate.admit(ip("2001:db8:1:2::99")).err(),
            Some(Refusal::PerAddress)
        );
        let _v4 = gate.admit(ip("192.0.2.9")).unwrap();
        assert_eq!(
            gate.admit(ip("::ffff:192.0.2.9")).err(),
            Some(Refusal::PerAddress)
        );
    }

    #[test]
    fn new_connections_are_rate_limited_with_a_burst() {
        let gate = Gate::new(vec![], 0, 5, 1000);
        let admitted = (0..20)
            .filter(|_| gate.admit(ip("192.0.2.1")).is_ok())
            .count();
        assert!(
            (5..=6).contains(&admitted),
            "a burst of 5, then 5/s: {admitted}"
        );
        assert!(gate.admit(ip("192.0.2.2")).is_ok(), "per address");
    }

    #[test]
    fn trusted_proxies_are_exempt() {
        let gate = Gate::new(vec!["10.0.0.0/8".parse().unwrap()], 1, 1, 1000);
        let held: Vec<_> = (0..50)
            .map(|_| gate.admit(ip("10.1.2.3")).unwrap())
            .collect();
        assert_eq!(held.len(), 50);
        assert_eq!(gate.addresses_open(), 0, "nothing tracked for a proxy");
    }

    #[test]
    fn rate_state_is_bounded() {
        let gate = Gate::new(vec![], 0, 1, 100);
        for i in 0..10_000u32 {
            let _ = gate.admit(IpAddr::from(i.to_be_bytes()));
        }
        assert!(gate.rate.as_ref().unwrap().len() <= 100);
    }
}
