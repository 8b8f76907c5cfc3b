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
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

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

/// Where the keys are: declared (`KEYS`, one Redis, or one slot of a cluster), the
/// clients' numbers of keys after the clock; without them, every key is one client's.
const KEYS_DECLARED: &str = r#"
local keys = KEYS
local local_only = false
local counts = {}
for a = first_count, #ARGV do counts[#counts + 1] = tonumber(ARGV[a]) end
if #counts == 0 then counts[1] = #KEYS end
"#;

/// For one node of a cluster, whose clients hash to many slots (a call cannot declare
/// keys of several slots): after the clock the number of clients, each one's number of
/// keys, then the keys. Redis refuses to touch a key this node does not serve (another
/// master's, or one mid-migration); such a client is answered `2` ("elsewhere") with
/// nothing counted, and is checked by a call the client library routes.
const KEYS_UNDECLARED: &str = r#"
local keys = {}
local local_only = true
local counts = {}
local clients = tonumber(ARGV[first_count])
for a = first_count + 1, first_count + clients do counts[#counts + 1] = tonumber(ARGV[a]) end
for a = first_count + 1 + clients, #ARGV do keys[#keys + 1] = ARGV[a] end
"#;

/// Lets the undeclared variant touch keys of several slots (Redis 7 and later): they
/// must still all be served by the node it runs on.
const CROSS_SLOT: &str = "#!lua flags=allow-cross-slot-keys\n";

/// The check itself: `window.rs`'s integer arithmetic in Lua (every product stays below
/// 2^53, exact in Lua's doubles; see `policy::MAX_SCALED_LIMIT`). The policies are part
/// of the script (`limits[k][i]`, `periods[k][i]` for a client's key k, window i), so a
/// call sends only its keys: less to encode per request here and to parse in Redis.
///
/// One call may check several clients, one after the other (a client twice in one call
/// sees its first request counted), each with its number of keys in `counts`. The reply
/// is each client's `allowed, (prev, cur, elapsed) per window per key`, in order, or `2`
/// alone for a client whose keys are on another node. Every key of a client is read
/// before any is written, so a client is counted whole or not at all.
const CHECK: &str = r#"
local n = #limits[1]
local fields = {}
for i = 1, n do fields[i] = tostring(i) end
local total = 0
for c = 1, #counts do total = total + counts[c] end
if total ~= #keys then return redis.error_reply('ERR key counts do not add up to the keys') end
local out = {}
local base = 0
for c = 1, #counts do
  local views = {}
  local allowed = 1
  local elsewhere = false
  for k = 1, counts[c] do
    local key = keys[base + k]
    local stored = redis.pcall('HMGET', key, unpack(fields))
    if stored.err then
      if local_only and not string.find(stored.err, 'WRONGTYPE', 1, true) then
        elsewhere = true
        break
      end
      -- A key of another type (not ours: someone wrote there) is dropped and counted
      -- afresh, rather than failing every check of this client.
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
  if elsewhere then
    out[#out + 1] = 2
  else
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
        redis.call('HSET', keys[base + k], unpack(set))
        redis.call('PEXPIRE', keys[base + k], ttl)
      end
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

/// How old a cluster's slot map may be and still be used (older, checks go one call
/// each, routed by the client library, until a new one is read: a map read before a
/// failover that happened while no check came names a dead master), and from what age
/// it is read again (early enough that a steady flow never sees it expire); how often
/// it may be read when clients turn out to be elsewhere; how long a batch's misplaced
/// clients wait for the new map before they are sent anyway.
const SLOT_MAP_MAX_AGE: Duration = Duration::from_secs(5);
const SLOT_MAP_REFRESH: Duration = Duration::from_secs(4);
const SLOT_MAP_RETRY: Duration = Duration::from_millis(100);
const SLOT_MAP_WAIT: Duration = Duration::from_millis(200);

/// Node calls in a row to addresses the client library has no connection to, after
/// which the map's addresses are taken not to be the library's (a cluster announcing
/// endpoints it does not connect by, or a master gone that the map still names) and
/// every check is a call of its own for [`UNROUTABLE_PAUSE`]; then batching is tried again.
const UNROUTABLE_LIMIT: u32 = 16;
const UNROUTABLE_PAUSE: Duration = Duration::from_secs(30);

/// Tries of a misplaced client by the slot map before its check goes through the client
/// library's own routing (which follows MOVED and ASK: a slot mid-migration).
const BY_MAP_TRIES: u8 = 3;

/// A cluster's hash slots, and the slot map's mark of a slot no master serves.
const SLOTS: usize = 16_384;
const NO_NODE: u16 = u16::MAX;

/// A request waiting for the next call to Redis.
struct Waiter {
    client: ClientKey,
    reply: tokio::sync::oneshot::Sender<Result<Decision, RedisUnavailable>>,
}

/// A client's share of a script's reply: its decision, or (undeclared keys only) that
/// its keys are on another node and nothing was counted.
type Answer = Option<Result<Decision, RedisUnavailable>>;

/// Which master of a cluster serves which slot, as `CLUSTER SLOTS` said when last read:
/// to send each master its clients in one call. The script checks that a client's keys
/// are on the node it runs on; one that is not is counted nowhere and tried again.
struct SlotMap {
    /// Each slot's master, an index into `nodes` ([`NO_NODE`] for a slot no one serves):
    /// a table, as every check of a cluster looks its slot up.
    node_of: Box<[u16]>,
    /// Each master's address as the cluster announces it (and the client library
    /// connects to it).
    nodes: Vec<(String, u16)>,
    read_at: Instant,
    /// The client's [`RedisClient::generation`] when the read began: a map read before
    /// the breaker last closed, or before the probe found the masters changed, may be
    /// the old topology.
    generation: u64,
}

impl SlotMap {
    /// The map in a `CLUSTER SLOTS` reply (`[start, end, [host, port, id…], replicas…]`
    /// per range), or `None` if it is not one.
    fn parse(reply: &redis::Value) -> Option<Self> {
        let redis::Value::Array(ranges) = reply else {
            return None;
        };
        let mut nodes: Vec<(String, u16)> = Vec::new();
        let mut node_of = vec![NO_NODE; SLOTS].into_boxed_slice();
        for range in ranges {
            let redis::Value::Array(items) = range else {
                return None;
            };
            let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                (items.first(), items.get(1))
            else {
                return None;
            };
            let Some(redis::Value::Array(master)) = items.get(2) else {
                return None;
            };
            let (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) =
                (master.first(), master.get(1))
            else {
                return None;
            };
            let host = String::from_utf8(host.clone()).ok()?;
            // Empty, unknown (`?`) or wildcard: "the node you asked", which the client
            // library resolves and a map read through it cannot; such a cluster gets a
            // call per check.
            let unspecified = host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified());
            if host.is_empty() || host == "?" || unspecified {
                return None;
            }
            let address = (host, u16::try_from(*port).ok()?);
            let node = match nodes.iter().position(|n| *n == address) {
                Some(i) => i,
                None => {
                    nodes.push(address);
                    nodes.len() - 1
                }
            };
            let node = u16::try_from(node).ok().filter(|&n| n != NO_NODE)?;
            let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
            node_of.get_mut(start..=end)?.fill(node);
        }
        Some(Self {
            node_of,
            nodes,
            read_at: Instant::now(),
            generation: 0,
        })
    }

    fn node_of(&self, key: &[u8]) -> Option<usize> {
        let node = self.node_of[slot_of(key)];
        (node != NO_NODE).then_some(usize::from(node))
    }
}

/// The cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag, the text between its
/// first `{` and the next `}` if that is not empty, or else of the whole key.
fn slot_of(key: &[u8]) -> usize {
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    usize::from(crc16::State::<crc16::XMODEM>::calculate(tag.unwrap_or(key))) % SLOTS
}

/// The script for one policy (and its /48 share), run by hash.
pub struct RedisWindows {
    /// Keys declared: one Redis, or one check in a cluster.
    script: redis::Script,
    source: String,
    /// Keys undeclared: a batch of one cluster node's clients.
    node_script: redis::Script,
    node_source: String,
    policy: Policy,
    net48: Option<Policy>,
    clock_argument: bool,
    /// Checks waiting for the next call; a flush task is under way whenever it is not empty.
    waiting: std::sync::Mutex<Vec<Waiter>>,
    /// A cluster's slot map, once one has been read.
    slots: tokio::sync::watch::Sender<Option<Arc<SlotMap>>>,
    /// When the slot map was last asked for; a read is under way while `reading`.
    slots_asked: std::sync::Mutex<Option<Instant>>,
    reading: AtomicBool,
    /// The last map read answered but named no usable addresses.
    map_unusable: AtomicBool,
    /// A client was found elsewhere than the map says: read it again.
    slots_stale: AtomicBool,
    /// The cluster refused the batch script (a Redis before 7.0, which has no script
    /// flags), or the addresses it announces are not ones the client library connects
    /// to: every check is its own call.
    per_check_only: AtomicBool,
    /// Node calls to addresses the client library has no connection to.
    unroutable: Unroutable,
}

/// Node calls in a row addressed to a node the client library had no connection to, and
/// the pause of batching ([`UNROUTABLE_PAUSE`]) that [`UNROUTABLE_LIMIT`] of them start.
#[derive(Default)]
struct Unroutable {
    in_a_row: AtomicU32,
    /// Mirrors `since` for the checks' fast path.
    paused: AtomicBool,
    since: std::sync::Mutex<Option<Instant>>,
    /// Whether a pause has been logged at `WARN` (once; later ones at debug level).
    warned: AtomicBool,
}

impl Unroutable {
    /// A node call was routed.
    fn routed(&self) {
        self.in_a_row.store(0, Ordering::Relaxed);
    }

    /// A node call found no connection at `now`: whether that starts a pause, and if so
    /// whether it is the first (to be logged as a warning).
    fn unrouted(&self, now: Instant) -> Option<bool> {
        if self.in_a_row.fetch_add(1, Ordering::Relaxed) + 1 != UNROUTABLE_LIMIT {
            return None;
        }
        *self.since.lock().expect("not poisoned") = Some(now);
        self.paused.store(true, Ordering::Relaxed);
        Some(!self.warned.swap(true, Ordering::Relaxed))
    }

    /// Whether checks may go by node at `now`: no pause, or one that is over (and ends
    /// here, the count starting afresh).
    fn allows_batching(&self, now: Instant) -> bool {
        if !self.paused.load(Ordering::Relaxed) {
            return true;
        }
        let mut since = self.since.lock().expect("not poisoned");
        if since.is_some_and(|at| now.saturating_duration_since(at) >= UNROUTABLE_PAUSE) {
            *since = None;
            self.in_a_row.store(0, Ordering::Relaxed);
            self.paused.store(false, Ordering::Relaxed);
            return true;
        }
        false
    }
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
        let tables = format!(
            "local limits = {}\nlocal periods = {}\n",
            lua_table(&policies, |w| u64::from(w.limit)),
            lua_table(&policies, super::Window::period),
        );
        let source = format!("{clock}{tables}{KEYS_DECLARED}{CHECK}");
        let node_source = format!("{CROSS_SLOT}{clock}{tables}{KEYS_UNDECLARED}{CHECK}");
        Self {
            script: redis::Script::new(&source),
            source,
            node_script: redis::Script::new(&node_source),
            node_source,
            policy: policy.clone(),
            net48: net48.cloned(),
            clock_argument,
            waiting: std::sync::Mutex::new(Vec::new()),
            slots: tokio::sync::watch::Sender::new(None),
            slots_asked: std::sync::Mutex::new(None),
            reading: AtomicBool::new(false),
            map_unusable: AtomicBool::new(false),
            slots_stale: AtomicBool::new(false),
            per_check_only: AtomicBool::new(false),
            unroutable: Unroutable::default(),
        }
    }

    /// The script's Lua source, for measuring it outside the service (`redis-benchmark`
    /// in `scripts/bench-redis`).
    #[doc(hidden)]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether a cluster's checks go in one call per master (a slot map has been read
    /// and the cluster runs the batch script): for tests.
    #[doc(hidden)]
    pub fn batches_by_node(&self) -> bool {
        self.by_node() && self.slots.borrow().is_some()
    }

    /// Whether a cluster's checks may go by node: the cluster runs the batch script, and
    /// no pause for unroutable addresses is under way (one that is over ends here).
    fn by_node(&self) -> bool {
        !self.per_check_only.load(Ordering::Relaxed)
            && self.unroutable.allows_batching(Instant::now())
    }

    /// Checks and counts one request of `client` in Redis (`now` is used only by the
    /// parity test's script).
    ///
    /// The checks that arrive while the worker thread is busy go to Redis together: a
    /// call per request cost the service more in system calls and wake-ups than the rest
    /// of the request (`docs/scaling.md`), and Redis more in command dispatch than the
    /// script. One Redis takes them as one script call; a cluster as one call per master
    /// (its clients hash to many slots, which a call cannot declare together), grouped
    /// by the slot map.
    pub async fn check(
        self: &Arc<Self>,
        redis: &Arc<RedisClient>,
        client: &ClientKey,
        now: u64,
    ) -> Result<Decision, RedisUnavailable> {
        let batched = !self.clock_argument
            && (!redis.is_cluster() || (self.by_node() && self.slot_map(redis)));
        if !batched {
            return self.check_one(redis, client, now).await;
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

    /// One client in a call of its own, routed by its keys.
    async fn check_one(
        &self,
        redis: &RedisClient,
        client: &ClientKey,
        now: u64,
    ) -> Result<Decision, RedisUnavailable> {
        self.check_all(redis, &[client], now)
            .await?
            .pop()
            .expect("one client")
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
        let call = self.call(clients, Some(now), false);
        let reply = redis.eval_sha(&call, &self.source).await?;
        Ok(self
            .split(&reply, clients, false)
            .into_iter()
            .flatten()
            .collect())
    }

    /// The same with the batch script of a cluster node, keys undeclared (on one Redis,
    /// every key is local): for the parity test.
    #[doc(hidden)]
    pub async fn check_all_undeclared(
        &self,
        redis: &RedisClient,
        clients: &[&ClientKey],
        now: u64,
    ) -> Result<Vec<Option<Result<Decision, RedisUnavailable>>>, RedisUnavailable> {
        let call = self.call(clients, Some(now), true);
        let reply = redis.eval_sha(&call, &self.node_source).await?;
        Ok(self.split(&reply, clients, true))
    }

    /// The cluster's slot map, read again in the background (at most one read at a
    /// time, one per [`SLOT_MAP_RETRY`]) when it is old, was found wrong, or while the
    /// breaker is open; whether one is held (none until a first read answers).
    fn slot_map(self: &Arc<Self>, redis: &Arc<RedisClient>) -> bool {
        // Not cloned: this runs on every check of a cluster.
        let (held, due) = match &*self.slots.borrow() {
            None => (false, true),
            // While the breaker is open the cluster may be failing over: the map read
            // last can be the old one, so once it closes only a map read since counts.
            Some(map) => {
                let age = map.read_at.elapsed();
                let current = age < SLOT_MAP_MAX_AGE && map.generation == redis.generation();
                (
                    current,
                    !current
                        || age >= SLOT_MAP_REFRESH
                        || self.slots_stale.load(Ordering::Relaxed)
                        || !redis.is_available(),
                )
            }
        };
        if due {
            let mut asked = self.slots_asked.lock().expect("not poisoned");
            // A cluster whose map cannot be used is asked again only as often as a good
            // map ages.
            let gap = if self.map_unusable.load(Ordering::Relaxed) {
                SLOT_MAP_MAX_AGE
            } else {
                SLOT_MAP_RETRY
            };
            let recently = asked.is_some_and(|at| at.elapsed() < gap);
            if !recently && !self.reading.swap(true, Ordering::AcqRel) {
                *asked = Some(Instant::now());
                self.slots_stale.store(false, Ordering::Relaxed);
                let (this, redis) = (self.clone(), redis.clone());
                tokio::spawn(async move {
                    let generation = redis.generation();
                    // Also while the breaker is open: a master that failed over leaves
                    // the map wrong.
                    let reply = redis
                        .query_past_breaker::<redis::Value>(redis::cmd("CLUSTER").arg("SLOTS"))
                        .await;
                    if let Ok(reply) = reply {
                        let map = SlotMap::parse(&reply).map(|map| SlotMap { generation, ..map });
                        if let Some(map) = &map {
                            redis.keep_links_to(&map.nodes);
                        }
                        this.map_unusable.store(map.is_none(), Ordering::Relaxed);
                        if map.is_none() {
                            tracing::debug!("the cluster's slot map names no usable addresses: a call per check");
                        }
                        this.slots.send_replace(map.map(Arc::new));
                    }
                    this.reading.store(false, Ordering::Release);
                });
            }
        }
        held
    }

    /// A task that sends the waiting checks (at most [`MAX_BATCH`]; another task takes
    /// the rest) and answers each.
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
        if redis.is_cluster() {
            return self.flush_by_node(redis, batch, 1).await;
        }
        let clients: Vec<&ClientKey> = batch.iter().map(|w| &w.client).collect();
        let call = self.call(&clients, None, false);
        let answers = match redis.eval_sha::<redis::Value>(&call, &self.source).await {
            Ok(reply) => self.split(&reply, &clients, false),
            Err(e) => vec![Some(Err(e)); clients.len()],
        };
        // Declared keys are never "elsewhere": every answer is a decision or an error.
        for (waiter, answer) in batch.into_iter().zip(answers) {
            if let Some(answer) = answer {
                // A request that is gone (its client hung up) no longer waits.
                let _ = waiter.reply.send(answer);
            }
        }
    }

    /// Sends `batch` as one call per master by the slot map (try `tries`); the last
    /// call on this task.
    async fn flush_by_node(
        self: &Arc<Self>,
        redis: &Arc<RedisClient>,
        batch: Vec<Waiter>,
        tries: u8,
    ) {
        let map = self.slots.borrow().clone();
        let Some(map) = map else {
            return self.reroute(redis, batch, BY_MAP_TRIES);
        };
        let mut groups: Vec<Vec<Waiter>> = map.nodes.iter().map(|_| Vec::new()).collect();
        let mut unmapped = Vec::new();
        for waiter in batch {
            match map.node_of(KeyBuf::of(&waiter.client).as_bytes()) {
                Some(node) => groups[node].push(waiter),
                None => unmapped.push(waiter),
            }
        }
        self.reroute(redis, unmapped, tries);
        // The masters' calls in flight together on this task: their replies wake one
        // task, not one each.
        let calls = groups
            .into_iter()
            .enumerate()
            .filter(|(_, group)| !group.is_empty())
            .map(|(node, group)| self.flush_node(redis, &map, node, group, tries));
        futures_util::future::join_all(calls).await;
    }

    /// One call to master `node` of `map`, checking all of `group` there.
    async fn flush_node(
        self: &Arc<Self>,
        redis: &Arc<RedisClient>,
        map: &SlotMap,
        node: usize,
        group: Vec<Waiter>,
        tries: u8,
    ) {
        let clients: Vec<&ClientKey> = group.iter().map(|w| &w.client).collect();
        let call = self.call(&clients, None, true);
        let (host, port) = &map.nodes[node];
        let answers = match redis
            .eval_sha_at::<redis::Value>(&call, &self.node_source, (host, *port))
            .await
        {
            Ok(reply) => {
                self.unroutable.routed();
                self.split(&reply, &clients, true)
            }
            // A node the library is not connected to (a new one, or an address it does
            // not know by that name): nothing was sent, and a new map would not help.
            Err(e) if e.is_unroutable() => {
                if let Some(first) = self.unroutable.unrouted(Instant::now()) {
                    if first {
                        tracing::warn!(
                            event = "redis_batch_refused",
                            error = %e,
                            "calls to the cluster's announced node addresses found no connection of the client library's (a master gone that the slot map still names, or addresses it does not connect by): each rate-limit check is a call of its own for 30 s, then batching is tried again"
                        );
                    } else {
                        tracing::debug!(error = %e, "unroutable node addresses again: each rate-limit check is a call of its own for 30 s");
                    }
                }
                return self.reroute(redis, group, BY_MAP_TRIES);
            }
            // That address is not a master any more (a failover, the map read before
            // it): the script did not run there; the clients go by a new map.
            Err(e) if matches!(e.code(), Some("READONLY" | "MOVED" | "ASK")) => {
                return self.reroute(redis, group, tries);
            }
            Err(e) => {
                if !e.is_refusal() {
                    // No answer: the node may be gone, its slots served by another now.
                    self.slots_stale.store(true, Ordering::Relaxed);
                }
                if is_script_refused(&e) && !self.per_check_only.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        event = "redis_batch_refused",
                        error = %e,
                        "the cluster refused the batched rate-limit script (it needs Redis 7 or later): each check is now a call of its own"
                    );
                }
                vec![Some(Err(e)); clients.len()]
            }
        };
        let mut elsewhere = Vec::new();
        for (waiter, answer) in group.into_iter().zip(answers) {
            match answer {
                // A request that is gone (its client hung up) no longer waits.
                Some(answer) => drop(waiter.reply.send(answer)),
                None => elsewhere.push(waiter),
            }
        }
        self.reroute(redis, elsewhere, tries);
    }

    /// Tries again the checks of `waiters`, whose keys were not where the slot map
    /// said: by the map once it has been read again, and after [`BY_MAP_TRIES`]
    /// (a slot mid-migration is on neither node for a moment) each as a call of its
    /// own, which the client library routes, following MOVED and ASK.
    fn reroute(self: &Arc<Self>, redis: &Arc<RedisClient>, waiters: Vec<Waiter>, tries: u8) {
        if waiters.is_empty() {
            return;
        }
        self.slots_stale.store(true, Ordering::Relaxed);
        let (this, redis) = (self.clone(), redis.clone());
        if tries >= BY_MAP_TRIES {
            for waiter in waiters {
                let (this, redis) = (this.clone(), redis.clone());
                tokio::spawn(async move {
                    let answer = this.check_one(&redis, &waiter.client, 0).await;
                    let _ = waiter.reply.send(answer);
                });
            }
            return;
        }
        let again: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(async move {
                let mut changed = this.slots.subscribe();
                let deadline = tokio::time::Instant::now() + SLOT_MAP_WAIT;
                loop {
                    // Asks for a read (at most one per SLOT_MAP_RETRY) until one lands.
                    this.slot_map(&redis);
                    let step = tokio::time::Instant::now() + SLOT_MAP_RETRY;
                    match tokio::time::timeout_at(step.min(deadline), changed.changed()).await {
                        Ok(_) => break,
                        Err(_) if tokio::time::Instant::now() >= deadline => break,
                        Err(_) => {}
                    }
                }
                this.flush_by_node(&redis, waiters, tries + 1).await;
            });
        tokio::spawn(again);
    }

    /// The keys of `client`: its own, and its /48's when that has a budget.
    fn keys_of(&self, client: &ClientKey) -> (KeyBuf, Option<KeyBuf>) {
        let net48 = self.net48.as_ref().and(client.net48());
        (KeyBuf::of(client), net48.as_ref().map(KeyBuf::of))
    }

    /// One `EVALSHA` checking `clients` in order, their keys declared or (for one node
    /// of a cluster) undeclared.
    fn call(&self, clients: &[&ClientKey], now: Option<u64>, undeclared: bool) -> redis::Cmd {
        let mut call = redis::cmd("EVALSHA");
        let counts: Vec<u8> = clients
            .iter()
            .map(|c| 1 + u8::from(self.net48.is_some() && c.net48().is_some()))
            .collect();
        let keys = |call: &mut redis::Cmd| {
            for client in clients {
                let (own, net48) = self.keys_of(client);
                call.arg(own.as_bytes());
                if let Some(net48) = &net48 {
                    call.arg(net48.as_bytes());
                }
            }
        };
        if undeclared {
            call.arg(self.node_script.get_hash()).arg(0);
        } else {
            call.arg(self.script.get_hash())
                .arg(counts.iter().map(|&c| usize::from(c)).sum::<usize>());
            keys(&mut call);
        }
        if self.clock_argument {
            call.arg(now.unwrap_or_default());
        }
        if undeclared {
            call.arg(clients.len());
        }
        for count in counts {
            call.arg(count);
        }
        if undeclared {
            keys(&mut call);
        }
        call
    }

    /// Each client's answer in the reply of [`RedisWindows::call`], or for all of them
    /// an error if the reply is not what the script returns ("elsewhere" only from the
    /// undeclared variant).
    fn split(&self, reply: &redis::Value, clients: &[&ClientKey], undeclared: bool) -> Vec<Answer> {
        let unexpected = || {
            RedisUnavailable::Failed(redis::RedisError::from((
                redis::ErrorKind::Client,
                "rate-limit script returned an unexpected reply",
            )))
        };
        let all_unexpected = || vec![Some(Err(unexpected())); clients.len()];
        let redis::Value::Array(items) = reply else {
            return all_unexpected();
        };
        let mut rest = &items[..];
        let mut answers = Vec::with_capacity(clients.len());
        for client in clients {
            let net48 = self.net48.as_ref().filter(|_| client.net48().is_some());
            let policies = [Some(&self.policy), net48];
            if undeclared && rest.first() == Some(&redis::Value::Int(2)) {
                rest = &rest[1..];
                answers.push(None);
                continue;
            }
            let Some((mine, after)) = rest.split_at_checked(reply_len(&policies)) else {
                return all_unexpected();
            };
            rest = after;
            answers.push(Some(decide_items(mine, &policies).ok_or_else(unexpected)));
        }
        if !rest.is_empty() {
            return all_unexpected();
        }
        answers
    }
}

