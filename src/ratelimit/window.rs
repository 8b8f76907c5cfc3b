//! The sliding-window counter over several windows at once.
//!
//! Each window (minute, hour, day…) keeps, per client, the count of the current
//! epoch-aligned fixed window and of the one before. A request at `now` is counted as
//! `prev · (period − elapsed) / period + cur`: the previous window weighted by how much of
//! it still overlaps the sliding window ending now. A request is allowed only if every
//! window allows it, and only then is it counted, so a rejected request uses up nothing.
//! The Redis script in `redis.rs` is this same integer arithmetic in Lua (milliseconds
//! keep every product below 2^53, exact in Lua's doubles).

use super::policy::{Policy, Window, MAX_WINDOWS};

/// One client's counts in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// Which fixed window `cur` belongs to: `now / period`.
    pub index: u32,
    pub prev: u32,
    pub cur: u32,
}

/// A window's counts as seen at one instant, after rolling over to the current window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub prev: u64,
    /// Requests already counted in the current fixed window (not this one).
    pub cur: u64,
    /// Milliseconds since the current fixed window began.
    pub elapsed: u64,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        /// Requests left in the tightest window after this one.
        remaining: u64,
        /// That window's limit.
        limit: u32,
        /// Milliseconds until `remaining` next grows (if no request arrives meanwhile):
        /// with a sliding window that is when enough old requests have slid out, not the
        /// end of the fixed window, at which almost nothing is freed.
        reset: u64,
    },
    Rejected {
        /// The window that rejected (the one with the longest wait if several did).
        window: Window,
        /// Milliseconds until a request would be allowed.
        retry_after: u64,
        /// Whether the budget an IPv6 /48 shares did (not the client's own).
        shared: bool,
    },
}

impl Decision {
    /// This decision, as made on the budget a /48 shares.
    pub fn as_shared(self) -> Self {
        match self {
            Self::Rejected {
                window,
                retry_after,
                ..
            } => Self::Rejected {
                window,
                retry_after,
                shared: true,
            },
            allowed => allowed,
        }
    }

    /// Whether the request may go ahead.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allowed { .. })
    }

    /// The decision for a request that must pass both checks: a rejection wins (the
    /// longer wait if both reject), otherwise the one with fewer requests left.
    pub fn and(self, other: Decision) -> Decision {
        match (&self, &other) {
            (
                Self::Rejected {
                    retry_after: mine, ..
                },
                Self::Rejected {
                    retry_after: theirs,
                    ..
                },
            ) => {
                if theirs > mine {
                    other
                } else {
                    self
                }
            }
            (Self::Rejected { .. }, _) => self,
            (_, Self::Rejected { .. }) => other,
            (
                Self::Allowed {
                    remaining: mine, ..
                },
                Self::Allowed {
                    remaining: theirs, ..
                },
            ) => {
                if theirs < mine {
                    other
                } else {
                    self
                }
            }
        }
    }
}

impl Count {
    /// The view at `now`: the counts rolled over to the fixed window `now` falls in.
    pub fn view(&self, now: u64, w: &Window) -> View {
        let period = w.period();
        let index = now / period;
        let (prev, cur) = match index.checked_sub(u64::from(self.index)) {
            // A clock stepped backwards keeps the counts rather than wiping them.
            Some(0) | None => (self.prev, self.cur),
            Some(1) => (self.cur, 0),
            _ => (0, 0),
        };
        View {
            prev: u64::from(prev),
            cur: u64::from(cur),
            elapsed: now - index * period,
        }
    }
}

/// Whether one more request fits: `prev·(T−e) + (cur+1)·T ≤ L·T`.
pub fn allows(v: &View, w: &Window) -> bool {
    wait_for_room(v, w, 1) == 0
}

