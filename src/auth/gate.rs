//! What keeps authentication cheap for clients over their limits: the tokens already
//! verified, and the addresses just refused with 429.
//!
//! Both are bounded (however many tokens or addresses appear) and every entry carries
//! the instant it stops vouching for anything; an expired entry is never acted on.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use quick_cache::{sync::Cache, Weighter};

use crate::ratelimit::{ClientKey, Window};

/// Memory for verified tokens, in bytes (tokens and subjects, plus overhead).
const VERIFIED_BYTES: u64 = 8 << 20;
/// Tokens longer than this are verified every time rather than remembered.
const MAX_REMEMBERED_TOKEN: usize = 8 * 1024;
/// A verification is trusted this long at most, even if the token lives longer.
pub const VERIFIED_TTL: Duration = Duration::from_secs(60);
/// Addresses remembered as over their limit.
const THROTTLED_ADDRESSES: usize = 65_536;
/// Rough per-entry overhead of the verified-token cache, in bytes.
const ENTRY_OVERHEAD: u64 = 96;

#[derive(Clone)]
struct Verified {
    subject: Arc<str>,
    /// The key set that verified it: a token is not trusted under another one.
    generation: u64,
    until: Instant,
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<Box<str>, Verified> for ByBytes {
    fn weight(&self, token: &Box<str>, verified: &Verified) -> u64 {
        token.len() as u64 + verified.subject.len() as u64 + ENTRY_OVERHEAD
    }
}

/// Tokens whose signature and claims were checked, keyed by the whole token: equal
/// keys are equal tokens, so no collision can lend one token another's subject.
pub(super) struct VerifiedTokens {
    cache: Cache<Box<str>, Verified, ByBytes>,
}

impl VerifiedTokens {
    pub fn new() -> Self {
        Self {
            cache: Cache::with_weighter((VERIFIED_BYTES / 1024) as usize, VERIFIED_BYTES, ByBytes),
        }
    }

    /// The subject `token` was verified for under key set `generation`, if still valid.
    pub fn get(&self, token: &str, generation: u64, now: Instant) -> Option<Arc<str>> {
        let verified = self.cache.get(token)?;
        if verified.generation == generation && now < verified.until {
            return Some(verified.subject);
        }
        self.cache.remove(token);
        None
    }

    /// Remembers a verification until `expires` (the token's `exp`), and at most
    /// [`VERIFIED_TTL`].
    pub fn insert(
        &self,
        token: &str,
        subject: Arc<str>,
        generation: u64,
        now: Instant,
        expires: Instant,
    ) {
        let until = expires.min(now + VERIFIED_TTL);
        if until <= now || token.len() > MAX_REMEMBERED_TOKEN {
            return;
        }
        self.cache.insert(
            token.into(),
            Verified {
                subject,
                generation,
                until,
            },
        );
    }
}

#[derive(Clone, Copy)]
struct Throttled {
    window: Window,
    until: Instant,
}

/// Addresses the limiter refused a moment ago, with the window that refused them and
/// until when: while that holds, the limiter would refuse them again (a refused request
/// is not counted, so nothing changes until then but other requests adding to it).
pub(super) struct ThrottledAddresses {
    cache: Cache<ClientKey, Throttled>,
}

impl ThrottledAddresses {
    pub fn new() -> Self {
        Self {
            cache: Cache::new(THROTTLED_ADDRESSES),
        }
    }

    /// The window refusing `address` and the time left, if it is still refused.
    pub fn get(&self, address: &ClientKey, now: Instant) -> Option<(Window, Duration)> {
        let throttled = self.cache.get(address)?;
        if now < throttled.until {
            return Some((throttled.window, throttled.until - now));
        }
        self.cache.remove(address);
        None
    }

    pub fn insert(&self, address: &ClientKey, window: Window, until: Instant) {
        self.cache
            .insert(address.clone(), Throttled { window, until });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::Unit;

    #[test]
    fn a_verification_never_outlives_the_token_its_key_set_or_the_ttl() {
        let tokens = VerifiedTokens::new();
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        tokens.insert("a.b.c", "alice".into(), 7, t0, t0 + 10 * sec);
        assert_eq!(
            tokens.get("a.b.c", 7, t0 + 9 * sec).as_deref(),
            Some("alice")
        );
        assert_eq!(tokens.get("a.b.c", 8, t0 + sec), None, "another key set");
        tokens.insert("a.b.c", "alice".into(), 7, t0, t0 + 10 * sec);
        assert_eq!(tokens.get("a.b.c", 7, t0 + 10 * sec), None, "past exp");
        tokens.insert("long.lived.token", "bob".into(), 7, t0, t0 + 3600 * sec);
        assert!(tokens.get("long.lived.token", 7, t0 + 59 * sec).is_some());
        assert_eq!(
            tokens.get("long.lived.token", 7, t0 + VERIFIED_TTL),
            None,
            "past the TTL"
        );
        assert_eq!(tokens.get("a.b.", 7, t0), None, "a prefix is another token");
        tokens.insert("expired", "carol".into(), 7, t0, t0);
        assert_eq!(tokens.get("expired", 7, t0), None, "never remembered");
        let huge = "x".repeat(MAX_REMEMBERED_TOKEN + 1);
        tokens.insert(&huge, "dave".into(), 7, t0, t0 + sec);
        assert_eq!(tokens.get(&huge, 7, t0), None, "too long to remember");
    }

    #[test]
    fn memory_is_bounded_however_many_tokens_appear() {
        let tokens = VerifiedTokens::new();
        let t0 = Instant::now();
        let token = |i: usize| format!("{i:0>1000}");
        for i in 0..50_000 {
            tokens.insert(&token(i), "s".into(), 1, t0, t0 + VERIFIED_TTL);
        }
        assert!(
            tokens.cache.weight() <= VERIFIED_BYTES,
            "{}",
            tokens.cache.weight()
        );
        assert!(tokens.cache.len() < 50_000);
    }

    #[test]
    fn an_address_is_throttled_only_until_its_retry_after() {
        let throttled = ThrottledAddresses::new();
        let t0 = Instant::now();
        let address = ClientKey::of([192, 0, 2, 1].into());
        let window = Window {
            limit: 30,
            unit: Unit::Minute,
        };
        throttled.insert(&address, window, t0 + Duration::from_secs(20));
        assert_eq!(
            throttled.get(&address, t0 + Duration::from_secs(5)),
            Some((window, Duration::from_secs(15)))
        );
        assert_eq!(
            throttled.get(&ClientKey::of([192, 0, 2, 2].into()), t0),
            None,
            "another address"
        );
        assert_eq!(throttled.get(&address, t0 + Duration::from_secs(20)), None);
        for i in 0..200_000u32 {
            throttled.insert(
                &ClientKey::of(std::net::Ipv4Addr::from(i).into()),
                window,
                t0 + Duration::from_secs(60),
            );
        }
        assert!(throttled.cache.len() <= THROTTLED_ADDRESSES + THROTTLED_ADDRESSES / 8);
    }
}
