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
    /// The shared budget of an IPv6 /48, if any (`RATE_LIMIT_IPV6_48_FACTOR`).
    net48: Option<Policy>,
    shards: Box<[Mutex<HashMap<ClientKey, Counts>>]>,
    shard_capacity: usize,
    /// Keyed hashing picks the shard, so an attacker cannot aim every key at one.
    hasher: RandomState,
}

type Shard = HashMap<ClientKey, Counts>;

impl LocalLimiter {
    /// A limiter holding at most `max_keys` entries (rounded to a multiple of the shard
    /// count); IPv6 clients also count against their /48 under `net48` when given.
    pub fn new(policy: Policy, net48: Option<Policy>, max_keys: usize) -> Self {
        Self {
            policy,
            net48,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            shard_capacity: max_keys.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    /// The most entries held at once.
    pub fn capacity(&self) -> usize {
        self.shard_capacity * SHARDS
    }

    fn shard_index(&self, key: &ClientKey) -> usize {
        self.hasher.hash_one(key) as usize % SHARDS
    }

    fn policy_of(&self, key: &ClientKey) -> &Policy {
        match (key, &self.net48) {
            (ClientKey::V6Net48(_), Some(net48)) => net48,
            _ => &self.policy,
        }
    }

    /// Checks (and, if allowed, counts) one request of `key` at `now` (ms since the epoch):
    /// against the client's own windows and, for an IPv6 client, its /48's. Both must
    /// allow it, and only then is it counted in both; a rejection counts in neither.
    pub fn check(&self, key: &ClientKey, now: u64) -> Decision {
        let lock = |i: usize| self.shards[i].lock().expect("not poisoned");
        let Some(net48) = self.net48.as_ref().and(key.net48()) else {
            let mut shard = lock(self.shard_index(key));
            let mut counts = shard.get(key).copied().unwrap_or_default();
            let decision = window::check(&mut counts, now, &self.policy);
            if decision.is_allowed() {
                self.store(&mut shard, key, counts, now);
            }
            return decision;
        };
        let (i, j) = (self.shard_index(key), self.shard_index(&net48));
        // Lower shard first, so two checks never wait on each other.
        match i.cmp(&j) {
            std::cmp::Ordering::Equal => self.check_pair(&mut lock(i), None, key, &net48, now),
            std::cmp::Ordering::Less => {
                let mut own = lock(i);
                self.check_pair(&mut own, Some(&mut lock(j)), key, &net48, now)
            }
            std::cmp::Ordering::Greater => {
                let mut shared = lock(j);
                self.check_pair(&mut lock(i), Some(&mut shared), key, &net48, now)
            }
        }
    }

    /// The two-key check: `own` holds `key`; `shared` holds `net48` (or `own` does).
    fn check_pair(
        &self,
        own: &mut Shard,
        shared: Option<&mut Shard>,
        key: &ClientKey,
        net48: &ClientKey,
        now: u64,
    ) -> Decision {
        let mut mine = own.get(key).copied().unwrap_or_default();
        let mut ours = shared
            .as_deref()
            .unwrap_or(own)
            .get(net48)
            .copied()
            .unwrap_or_default();
        let policy = &self.policy;
        let aggregate = self.policy_of(net48);
        let (my_views, our_views) = (
            window::views(&mine, now, policy),
            window::views(&ours, now, aggregate),
        );
        let decision = window::decide(&my_views[..policy.windows().len()], policy)
            .and(window::decide(&our_views[..aggregate.windows().len()], aggregate).as_shared());
        if decision.is_allowed() {
            window::commit(&mut mine, &my_views, now, policy);
            window::commit(&mut ours, &our_views, now, aggregate);
            self.store(own, key, mine, now);
            self.store(shared.unwrap_or(own), net48, ours, now);
        }
        decision
    }

    /// Saves counts, making room first if `key` is new and its shard is full.
    fn store(&self, shard: &mut Shard, key: &ClientKey, counts: Counts, now: u64) {
        if let Some(slot) = shard.get_mut(key) {
            *slot = counts;
            return;
        }
        if shard.len() >= self.shard_capacity {
            self.make_room(shard, now);
        }
        shard.insert(key.clone(), counts);
    }

    fn make_room(&self, shard: &mut Shard, now: u64) {
        shard.retain(|key, c| window::expires_at(c, self.policy_of(key)) > now);
        if shard.len() < self.shard_capacity {
            return;
        }
        let mut by_usage: Vec<(u64, ClientKey)> = shard
            .iter()
            .map(|(key, c)| (window::usage(c, now, self.policy_of(key)), key.clone()))
            .collect();
        let quarter = by_usage.len() / 4;
        by_usage.select_nth_unstable(quarter);
        for (_, key) in &by_usage[..=quarter] {
            shard.remove(key);
        }
    }

    /// Drops entries that no longer matter and returns how many remain.
    pub fn sweep(&self, now: u64) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.lock().expect("not poisoned");
                shard.retain(|key, c| window::expires_at(c, self.policy_of(key)) > now);
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
        let limiter = LocalLimiter::new(Policy::parse("2/minute").unwrap(), None, 1000);
        let now = 100 * DAY;
        assert!(allowed(&limiter.check(&key(1), now)));
        assert!(allowed(&limiter.check(&key(1), now)));
        assert!(!allowed(&limiter.check(&key(1), now)), "third of key 1");
        assert!(allowed(&limiter.check(&key(2), now)), "key 2 is untouched");
    }

    #[test]
    fn a_million_clients_stay_within_the_bound() {
        let cap = 10_000;
        let limiter = LocalLimiter::new(
            Policy::parse("30/minute,50/hour,200/day").unwrap(),
            None,
            cap,
        );
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
        let limiter = LocalLimiter::new(Policy::parse("1/minute").unwrap(), None, 1000);
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