/// Milliseconds from the view's instant until `need` more requests fit (`need` ≤ the
/// limit), if none arrive meanwhile; 0 when they fit now.
fn wait_for_room(v: &View, w: &Window, need: u64) -> u64 {
    let (t, limit) = (w.period(), u64::from(w.limit));
    // Earliest elapsed time e with prev·(T−e) ≤ room·T, i.e. e ≥ T − ⌊room·T/prev⌋.
    let earliest = |prev: u64, room: u64| {
        (room * t)
            .checked_div(prev)
            .map_or(0, |fits| t.saturating_sub(fits))
    };
    if v.cur + need <= limit {
        // Fits in this window, once enough of the previous one has slid out.
        earliest(v.prev, limit - v.cur - need).saturating_sub(v.elapsed)
    } else {
        // Not before the next window, where this one's count becomes `prev`.
        (t - v.elapsed) + earliest(v.cur, limit.saturating_sub(need))
    }
}

/// Requests that fit in window `w` after the one being decided.
fn remaining(v: &View, w: &Window) -> u64 {
    let t = w.period();
    let used = v.prev * (t - v.elapsed) + (v.cur + 1) * t;
    (u64::from(w.limit) * t - used) / t
}

/// Decides from every window's view (in the policy's order).
pub fn decide(views: &[View], policy: &Policy) -> Decision {
    let windows = policy.windows();
    let rejection = windows
        .iter()
        .zip(views)
        .map(|(w, v)| (*w, wait_for_room(v, w, 1)))
        .filter(|&(_, wait)| wait > 0)
        .max_by_key(|&(_, wait)| wait);
    if let Some((window, retry_after)) = rejection {
        return Decision::Rejected {
            window,
            retry_after,
            shared: false,
        };
    }
    let (w, v) = windows
        .iter()
        .zip(views)
        .min_by_key(|(w, v)| remaining(v, w))
        .expect("a policy has at least one window");
    let left = remaining(v, w);
    // Once this request is counted, one more than `left` fits when every window has
    // room for it (windows tied at `left` all have to free one).
    let reset = windows
        .iter()
        .zip(views)
        .map(|(w, v)| {
            let after = View {
                cur: v.cur + 1,
                ..*v
            };
            wait_for_room(&after, w, (left + 1).min(u64::from(w.limit)))
        })
        .max()
        .unwrap_or(0);
    Decision::Allowed {
        remaining: left,
        limit: w.limit,
        reset: reset.max(1),
    }
}

/// Every window's view of `counts` at `now`.
pub fn views(counts: &[Count; MAX_WINDOWS], now: u64, policy: &Policy) -> [View; MAX_WINDOWS] {
    let mut views = [View {
        prev: 0,
        cur: 0,
        elapsed: 0,
    }; MAX_WINDOWS];
    for (i, w) in policy.windows().iter().enumerate() {
        views[i] = counts[i].view(now, w);
    }
    views
}

/// Counts one allowed request into `counts`, from the views it was decided on.
pub fn commit(counts: &mut [Count; MAX_WINDOWS], views: &[View], now: u64, policy: &Policy) {
    for (i, w) in policy.windows().iter().enumerate() {
        let v = views[i];
        counts[i] = Count {
            index: (now / w.period()) as u32,
            prev: v.prev as u32,
            cur: (v.cur + 1) as u32,
        };
    }
}

/// Checks one request at `now` against `counts` and counts it if it is allowed.
pub fn check(counts: &mut [Count; MAX_WINDOWS], now: u64, policy: &Policy) -> Decision {
    let views = views(counts, now, policy);
    let decision = decide(&views[..policy.windows().len()], policy);
    if decision.is_allowed() {
        commit(counts, &views, now, policy);
    }
    decision
}

/// The instant (ms) after which `counts` carry no information: every window has rolled
/// past both its counts, so the entry can be dropped without changing any decision.
pub fn expires_at(counts: &[Count], policy: &Policy) -> u64 {
    policy
        .windows()
        .iter()
        .zip(counts)
        .map(|(w, c)| (u64::from(c.index) + 2) * w.period())
        .max()
        .unwrap_or(0)
}

