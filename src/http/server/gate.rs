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
    sync::{Arc, Mutex, RwLock},
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
    /// An IPv6 /48 may hold and open this many times an address's share (0: no /48 limit).
    net48_factor: u32,
    open: OpenCounts,
    rate: Option<Rates>,
}

/// New-connection rates: per address and per /48, each a GCRA keyed limiter whose state
/// holds at most `max_keys` addresses. A table still full of recent addresses after a
/// sweep is started afresh (every address gets its burst back once), rather than let
/// anyone through unchecked while it stays full.
struct Rates {
    own: RwLock<Arc<DefaultKeyedRateLimiter<ClientKey>>>,
    shared: RwLock<Arc<DefaultKeyedRateLimiter<ClientKey>>>,
    own_quota: Quota,
    shared_quota: Quota,
    max_keys: usize,
}

impl Rates {
    fn check(
        table: &RwLock<Arc<DefaultKeyedRateLimiter<ClientKey>>>,
        quota: Quota,
        max_keys: usize,
        key: &ClientKey,
    ) -> bool {
        let limiter = table.read().expect("not poisoned").clone();
        if limiter.len() >= max_keys {
            limiter.retain_recent();
            if limiter.len() >= max_keys {
                *table.write().expect("not poisoned") = Arc::new(RateLimiter::keyed(quota));
                // Once a minute at most: under such a flood a line per reset would be a flood too.
                static LOGGED: std::sync::Mutex<Option<std::time::Instant>> =
                    std::sync::Mutex::new(None);
                let mut logged = LOGGED.lock().expect("not poisoned");
                if logged.is_none_or(|at| at.elapsed() > std::time::Duration::from_secs(60)) {
                    *logged = Some(std::time::Instant::now());
                    tracing::warn!(
                        max_keys,
                        "connection-rate table full of recent addresses (RATE_LIMIT_MAX_KEYS): started afresh"
                    );
                }
                return Self::check(table, quota, max_keys, key);
            }
        }
        limiter.check_key(key).is_ok()
    }

    fn admit(&self, key: &ClientKey, net48: Option<&ClientKey>) -> bool {
        Self::check(&self.own, self.own_quota, self.max_keys, key)
            && net48.is_none_or(|net48| {
                Self::check(&self.shared, self.shared_quota, self.max_keys, net48)
            })
    }

