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
"#;
const NOW_FROM_ARGUMENT: &str = r#"
local now = tonumber(ARGV[1])
"#;

/// The check itself: `window.rs`'s integer arithmetic in Lua (every product stays below
/// 2^53, exact in Lua's doubles; see `policy::MAX_SCALED_LIMIT`). The policies are part
/// of the script (`limits[k][i]`, `periods[k][i]` for key k, window i), so a call sends
/// only its keys: less to encode per request here and to parse in Redis.
const CHECK: &str = r#"
local n = #limits[1]
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
    local limit = limits[k][i]
    local period = periods[k][i]
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

/// `{ {a, b}, {c, d} }`: one Lua table of a field per policy.
fn lua_table(policies: &[&Policy], field: impl Fn(&super::Window) -> u64) -> String {
    let rows: Vec<String> = policies
        .iter()
        .map(|p| {
            let values: Vec<String> = p.windows().iter().map(|w| field(w).to_string()).collect();
            format!("{{ {} }}", values.join(", "))
        })
        .collect();
    format!("{{ {} }}", rows.join(", "))
}

/// A Redis key built without a heap allocation: every key but a long subject's fits.
struct KeyBuf {
    bytes: [u8; 320],
    len: usize,
}

impl std::fmt::Write for KeyBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        self.bytes
            .get_mut(self.len..end)
            .ok_or(std::fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl KeyBuf {
    fn of(key: &ClientKey) -> Self {
        use std::fmt::Write;
        let mut buf = Self {
            bytes: [0; 320],
            len: 0,
        };
        // The subjects are at most 256 bytes, so this fits; `redis_key` is the definition.
        let written = match key {
            ClientKey::V6Prefix(prefix) => write!(
                buf,
                "ratelimit:v2:{{{}}}:{key}",
                ClientKey::V6Net48(prefix >> 16)
            ),
            other => write!(buf, "ratelimit:v2:{{{other}}}"),
        };
        if written.is_err() {
            let key = redis_key(key);
            buf.len = 0;
            let _ = buf.write_str(&key[..key.len().min(320)]);
        }
        buf
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The Redis key of a client (or /48): `ratelimit:v2:{tag}` or `ratelimit:v2:{tag}:key`.
pub fn redis_key(key: &ClientKey) -> String {
    let (tag, name) = (key.slot_tag(), key.to_string());
    if tag == name {
        format!("ratelimit:v2:{{{tag}}}")
    } else {
        format!("ratelimit:v2:{{{tag}}}:{name}")
    }
}

/// The script for one policy (and its /48 share), run by hash.
pub struct RedisWindows {
    script: redis::Script,
    source: String,
    policy: Policy,
    net48: Option<Policy>,
    clock_argument: bool,
}

impl RedisWindows {
    /// The script for `policy`, and for IPv6 clients also their /48's `net48` policy.
    pub fn new(policy: &Policy, net48: Option<&Policy>) -> Self {
        Self::with_clock(NOW_FROM_TIME, false, policy, net48)
    }

    /// The same script with the clock as its first argument, for the parity test that
    /// replays one sequence of instants through Lua and through `window.rs`.
    #[doc(hidden)]
    pub fn with_clock_argument(policy: &Policy, net48: Option<&Policy>) -> Self {
        Self::with_clock(NOW_FROM_ARGUMENT, true, policy, net48)
    }

    fn with_clock(
        clock: &str,
        clock_argument: bool,
        policy: &Policy,
        net48: Option<&Policy>,
    ) -> Self {
        // The /48's policy is the second key's; without one, its row goes unused.
        let policies = [policy, net48.unwrap_or(policy)];
        let source = format!(
            "{clock}local limits = {}\nlocal periods = {}\n{CHECK}",
            lua_table(&policies, |w| u64::from(w.limit)),
            lua_table(&policies, super::Window::period),
        );
        Self {
            script: redis::Script::new(&source),
            source,
            policy: policy.clone(),
            net48: net48.cloned(),
            clock_argument,
        }
    }

    /// The script's Lua source, for measuring it outside the service (`redis-benchmark`
    /// in `scripts/bench-redis`).
    #[doc(hidden)]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Checks and counts one request of `client` in Redis (`now` is used only by the
    /// parity test's script).
    pub async fn check(
        &self,
        redis: &RedisClient,
        client: &ClientKey,
        now: u64,
    ) -> Result<Decision, RedisUnavailable> {
        let net48 = self.net48.as_ref().and(client.net48());
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.script.get_hash())
            .arg(1 + usize::from(net48.is_some()))
            .arg(KeyBuf::of(client).as_bytes());
        if let Some(net48) = &net48 {
            call.arg(KeyBuf::of(net48).as_bytes());
        }
        if self.clock_argument {
            call.arg(now);
        }
        let reply: redis::Value = redis.eval_sha(&call, &self.source).await?;
        let policies = [Some(&self.policy), net48.and(self.net48.as_ref())];
        decide(&reply, &policies).ok_or_else(|| {
            RedisUnavailable::Failed(redis::RedisError::from((
                redis::ErrorKind::Client,
                "rate-limit script returned an unexpected reply",
            )))
        })
    }
}

/// The decision a script reply encodes, or `None` if the reply is not what the script
/// returns (not an array of integers of the right length, or an "allowed" flag the counts
/// contradict). `policies` are those of the keys sent (the second absent for one key).
fn decide(reply: &redis::Value, policies: &[Option<&Policy>; 2]) -> Option<Decision> {
    let redis::Value::Array(items) = reply else {
        return None;
    };
    let mut numbers = items.iter().map(|v| match v {
        redis::Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    });
    let allowed = numbers.next()??;
    let expected: usize = policies
        .iter()
        .flatten()
        .map(|p| 3 * p.windows().len())
        .sum();
    if items.len() != 1 + expected || allowed > 1 {
        return None;
    }
    let mut decision: Option<Decision> = None;
    for (k, policy) in policies.iter().enumerate() {
        let Some(policy) = policy else { continue };
        let mut views = [View {
            prev: 0,
            cur: 0,
            elapsed: 0,
        }; super::policy::MAX_WINDOWS];
        for (w, view) in policy.windows().iter().zip(views.iter_mut()) {
            let (prev, cur, elapsed) = (numbers.next()??, numbers.next()??, numbers.next()??);
            let sane =
                elapsed < w.period() && prev <= u64::from(u32::MAX) && cur <= u64::from(u32::MAX);
            if !sane {
                return None;
            }
            *view = View { prev, cur, elapsed };
        }
        let this = window::decide(&views[..policy.windows().len()], policy);
        // The second key is the /48's shared budget.
        let this = if k > 0 { this.as_shared() } else { this };
        decision = Some(match decision {
            None => this,
            Some(d) => d.and(this),
        });
    }
    let decision = decision?;
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

    fn reply(numbers: &[i64]) -> redis::Value {
        redis::Value::Array(numbers.iter().map(|n| redis::Value::Int(*n)).collect())
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let policy = Policy::parse("2/minute,5/hour").unwrap();
        let policies = [Some(&policy), None];
        let good = reply(&[1, 0, 0, 10, 0, 0, 10]);
        assert!(decide(&good, &policies).is_some_and(|d| d.is_allowed()));
        let cases: &[(redis::Value, &str)] = &[
            (reply(&[]), "empty"),
            (reply(&[1]), "the flag alone"),
            (reply(&[1, 0, 0, 10]), "too short"),
            (reply(&[1, 0, 0, 10, 0, 0, 10, 0]), "too long"),
            (reply(&[7, 0, 0, 10, 0, 0, 10]), "a flag that is not 0 or 1"),
            (
                reply(&[0, 0, 0, 10, 0, 0, 10]),
                "rejected, though the counts allow",
            ),
            (
                reply(&[1, 0, 2, 10, 0, 0, 10]),
                "allowed, though the minute is full",
            ),
            (
                reply(&[1, 0, 0, 60_000, 0, 0, 10]),
                "elapsed beyond the window",
            ),
            (
                reply(&[1, i64::MAX, 0, 10, 0, 0, 10]),
                "a count beyond any limit",
            ),
            (reply(&[1, -1, 0, 10, 0, 0, 10]), "a negative count"),
            (redis::Value::SimpleString("OK".into()), "not an array"),
            (
                redis::Value::Array(vec![redis::Value::Int(1), redis::Value::Nil]),
                "not integers",
            ),
        ];
        for (reply, why) in cases {
            assert_eq!(decide(reply, &policies), None, "{why}");
        }
    }

    #[test]
    fn keys_built_without_allocating_match_the_definition() {
        let keys = [
            ClientKey::of("2001:db8:1:2::9".parse().unwrap()),
            ClientKey::of("2001:db8:1:2::9".parse().unwrap())
                .net48()
                .unwrap(),
            ClientKey::of("192.0.2.1".parse().unwrap()),
            ClientKey::Subject("x".repeat(256).into()),
        ];
        for key in keys {
            assert_eq!(
                KeyBuf::of(&key).as_bytes(),
                redis_key(&key).as_bytes(),
                "{key}"
            );
        }
    }
}
