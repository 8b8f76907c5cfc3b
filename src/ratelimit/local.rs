//! The in-process limiter: per-client counts in sharded maps, bounded in entries.
//!
//! Memory is bounded however many addresses appear. Entries whose counts no longer
//! matter are swept (periodically, and whenever a shard is full); if a shard is still
//! full, the quarter of its entries furthest from their limits are evicted: those
//! clients start afresh, the only way a client's allowance can grow, and by the least.
//! A client hammering the service is near its limit and is kept, so an attacker cycling
//! through addresses evicts one-off visitors, not itself.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::Mutex,
};

use super::{
    client::ClientKey,
    policy::{Policy, MAX_WINDOWS},
    window::{self, Count, Decision},
};

const SHARDS: usize = 64;

type Counts = [Count; MAX_WINDOWS];

/// Per-client counts for one replica.
pub struct LocalLimiter {
    policy: Policy,
    shards: Box<[Mutex<HashMap<ClientKey, Counts>>]>,
    shard_capacity: usize,
    /// Keyed hashing picks the shard, so an attacker cannot aim every key at one.
    hasher: RandomState,
}

impl LocalLimiter {
    /// A limiter holding at most `max_keys` clients (rounded to a multiple of the shard count).
    pub fn new(policy: Policy, max_keys: usize) -> Self {
        Self {
            policy,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            shard_capacity: max_keys.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    /// The most clients held at once.
    pub fn capacity(&self) -> usize {
        self.shard_capacity * SHARDS
    }

    fn shard(&self, key: &ClientKey) -> &Mutex<HashMap<ClientKey, Counts>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// Checks (and, if allowed, counts) one request of `key` at `now` (ms since the epoch).
    pub fn check(&self, key: &ClientKey, now: u64) -> Decision {
        let mut shard = self.shard(key).lock().expect("not poisoned");
        if !shard.contains_key(key) && shard.len() >= self.shard_capacity {
            self.make_room(&mut shard, now);
        }
        let counts = shard.entry(key.clone()).or_default();
        let decision = window::check(counts, now, &self.policy);
        if *counts == Counts::default() {
            // A rejected newcomer leaves no trace (only possible with odd policies).
            shard.remove(key);
        }
        decision
    }

    fn make_room(&self, shard: &mut HashMap<ClientKey, Counts>, now: u64) {
        let policy = &self.policy;
        shard.retain(|_, c| window::expires_at(c, policy) > now);
        if shard.len() < self.shard_capacity {
            return;
        }
        let mut by_usage: Vec<(u64, ClientKey)> = shard
            .iter()
            .map(|(key, c)| (window::usage(c, now, policy), key.clone()))
            .collect();
        let quarter = by_usage.len() / 4;
        by_usage.select_nth_unstable(quarter);
        for (_, key) in &by_usage[..=quarter] {
            shard.remove(key);
        }
    }

    /// Drops entries that no longer matter and returns how many remain.
    pub fn sweep(&self, now: u64) -> usize {
        let policy = &self.policy;
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.lock().expect("not poisoned");
                shard.retain(|_, c| window::expires_at(c, policy) > now);
                if shard.capacity() > 4 * shard.len().max(16) {
                    shard.shrink_to_fit();
                }
                shard.len()
            })
            .sum()
    }

    /// Clients currently held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("not poisoned").len())
            .sum()
    }

    /// Whether no client is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    const DAY: u64 = 86_400_000;

    fn key(i: u32) -> ClientKey {
        ClientKey::of(IpAddr::V4(Ipv4Addr::from(i)))
    }

    fn allowed(d: &Decision) -> bool {
        matches!(d, Decision::Allowed { .. })
    }

    #[test]
    fn clients_have_separate_budgets() {
        let limiter = LocalLimiter::new(Policy::parse("2/minute").unwrap(), 1000);
        let now = 100 * DAY;
        assert!(allowed(&limiter.check(&key(1), now)));
        assert!(allowed(&limiter.check(&key(1), now)));
        assert!(!allowed(&limiter.check(&key(1), now)), "third of key 1");
        assert!(allowed(&limiter.check(&key(2), now)), "key 2 is untouched");
    }

    #[test]
    fn a_million_clients_stay_within_the_bound() {
        let cap = 10_000;
        let limiter = LocalLimiter::new(Policy::parse("30/minute,50/hour,200/day").unwrap(), cap);
        let now = 100 * DAY;
        // One abusive client keeps hammering while a million others pass through once.
        for i in 0..1_000_000u32 {
            limiter.check(&key(i + 1_000_000), now + u64::from(i) / 100);
            if i % 1000 == 0 {
                limiter.check(&key(7), now + u64::from(i) / 100);
            }
            if i % 997 == 0 {
                assert!(limiter.len() <= limiter.capacity(), "over the bound at {i}");
            }
        }
        assert!(limiter.capacity() >= cap && limiter.capacity() < cap + SHARDS);
        // The abusive client's state survived the churn: it is still limited.
        assert!(
            !allowed(&limiter.check(&key(7), now + 10_000)),
            "evicted the active abuser"
        );
    }

    #[test]
    fn sweeping_forgets_only_what_no_longer_matters() {
        let limiter = LocalLimiter::new(Policy::parse("1/minute").unwrap(), 1000);
        let now = 100 * DAY;
        limiter.check(&key(1), now);
        assert_eq!(
            limiter.sweep(now + 60_000),
            1,
            "still counts as the previous minute"
        );
        assert!(!allowed(&limiter.check(&key(1), now + 1000)));
        assert_eq!(
            limiter.sweep(now + 120_000),
            0,
            "two minutes on, nothing to remember"
        );
        assert!(limiter.is_empty());
    }
}
