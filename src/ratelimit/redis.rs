//! The cluster-wide limiter: the sliding-window check as one atomic Redis script.
//!
//! One hash per key, one field per window holding `index:prev:cur`. The script reads
//! every window of every key it is given (the client's own, and for an IPv6 client its
//! /48's), allows only if all allow, counts the request in all of them only then, and
//! sets each key to expire when its counts stop mattering. Time is Redis's own `TIME`, so
//! replicas with skewed clocks agree. Keys carry a `{…}` hash tag (the /48 for an IPv6
//! client) so that both keys of one check live in one Redis Cluster slot.

use super::{
    client::ClientKey,
    policy::Policy,
    window::{self, Decision, View},
};
use crate::redis_client::{RedisClient, RedisUnavailable};

/// Where the script's clock comes from: Redis's `TIME` in service, an argument in the
/// parity test that replays the same instants through the Rust code.
const NOW_FROM_TIME: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = 0
"#;
const NOW_FROM_ARGUMENT: &str = r#"
local now = tonumber(ARGV[1])
local a = 1
"#;

/// The check itself: `window.rs`'s integer arithmetic in Lua (every product stays below
/// 2^53, exact in Lua's doubles; see `policy::MAX_SCALED_LIMIT`). ARGV after the clock:
/// the window count n, then for each key n pairs (limit, period in ms).
const CHECK: &str = r#"
local n = tonumber(ARGV[a + 1])
local fields = {}
for i = 1, n do fields[i] = tostring(i) end
local views = {}
local allowed = 1
for k = 1, #KEYS do
  -- A key of another type (not ours: someone wrote there) is dropped and counted afresh,
  -- rather than failing every check of this client.
  local ok, stored = pcall(redis.call, 'HMGET', KEYS[k], unpack(fields))
  if not ok then
    redis.call('DEL', KEYS[k])
    stored = {}
  end
  views[k] = {}
  for i = 1, n do
    local base = a + 1 + 2 * ((k - 1) * n + i - 1)
    local limit = tonumber(ARGV[base + 1])
    local period = tonumber(ARGV[base + 2])
    local index = math.floor(now / period)
    local prev, cur = 0, 0
    if stored[i] then
      local si, sp, sc = string.match(stored[i], '^(%d+):(%d+):(%d+)$')
      si, sp, sc = tonumber(si), tonumber(sp), tonumber(sc)
      if si then
        -- A clock stepped backwards keeps the counts, as the Rust window does.
        if si >= index then prev, cur = sp, sc
        elseif si == index - 1 then prev, cur = sc, 0 end
      end
    end
    local elapsed = now - index * period
    if prev * (period - elapsed) + (cur + 1) * period > limit * period then allowed = 0 end
    views[k][i] = { index, prev, cur, elapsed, period }
  end