/// How close `counts` are to their tightest limit at `now`, in millionths of it: what a
/// client would gain if its entry were forgotten. In u128: a day's count of a large
/// limit times the day in milliseconds times a million overflows u64.
pub fn usage(counts: &[Count], now: u64, policy: &Policy) -> u64 {
    policy
        .windows()
        .iter()
        .zip(counts)
        .map(|(w, c)| {
            let (v, t) = (c.view(now, w), u128::from(w.period()));
            let used = u128::from(v.prev) * (t - u128::from(v.elapsed)) + u128::from(v.cur) * t;
            (used * 1_000_000 / (u128::from(w.limit) * t)) as u64
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::policy::Unit;

    const S: u64 = 1_000;
    const HOUR: u64 = 3600 * S;
    const DAY: u64 = 24 * HOUR;

    fn policy() -> Policy {
        Policy::parse("30/minute,50/hour,200/day").unwrap()
    }

    fn allowed(d: &Decision) -> bool {
        matches!(d, Decision::Allowed { .. })
    }

    #[test]
    fn the_30th_passes_and_the_31st_is_told_the_real_wait() {
        let policy = policy();
        let mut counts = [Count::default(); MAX_WINDOWS];
        // 10 s into a minute (and into a day, so only the minute binds).
        let now = 100 * DAY + 10 * S;
        for i in 1..=30 {
            match check(&mut counts, now, &policy) {
                Decision::Allowed {
                    remaining, limit, ..
                } => {
                    assert_eq!((remaining, limit), (30 - i, 30), "request {i}")
                }
                other => panic!("request {i} rejected: {other:?}"),
            }
        }
        let Decision::Rejected {
            window,
            retry_after,
            ..
        } = check(&mut counts, now, &policy)
        else {
            panic!("31st allowed")
        };
        assert_eq!(window.unit, Unit::Minute);
        // 50 s to the next minute, then 30·(60−e)/60 ≤ 29 needs e ≥ 2 s.
        assert_eq!(retry_after, 52 * S, "the real wait");
        assert!(
            !allowed(&check(&mut counts, now + retry_after - 1, &policy)),
            "1 ms early"
        );
        assert!(
            allowed(&check(&mut counts, now + retry_after, &policy)),
            "on time"
        );
    }

    #[test]
    fn the_hour_stops_the_51st_even_when_the_minute_allows_it() {
        let policy = policy();
        let mut counts = [Count::default(); MAX_WINDOWS];
        // One request every 3 s from the top of an hour: the minute never binds.
        let start = 100 * DAY;
        for i in 1..=50 {
            let d = check(&mut counts, start + i * 3 * S, &policy);
            assert!(allowed(&d), "request {i}: {d:?}");
        }
        match check(&mut counts, start + 51 * 3 * S, &policy) {
            Decision::Rejected {
                window,
                retry_after,
                ..
            } => {
                assert_eq!(window.unit, Unit::Hour);
                assert!(
                    retry_after > 3000 * S,
                    "waits for the hour to roll: {retry_after}"
                );
            }
            other => panic!("51st within the hour: {other:?}"),
        }
    }

    #[test]
    fn rejected_requests_use_up_nothing() {
        let policy = policy();
        let mut counts = [Count::default(); MAX_WINDOWS];
        let start = 100 * DAY;
        for _ in 0..30 {
            check(&mut counts, start, &policy);
        }
        let before = counts;
        for _ in 0..1000 {
            assert!(!allowed(&check(&mut counts, start, &policy)));
        }
        assert_eq!(
            counts, before,
            "a flood of rejected requests changed the state"
        );
        // Two minutes on, the hour still has exactly its 20 left.
        let later = start + 2 * 60 * S;
        let mut n = 0;
        while allowed(&check(&mut counts, later, &policy)) {
            n += 1;
        }
        assert_eq!(n, 20, "the hour's allowance after the rejections");
    }

    #[test]
    fn the_day_allows_200_across_many_hours() {
        let policy = policy();
        let mut counts = [Count::default(); MAX_WINDOWS];
        let start = 100 * DAY;
        let mut n = 0;
        for minute in 0..24 * 60 {
            let now = start + minute * 60 * S;
            while allowed(&check(&mut counts, now, &policy)) {
                n += 1;
            }
        }
        assert_eq!(n, 200, "requests allowed in one calendar day");
    }

    #[test]
    fn the_previous_window_slides_out_gradually() {
        let policy = Policy::parse("10/minute").unwrap();
        let mut counts = [Count::default(); MAX_WINDOWS];
        let minute = 1000 * 60 * S;
        for _ in 0..10 {
            assert!(allowed(&check(&mut counts, minute + 59 * S, &policy)));
        }
        // Just after the boundary nearly all of the previous minute still counts.
        assert!(!allowed(&check(&mut counts, minute + 61 * S, &policy)));
        // Half-way, half of it does: 5 more fit.
        let mut n = 0;
        while allowed(&check(&mut counts, minute + 90 * S, &policy)) {
            n += 1;
        }
        assert_eq!(n, 5);
    }

    #[test]
    fn entries_expire_when_they_no_longer_matter() {
        let policy = policy();
        let mut counts = [Count::default(); MAX_WINDOWS];
        let now = 100 * DAY + 5 * S;
        check(&mut counts, now, &policy);
        assert_eq!(
            expires_at(&counts, &policy),
            102 * DAY,
            "two days: the day window's reach"
        );
        let fresh = [Count::default(); MAX_WINDOWS];
        let mut rolled = counts;
        // Past expiry, the old counts decide exactly like no counts.
        let later = 102 * DAY;
        assert_eq!(
            check(&mut rolled, later, &policy),
            check(&mut fresh.clone(), later, &policy)
        );
    }

    /// How many more requests `counts` would allow at `now`, asking nothing.
    fn room_at(counts: &[Count; MAX_WINDOWS], now: u64, policy: &Policy) -> u64 {
        let views = views(counts, now, policy);
        policy
            .windows()
            .iter()
            .zip(&views)
            .map(|(w, v)| {
                let t = w.period();
                let taken = v.prev * (t - v.elapsed) + v.cur * t;
                (u64::from(w.limit) * t - taken.min(u64::from(w.limit) * t)) / t
            })
            .min()
            .unwrap()
    }

    #[test]
    fn reset_is_when_remaining_next_grows() {
        use rand::Rng;
        let mut rng = rand::rng();
        for text in ["5/second", "7/second,20/minute", "3/minute,4/hour"] {
            let policy = Policy::parse(text).unwrap();
            let mut counts = [Count::default(); MAX_WINDOWS];
            let mut now = 100 * DAY;
            for step in 0..2_000 {
                now += rng.random_range(0..400);
                let before = counts;
                let Decision::Allowed {
                    remaining, reset, ..
                } = check(&mut counts, now, &policy)
                else {
                    assert_eq!(counts, before, "a rejection counted");
                    continue;
                };
                assert_eq!(
                    room_at(&counts, now, &policy),
                    remaining,
                    "{text} step {step}"
                );
                assert!(
                    room_at(&counts, now + reset, &policy) > remaining,
                    "{text} step {step}: nothing grew at the reported reset ({reset} ms)"
                );
                if reset > 1 {
                    assert_eq!(
                        room_at(&counts, now + reset - 1, &policy),
                        remaining,
                        "{text} step {step}: it grew before the reported reset ({reset} ms)"
                    );
                }
            }
        }
    }

    #[test]
    fn usage_does_not_overflow_with_large_day_limits() {
        let policy = Policy::parse("1000000/day").unwrap();
        let mut counts = [Count::default(); MAX_WINDOWS];
        let now = 100 * DAY + 1;
        for _ in 0..300_000 {
            check(&mut counts, now, &policy);
        }
        assert_eq!(
            usage(&counts, now, &policy),
            300_000,
            "30% of the day's limit, in millionths"
        );
    }
}