/// Whether Redis cannot take the batch script at all (before Redis 7 its shebang line
/// does not compile), rather than failing one call: any other error leaves batching on.
fn is_script_refused(e: &RedisUnavailable) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    e.code() == Some("ERR") && (text.contains("compiling script") || text.contains("shebang"))
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
    fn unroutable_calls_in_a_row_pause_batching_for_a_while() {
        let unroutable = Unroutable::default();
        let start = Instant::now();
        for _ in 1..UNROUTABLE_LIMIT {
            assert_eq!(unroutable.unrouted(start), None);
        }
        // A routed call starts the count again.
        unroutable.routed();
        for _ in 1..UNROUTABLE_LIMIT {
            assert_eq!(unroutable.unrouted(start), None);
        }
        assert!(unroutable.allows_batching(start));
        assert_eq!(
            unroutable.unrouted(start),
            Some(true),
            "the first pause warns"
        );
        assert!(!unroutable.allows_batching(start));
        let almost = start + UNROUTABLE_PAUSE - Duration::from_millis(1);
        assert!(!unroutable.allows_batching(almost));
        let over = start + UNROUTABLE_PAUSE;
        assert!(unroutable.allows_batching(over), "batching again");
        assert!(unroutable.allows_batching(over));
        // The count started afresh: another pause takes the whole count again, and is
        // not a warning.
        for _ in 1..UNROUTABLE_LIMIT {
            assert_eq!(unroutable.unrouted(over), None);
        }
        assert_eq!(unroutable.unrouted(over), Some(false));
        assert!(!unroutable.allows_batching(over));
        assert!(unroutable.allows_batching(over + UNROUTABLE_PAUSE));
    }

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
    fn slots_are_the_ones_redis_computes() {
        let mut keys: Vec<Vec<u8>> = [
            "",
            "a",
            "b",
            "{}",
            "{}a",
            "a{}b{c}",
            "{a",
            "a}",
            "}{a}",
            "{{a}}",
            "x{b}y",
            "rl:{10.0.0.1}",
            "rl:{2001:db8:1::}:48",
            "{user1000}.following",
        ]
        .iter()
        .map(|k| k.as_bytes().to_vec())
        .collect();
        keys.extend(
            (0..2000u32).map(|i| format!("rl:v1:{{10.0.{}.{}}}", i / 256, i % 256).into_bytes()),
        );
        for key in keys {
            let redis = format!("{:?}", redis::cluster_routing::Slot::for_key(&key));
            assert_eq!(format!("Slot({})", slot_of(&key)), redis, "{key:?}");
        }
    }

    #[test]
    fn a_slot_map_is_read_from_cluster_slots_or_not_at_all() {
        use redis::Value::{Array, BulkString, Int};
        let node = |host: &str, port: i64| {
            Array(vec![
                BulkString(host.into()),
                Int(port),
                BulkString(b"id".to_vec()),
            ])
        };
        let reply = Array(vec![
            Array(vec![
                Int(0),
                Int(8000),
                node("10.0.0.1", 6379),
                node("10.0.0.4", 6379),
            ]),
            Array(vec![Int(8001), Int(16383), node("10.0.0.2", 6380)]),
        ]);
        let map = SlotMap::parse(&reply).expect("a map");
        assert_eq!(
            map.nodes,
            [("10.0.0.1".to_owned(), 6379), ("10.0.0.2".to_owned(), 6380)],
            "masters only, each once"
        );
        // CLUSTER KEYSLOT: "a" is slot 15495, "b" slot 3300.
        assert_eq!(map.node_of(b"a"), Some(1));
        assert_eq!(map.node_of(b"b"), Some(0));
        assert_eq!(map.node_of(b"x{b}y"), Some(0), "by the hash tag");
        let partial = Array(vec![Array(vec![Int(0), Int(10), node("10.0.0.1", 1)])]);
        assert_eq!(SlotMap::parse(&partial).unwrap().node_of(b"a"), None);
        for bad in [
            Int(1),
            Array(vec![Int(0)]),
            Array(vec![Array(vec![Int(0), Int(20_000), node("h", 1)])]),
            Array(vec![Array(vec![Int(0), Int(1), node("h", 70_000)])]),
            Array(vec![Array(vec![
                Int(0),
                Int(1),
                Array(vec![Int(1), Int(1)]),
            ])]),
            Array(vec![Array(vec![Int(0), Int(1), node("", 1)])]),
            Array(vec![Array(vec![Int(0), Int(1), node("?", 1)])]),
            Array(vec![Array(vec![Int(0), Int(1), node("0.0.0.0", 1)])]),
            Array(vec![Array(vec![Int(0), Int(1), node("::", 1)])]),
        ] {
            assert!(SlotMap::parse(&bad).is_none(), "{bad:?}");
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
