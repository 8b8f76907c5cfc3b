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
use std::sync::Arc;

use crate::redis_client::{RedisClient, RedisUnavailable};

/// Where the script's clock comes from: Redis's `TIME` in service, an argument in the
/// parity test that replays the same instants through the Rust code.
const NOW_FROM_TIME: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first_count = 1
"#;
const NOW_FROM_ARGUMENT: &str = r#"
local now = tonumber(ARGV[1])
local first_count = 2
"#;

/// The check itself: `window.rs`'s integer arithmetic in Lua (every product stays below
/// 2^53, exact in Lua's doubles; see `policy::MAX_SCALED_LIMIT`). The policies are part
/// of the script (`limits[k][i]`, `periods[k][i]` for a client's key k, window i), so a
/// call sends only its keys: less to encode per request here and to parse in Redis.
///
/// One call may check several clients, one after the other (a client twice in one call
/// sees its first request counted): the arguments after the clock give each client's
/// number of keys, in the order of `KEYS`; without them, every key is one client's. The
/// reply is each client's `allowed, (prev, cur, elapsed) per window per key`, in order.
const CHECK: &str = r#"
local n = #limits[1]
local fields = {}
for i = 1, n do fields[i] = tostring(i) end
local counts = {}
local total = 0
for a = first_count, #ARGV do
  counts[#counts + 1] = tonumber(ARGV[a])
  total = total + counts[#counts]
end
if #counts == 0 then
  counts[1] = #KEYS
  total = #KEYS
end
if total ~= #KEYS then return redis.error_reply('ERR key counts do not add up to the keys') end
local out = {}
local base = 0
for c = 1, #counts do
  local views = {}
  local allowed = 1
  for k = 1, counts[c] do
    local key = KEYS[base + k]
    -- A key of another type (not ours: someone wrote there) is dropped and counted afresh,
    -- rather than failing every check of this client.
    local ok, stored = pcall(redis.call, 'HMGET', key, unpack(fields))
    if not ok then
      redis.call('DEL', key)
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
  out[#out + 1] = allowed
  for k = 1, counts[c] do
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
      redis.call('HSET', KEYS[base + k], unpack(set))
      redis.call('PEXPIRE', KEYS[base + k], ttl)
    end
  end
  base = base + counts[c]
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

/// Most clients one script call checks: bounds the call's size and the time Redis spends
/// in one script (a few microseconds per client).
const MAX_BATCH: usize = 128;

/// A request waiting for the next call to Redis.
struct Waiter {
    client: ClientKey,
    reply: tokio::sync::oneshot::Sender<Result<Decision, RedisUnavailable>>,
}

/// The script for one policy (and its /48 share), run by hash.
pub struct RedisWindows {
    script: redis::Script,
    source: String,
    policy: Policy,
    net48: Option<Policy>,
    clock_argument: bool,
    /// Checks waiting for the next call; a flush task is under way whenever it is not empty.
    waiting: std::sync::Mutex<Vec<Waiter>>,
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
            waiting: std::sync::Mutex::new(Vec::new()),
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
    ///
    /// Against one node, the checks that arrive while the worker thread is busy go to
    /// Redis as one script call: a call per request cost the service more in system
    /// calls and wake-ups than the rest of the request (`docs/scaling.md`), and Redis
    /// more in command dispatch than the script. A cluster's clients mostly hash to
    /// different slots, which one call cannot span: there every check is its own call.
    pub async fn check(
        self: &Arc<Self>,
        redis: &Arc<RedisClient>,
        client: &ClientKey,
        now: u64,
    ) -> Result<Decision, RedisUnavailable> {
        if self.clock_argument || redis.is_cluster() {
            return self
                .check_all(redis, &[client], now)
                .await?
                .pop()
                .expect("one client");
        }
        if !redis.is_available() {
            return Err(RedisUnavailable::CircuitOpen);
        }
        let (reply, decision) = tokio::sync::oneshot::channel();
        let first = {
            let mut waiting = self.waiting.lock().expect("not poisoned");
            waiting.push(Waiter {
                client: client.clone(),
                reply,
            });
            waiting.len() == 1
        };
        if first {
            Self::spawn_flush(self.clone(), redis.clone(), true);
        }
        decision.await.unwrap_or_else(|_| {
            // The flush task ended without answering (the runtime is shutting down).
            Err(RedisUnavailable::Failed(redis::RedisError::from((
                redis::ErrorKind::Client,
                "rate-limit call abandoned",
            ))))
        })
    }

    /// Checks `clients` in order in one call (`now` is used only by the parity test's
    /// script); one key slot only, in a cluster.
    #[doc(hidden)]
    pub async fn check_all(
        &self,
        redis: &RedisClient,
        clients: &[&ClientKey],
        now: u64,
    ) -> Result<Vec<Result<Decision, RedisUnavailable>>, RedisUnavailable> {
        let call = self.call(clients, Some(now));
        let reply = redis.eval_sha(&call, &self.source).await?;
        Ok(self.split(&reply, clients))
    }

    /// A task that sends the waiting checks (at most [`MAX_BATCH`]; another task takes
    /// the rest) as one call and answers each.
    fn spawn_flush(this: Arc<Self>, redis: Arc<RedisClient>, first: bool) {
        tokio::spawn(async move {
            if first {
                // Lets every request already runnable on this thread join the call: the
                // yield resumes once the thread has nothing else to run.
                tokio::task::yield_now().await;
            }
            this.flush(&redis).await;
        });
    }

    async fn flush(self: &Arc<Self>, redis: &Arc<RedisClient>) {
        let batch = {
            let mut waiting = self.waiting.lock().expect("not poisoned");
            let taken = waiting.len().min(MAX_BATCH);
            let rest = waiting.split_off(taken);
            let batch = std::mem::replace(&mut *waiting, rest);
            if !waiting.is_empty() {
                Self::spawn_flush(self.clone(), redis.clone(), false);
            }
            batch
        };
        let clients: Vec<&ClientKey> = batch.iter().map(|w| &w.client).collect();
        let call = self.call(&clients, None);
        let answers = match redis.eval_sha::<redis::Value>(&call, &self.source).await {
            Ok(reply) => self.split(&reply, &clients),
            Err(e) => vec![Err(e); clients.len()],
        };
        for (waiter, answer) in batch.into_iter().zip(answers) {
            // A request that is gone (its client hung up) no longer waits: nothing to do.
            let _ = waiter.reply.send(answer);
        }
    }

    /// The keys of `client`: its own, and its /48's when that has a budget.
    fn keys_of(&self, client: &ClientKey) -> (KeyBuf, Option<KeyBuf>) {
        let net48 = self.net48.as_ref().and(client.net48());
        (KeyBuf::of(client), net48.as_ref().map(KeyBuf::of))
    }

    /// One `EVALSHA` checking `clients` in order.
    fn call(&self, clients: &[&ClientKey], now: Option<u64>) -> redis::Cmd {
        let mut call = redis::cmd("EVALSHA");
        let counts: Vec<u8> = clients
            .iter()
            .map(|c| 1 + u8::from(self.net48.is_some() && c.net48().is_some()))
            .collect();
        call.arg(self.script.get_hash())
            .arg(counts.iter().map(|&c| usize::from(c)).sum::<usize>());
        for client in clients {
            let (own, net48) = self.keys_of(client);
            call.arg(own.as_bytes());
            if let Some(net48) = &net48 {
                call.arg(net48.as_bytes());
            }
        }
        if self.clock_argument {
            call.arg(now.unwrap_or_default());
        }
        for count in counts {
            call.arg(count);
        }
        call
    }

    /// Each client's decision from the reply of [`RedisWindows::call`], or for all of
    /// them an error if the reply is not what the script returns.
    fn split(
        &self,
        reply: &redis::Value,
        clients: &[&ClientKey],
    ) -> Vec<Result<Decision, RedisUnavailable>> {
        let unexpected = || {
            RedisUnavailable::Failed(redis::RedisError::from((
                redis::ErrorKind::Client,
                "rate-limit script returned an unexpected reply",
            )))
        };
        let policies: Vec<[Option<&Policy>; 2]> = clients
            .iter()
            .map(|c| {
                let net48 = self.net48.as_ref().filter(|_| c.net48().is_some());
                [Some(&self.policy), net48]
            })
            .collect();
        let expected: usize = policies.iter().map(reply_len).sum();
        let items = match reply {
            redis::Value::Array(items) if items.len() == expected => items,
            _ => return vec![Err(unexpected()); clients.len()],
        };
        let mut rest = &items[..];
        policies
            .iter()
            .map(|p| {
                let (mine, after) = rest.split_at(reply_len(p));
                rest = after;
                decide_items(mine, p).ok_or_else(unexpected)
            })
            .collect()
    }
}

/// The length of one client's share of the reply.
fn reply_len(policies: &[Option<&Policy>; 2]) -> usize {
    1 + policies
        .iter()
        .flatten()
        .map(|p| 3 * p.windows().len())
        .sum::<usize>()
}

/// The decision a script reply for one client encodes (see [`decide_items`]).
#[cfg(test)]
fn decide(reply: &redis::Value, policies: &[Option<&Policy>; 2]) -> Option<Decision> {
    let redis::Value::Array(items) = reply else {
        return None;
    };
    decide_items(items, policies)
}

/// The decision one client's share of a reply encodes, or `None` if it is not what the
/// script returns (not integers, the wrong length, or an "allowed" flag the counts
/// contradict). `policies` are those of the keys sent (the second absent for one key).
fn decide_items(items: &[redis::Value], policies: &[Option<&Policy>; 2]) -> Option<Decision> {
    let mut numbers = items.iter().map(|v| match v {
        redis::Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    });
    let allowed = numbers.next()??;
    if items.len() != reply_len(policies) || allowed > 1 {
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