    fn sweep(&self) {
        for table in [&self.own, &self.shared] {
            let limiter = table.read().expect("not poisoned").clone();
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// Connections open per address (and per /48).
type OpenCounts = Arc<Mutex<HashMap<ClientKey, u32>>>;

/// Holds one address's slots (its own, its /48's) while its connection lives.
pub struct Ticket {
    slots: Vec<ClientKey>,
    open: Option<OpenCounts>,
}

impl Ticket {
    fn free() -> Self {
        Self {
            slots: Vec::new(),
            open: None,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(open) = &self.open else {
            return;
        };
        let mut open = open.lock().expect("not poisoned");
        for key in &self.slots {
            if let Some(count) = open.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    open.remove(key);
                }
            }
        }
    }
}

impl Gate {
    /// A gate with at most `per_address` connections open and `rate_per_second` new ones
    /// per second (bursts of as many) per address, and `net48_factor` times both per
    /// IPv6 /48; 0 turns each off. The rate state holds at most `max_rate_keys`
    /// addresses per table.
    pub fn new(
        trusted: Vec<IpNet>,
        per_address: u32,
        rate_per_second: u32,
        net48_factor: u32,
        max_rate_keys: usize,
    ) -> Self {
        let shared = NonZeroU32::new(rate_per_second.saturating_mul(net48_factor.max(1)));
        Self {
            trusted,
            per_address,
            net48_factor,
            open: Arc::default(),
            rate: NonZeroU32::new(rate_per_second)
                .zip(shared)
                .map(|(own, shared)| {
                    let (own_quota, shared_quota) =
                        (Quota::per_second(own), Quota::per_second(shared));
                    Rates {
                        own: RwLock::new(Arc::new(RateLimiter::keyed(own_quota))),
                        shared: RwLock::new(Arc::new(RateLimiter::keyed(shared_quota))),
                        own_quota,
                        shared_quota,
                        max_keys: max_rate_keys.max(1),
                    }
                }),
        }
    }

    /// Admits a connection from `peer`, or says why not.
    pub fn admit(&self, peer: IpAddr) -> Result<Ticket, Refusal> {
        let peer = client::canonical(peer);
        if client::is_trusted(peer, &self.trusted) {
            return Ok(Ticket::free());
        }
        let key = ClientKey::of(peer);
        let net48 = (self.net48_factor > 0).then(|| key.net48()).flatten();
        if let Some(rate) = &self.rate {
            if !rate.admit(&key, net48.as_ref()) {
                return Err(Refusal::Rate);
            }
        }
        if self.per_address == 0 {
            return Ok(Ticket::free());
        }
        let caps = std::iter::once((key, self.per_address))
            .chain(net48.map(|net48| (net48, self.per_address.saturating_mul(self.net48_factor))));
        let mut open = self.open.lock().expect("not poisoned");
        let mut slots = Vec::with_capacity(2);
        for (key, cap) in caps {
            if open.get(&key).copied().unwrap_or(0) >= cap {
                drop(open);
                // Give back what this connection took so far.
                drop(Ticket {
                    slots,
                    open: Some(self.open.clone()),
                });
                return Err(Refusal::PerAddress);
            }
            *open.entry(key.clone()).or_insert(0) += 1;
            slots.push(key);
        }
        Ok(Ticket {
            slots,
            open: Some(self.open.clone()),
        })
    }

    /// Forgets the rate state of addresses at rest; call periodically.
    pub fn sweep(&self) {
        if let Some(rate) = &self.rate {
            rate.sweep();
        }
    }

    /// Addresses (and /48s) holding connections now (for tests).
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
        let gate = Gate::new(vec![], 2, 0, 8, 1000);
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
        let gate = Gate::new(vec![], 1, 0, 8, 1000);
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
        let gate = Gate::new(vec![], 0, 5, 8, 1000);
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
        let gate = Gate::new(vec!["10.0.0.0/8".parse().unwrap()], 1, 1, 8, 1000);
        let held: Vec<_> = (0..50)
            .map(|_| gate.admit(ip("10.1.2.3")).unwrap())
            .collect();
        assert_eq!(held.len(), 50);
        assert_eq!(gate.addresses_open(), 0, "nothing tracked for a proxy");
    }

    #[test]
    fn rate_state_is_bounded_and_never_switches_off() {
        let gate = Gate::new(vec![], 0, 5, 8, 64);
        let burst = |gate: &Gate| {
            (0..20)
                .filter(|_| gate.admit(ip("192.0.2.1")).is_ok())
                .count()
        };
        assert!(burst(&gate) <= 6, "a burst of 5");
        for i in 0..10_000u32 {
            let _ = gate.admit(IpAddr::from((0x0a00_0000 + i).to_be_bytes()));
            let table = gate.rate.as_ref().unwrap().own.read().unwrap().clone();
            assert!(table.len() <= 64, "bounded at {i}");
        }
        // A table full of recent addresses started afresh gives the abuser one burst
        // back at most, never unchecked connections.
        assert!(burst(&gate) <= 6, "still limited after the table filled");
    }

    #[test]
    fn an_ipv6_48_shares_factor_times_the_caps() {
        let gate = Gate::new(vec![], 2, 0, 2, 1000);
        let held: Vec<_> = (0..9u32)
            .flat_map(|i| (0..3).map(move |_| i))
            .filter_map(|i| gate.admit(ip(&format!("2001:db8:48:{i:x}::1"))).ok())
            .collect();
        assert_eq!(held.len(), 4, "2 × 2 for the whole /48, whichever /64s");
        assert!(gate.admit(ip("2001:db8:49::1")).is_ok(), "another /48");
        drop(held);
        assert!(
            gate.admit(ip("2001:db8:48:7::1")).is_ok(),
            "freed when they close"
        );
        let rate = Gate::new(vec![], 0, 2, 3, 1000);
        let opened = (0..50u32)
            .filter(|i| rate.admit(ip(&format!("2001:db8:50:{i:x}::1"))).is_ok())
            .count();
        assert!(
            (6..=7).contains(&opened),
            "a /48's new connections: 3 × 2 per second: {opened}"
        );
    }
}