end
local out = { allowed }
for k = 1, #KEYS do
  local set = {}
  local ttl = 1
  for i = 1, n do
    local v = views[k][i]
    set[#set + 1] = fields[i]
    set[#set + 1] = string.format('%.0f:%.0f:%.0f', v[1], v[2], v[3] + 1)
    ttl = math.max(ttl, (v[1] + 2) * v[5] - now)
    out[#out + 1] = v[2]
    out[#out + 1] = v[3]
    out[#out + 1] = v[4]
  end
  if allowed == 1 then
    redis.call('HSET', KEYS[k], unpack(set))
    redis.call('PEXPIRE', KEYS[k], ttl)
  end
end
return out
"#;

/// The Redis key of a client (or /48): `ratelimit:v2:{tag}` or `ratelimit:v2:{tag}:key`.
pub fn redis_key(key: &ClientKey) -> String {
    let (tag, name) = (key.slot_tag(), key.to_string());
    if tag == name {
        format!("ratelimit:v2:{{{tag}}}")
    } else {
        format!("ratelimit:v2:{{{tag}}}:{name}")
    }
}

/// The script and the arguments that encode the policies.
pub struct RedisWindows {
    script: redis::Script,
    policy: Policy,
    net48: Option<Policy>,
    clock_argument: bool,
}

impl RedisWindows {
    /// The script for `policy`, and for IPv6 clients also their /48's `net48` policy.
    pub fn new(policy: &Policy, net48: Option<&Policy>) -> Self {
        Self {
            script: redis::Script::new(&format!("{NOW_FROM_TIME}{CHECK}")),
            policy: policy.clone(),
            net48: net48.cloned(),
            clock_argument: false,
        }
    }

    /// The same script with the clock as its first argument, for the parity test that
    /// replays one sequence of instants through Lua and through `window.rs`.
    #[doc(hidden)]
    pub fn with_clock_argument(policy: &Policy, net48: Option<&Policy>) -> Self {
        Self {
            script: redis::Script::new(&format!("{NOW_FROM_ARGUMENT}{CHECK}")),
            clock_argument: true,
            ..Self::new(policy, net48)
        }
    }

    /// Checks and counts one request of `client` in Redis (`now` is used only by the
    /// parity test's script).
    pub async fn check(
        &self,
        redis: &RedisClient,
        client: &ClientKey,
        now: u64,
    ) -> Result<Decision, RedisUnavailable> {
        let mut keys: Vec<(ClientKey, &Policy)> = vec![(client.clone(), &self.policy)];
        if let (Some(net48), Some(shared)) = (client.net48(), &self.net48) {
            keys.push((net48, shared));
        }
        let windows = self.policy.windows().len();
        let mut invocation = self.script.prepare_invoke();
        for (key, _) in &keys {
            invocation.key(redis_key(key));
        }
        if self.clock_argument {
            invocation.arg(now);
        }
        invocation.arg(windows);
        for (_, policy) in &keys {
            for w in policy.windows() {
                invocation.arg(w.limit).arg(w.period());
            }
        }
        let reply: Vec<u64> = redis.invoke(&invocation).await?;
        decide(&reply, &keys, windows).ok_or_else(|| {
            RedisUnavailable::Failed(redis::RedisError::from((
                redis::ErrorKind::Client,
                "rate-limit script returned an unexpected reply",
            )))
        })
    }
}

/// The decision a script reply encodes, or `None` if the reply is not what the script
/// returns (wrong length, or an "allowed" flag the counts contradict).
fn decide(reply: &[u64], keys: &[(ClientKey, &Policy)], windows: usize) -> Option<Decision> {
    let (&allowed, views) = reply.split_first()?;
    if views.len() != 3 * windows * keys.len() || allowed > 1 {
        return None;
    }
    let views: Vec<View> = views
        .chunks_exact(3)
        .map(|c| View {
            prev: c[0],
            cur: c[1],
            elapsed: c[2],
        })
        .collect();
    let decision = keys
        .iter()
        .zip(views.chunks_exact(windows))
        .enumerate()
        .map(|(i, ((_, policy), views))| {
            let sane = policy.windows().iter().zip(views).all(|(w, v)| {
                v.elapsed < w.period()
                    && v.prev <= u64::from(u32::MAX)
                    && v.cur <= u64::from(u32::MAX)
            });
            // Keys after the client's own are its /48's shared budget.
            sane.then(|| window::decide(views, policy))
                .map(|d| if i > 0 { d.as_shared() } else { d })
        })
        .try_fold(None, |acc: Option<Decision>, d| {
            let d = d?;
            Some(Some(match acc {
                None => d,
                Some(acc) => acc.and(d),
            }))
        })??;
    (decision.is_allowed() == (allowed == 1)).then_some(decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_check_share_a_slot_tag() {
        let v6 = ClientKey::of("2001:db8:1:2::9".parse().unwrap());
        assert_eq!(
            redis_key(&v6),
            "ratelimit:v2:{2001:db8:1::/48}:2001:db8:1:2::/64"
        );
        assert_eq!(
            redis_key(&v6.net48().unwrap()),
            "ratelimit:v2:{2001:db8:1::/48}"
        );
        let v4 = ClientKey::of("192.0.2.1".parse().unwrap());
        assert_eq!(redis_key(&v4), "ratelimit:v2:{192.0.2.1}");
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let policy = Policy::parse("2/minute,5/hour").unwrap();
        let key = ClientKey::of("192.0.2.1".parse().unwrap());
        let keys = [(key, &policy)];
        let good = [1, 0, 0, 10, 0, 0, 10];
        assert!(decide(&good, &keys, 2).is_some_and(|d| d.is_allowed()));
        let cases: &[(&[u64], &str)] = &[
            (&[], "empty"),
            (&[1], "the flag alone"),
            (&[1, 0, 0, 10], "too short"),
            (&[1, 0, 0, 10, 0, 0, 10, 0], "too long"),
            (&[7, 0, 0, 10, 0, 0, 10], "a flag that is not 0 or 1"),
            (
                &[0, 0, 0, 10, 0, 0, 10],
                "rejected, though the counts allow",
            ),
            (
                &[1, 0, 2, 10, 0, 0, 10],
                "allowed, though the minute is full",
            ),
            (&[1, 0, 0, 60_000, 0, 0, 10], "elapsed beyond the window"),
            (&[1, u64::MAX, 0, 10, 0, 0, 10], "a count beyond any limit"),
        ];
        for (reply, why) in cases {
            assert_eq!(decide(reply, &keys, 2), None, "{why}");
        }
    }
}
