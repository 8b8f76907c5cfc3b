//! The cluster-wide limiter: the sliding-window check as one atomic Redis script.
//!
//! One key per client (`ratelimit:v1:{client}`), a hash with one field per window holding
//! `index:prev:cur`. The script reads every window, allows only if all allow, counts the
//! request only then, and sets the key to expire when its counts stop mattering. Time is
//! Redis's own `TIME`, so replicas with skewed clocks agree.

use super::{
    client::ClientKey,
    policy::Policy,
    window::{self, Decision, View},
};
use crate::redis_client::{RedisClient, RedisUnavailable};

const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #ARGV / 2
local fields = {}
for i = 1, n do fields[i] = tostring(i) end
local stored = redis.call('HMGET', KEYS[1], unpack(fields))
local views = {}
local allowed = 1
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local index = math.floor(now / period)
  local prev, cur = 0, 0
  if stored[i] then
    local si, sp, sc = string.match(stored[i], '^(%d+):(%d+):(%d+)$')
    si, sp, sc = tonumber(si), tonumber(sp), tonumber(sc)
    if si == index then prev, cur = sp, sc
    elseif si == index - 1 then prev, cur = sc, 0 end
  end
  local elapsed = now - index * period
  if prev * (period - elapsed) + (cur + 1) * period > limit * period then allowed = 0 end
  views[i] = { index, prev, cur, elapsed }
end
local out = { allowed }
local ttl = 1
for i = 1, n do
  local v = views[i]
  if allowed == 1 then
    local period = tonumber(ARGV[2 * i])
    redis.call('HSET', KEYS[1], fields[i], string.format('%.0f:%.0f:%.0f', v[1], v[2], v[3] + 1))
    ttl = math.max(ttl, (v[1] + 2) * period - now)
  end
  out[#out + 1] = v[2]
  out[#out + 1] = v[3]
  out[#out + 1] = v[4]
end
if allowed == 1 then redis.call('PEXPIRE', KEYS[1], ttl) end
return out
"#;

/// The script and the arguments that encode the policy.
pub struct RedisWindows {
    script: redis::Script,
    args: Vec<u64>,
}

impl RedisWindows {
    /// The script for `policy`.
    pub fn new(policy: &Policy) -> Self {
        Self {
            script: redis::Script::new(SCRIPT),
            args: policy
                .windows()
                .iter()
                .flat_map(|w| [u64::from(w.limit), w.period()])
                .collect(),
        }
    }

    /// Checks and counts one request of `client` in Redis.
    pub async fn check(
        &self,
        redis: &RedisClient,
        client: &ClientKey,
        policy: &Policy,
    ) -> Result<Decision, RedisUnavailable> {
        let mut invocation = self.script.key(format!("ratelimit:v1:{client}"));
        for arg in &self.args {
            invocation.arg(*arg);
        }
        let reply: Vec<u64> = redis.invoke(&invocation).await?;
        let views: Vec<View> = reply[1..]
            .chunks_exact(3)
            .map(|c| View {
                prev: c[0],
                cur: c[1],
                elapsed: c[2],
            })
            .collect();
        if views.len() != policy.windows().len() {
            return Err(RedisUnavailable::Failed(redis::RedisError::from((
                redis::ErrorKind::Client,
                "rate-limit script returned an unexpected reply",
            ))));
        }
        let decision = window::decide(&views, policy);
        debug_assert_eq!(reply[0] == 1, matches!(decision, Decision::Allowed { .. }));
        Ok(decision)
    }
}
