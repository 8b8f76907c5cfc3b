"""Soak: the service under steady mixed load, memory watched.

    tests/system/run -k soak                       1 minute (what CI runs)
    tests/system/run -k soak --soak-minutes 60     a real one (or SOAK_MINUTES=60)
    --soak-no-outage (SOAK_NO_OUTAGE=1)            without the Redis outages
    --soak-clients 120000 (SOAK_CLIENTS)           more client addresses (at most 131072)
    --soak-env VAR=VALUE                           another service setting (repeatable)

Runs $FIBONACCI_API_BIN with a private redis-server, the default rate limits
(30/minute, 50/hour, 200/day), TRUSTED_PROXIES=127.0.0.1, MAX_N=100000 and
CACHE_MAX_BYTES=16 MiB (small enough to be full by the end of the warm-up, so that
growth after it is a leak, not the cache filling; --soak-env CACHE_MAX_BYTES=... to
soak another size), and drives it with wrk (2 threads, 32 connections) for the whole run.
Each request carries an X-Forwarded-For drawn from 50,000 client addresses
(198.18.0.0/15, the benchmarking range; they are header values, all traffic goes to
127.0.0.1), so the limiter keeps meeting new clients and forgetting old ones.
(50,000 addresses have 10 million answers a day between them, 200 each: past about
8 minutes at full speed most /fibonacci answers are 429s. For a long soak that still
computes, raise --soak-clients.)
The mix: 50% cached n (0..100), 25% uncached n (1001..100000), 10% invalid n (400),
10% unknown paths (404), 5% from ten abusive clients (429 once they are over their limits).

With Redis up, the limits live in Redis; the in-process limiter only takes over when
Redis is unreachable. So that it churns too, Redis is killed (SIGKILL) twice and
restarted: once during the warm-up (the limiter fills up to its bound, which is memory
it keeps: entries live as long as their day window matters) and again from 40% to 60%
of the run (which must then cost no more memory). The service runs with
RATE_LIMIT_MAX_KEYS=20000: fewer than the 50,000 addresses, so the limiter has to
forget clients to stay within its bound.

Every 10 s: VmRSS of the service, rate_limiter_keys and redis_up from /metrics.
At the end it asserts:
  - no 5xx answer, no connection error or timeout (wrk's counts);
  - RSS after the warm-up (the first minute, or the first third of a shorter run)
    grows by less than max(10% of the RSS at the end of the warm-up, 8 MiB);
  - rate_limiter_keys never above RATE_LIMIT_MAX_KEYS, and above 0 during each outage;
  - 429s happened (the limits were exercised), redis_up is 1 at the end;
  - the service exits 0 on SIGTERM.
"""

from __future__ import annotations

import time
from argparse import Namespace
from pathlib import Path

import pytest

from .harness import (
    Redis,
    Service,
    Verdict,
    binary,
    http_get,
    metric,
    redis_command,
    spawn,
    vm_kib,
    write_wrk_script,
    wrk_report,
)

MAX_KEYS = 20000
MAX_N = 100000
# The memory tier fills within the warm-up at this size (at 64 MiB it would still be
# filling after the first minute of a short run, which is growth but not a leak).
CACHE_MAX_BYTES = 16 * 1024 * 1024
SAMPLE_EVERY = 10

WRK_SCRIPT = r"""
-- The traffic mix (answers counted by the harness's reporter).
local bad = {"/fibonacci?n=abc", "/fibonacci?n=-1", "/fibonacci?n=%(too_big)d", "/fibonacci",
             "/fibonacci?n=1&n=2", "/fibonacci?n=1e3", "/fibonacci?n=%%20"}
function init(args)
  math.randomseed(os.time() * 1000 + id * 7919)
end
function request()
  local r = math.random()
  local i = math.random(0, %(clients)d - 1)
  local xff = string.format("198.%%d.%%d.%%d", 18 + math.floor(i / 65536), math.floor(i / 256) %% 256, i %% 256)
  local path
  if r < 0.50 then
    path = "/fibonacci?n=" .. math.random(0, 100)
  elseif r < 0.75 then
    path = "/fibonacci?n=" .. math.random(1001, %(max_n)d)
  elseif r < 0.85 then
    path = bad[math.random(#bad)]
  elseif r < 0.95 then
    path = "/no/such/path/" .. math.random(1, 1000)
  else
    path = "/fibonacci?n=" .. math.random(0, 100)
    xff = string.format("198.51.100.%%d", math.random(1, 10))
  end
  return wrk.format("GET", path, {["X-Forwarded-For"] = xff})
end
"""


@pytest.mark.usefixtures("needs_wrk")
def test_soak(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    """Steady mixed load with two Redis outages: no 5xx, no connection error, the mix
    served (200, 400, 404, 429), RSS growth after the warm-up under max(10%, 8 MiB), the
    limiter within RATE_LIMIT_MAX_KEYS and taking over in each outage, redis_up 1 at the
    end, exit 0 on SIGTERM."""
    args = Namespace(minutes=pytestconfig.getoption("soak_minutes"),
                     clients=pytestconfig.getoption("soak_clients"),
                     no_outage=pytestconfig.getoption("soak_no_outage"),
                     env=pytestconfig.getoption("soak_env"))
    if args.minutes < 1:
        raise pytest.UsageError("--soak-minutes must be at least 1")
    if not 1 <= args.clients <= 131072:
        raise pytest.UsageError("--soak-clients must be from 1 to 131072 (198.18.0.0/15)")
    duration = args.minutes * 60
    warmup = min(60, duration // 3)
    outages = [] if args.no_outage else [(5, round(warmup * 0.75)), (round(duration * 0.4), round(duration * 0.6))]
    redis = Redis(tmp_path)
    redis_port = redis.port
    env = {
        "REDIS_URL": redis.url,
        "TRUSTED_PROXIES": "127.0.0.1",
        "MAX_N": str(MAX_N),
        "RATE_LIMIT_MAX_KEYS": str(MAX_KEYS),
        "CACHE_MAX_BYTES": str(CACHE_MAX_BYTES),
        "SHUTDOWN_DRAIN_SECONDS": "1",
        "LOG_FORMAT": "json",
        "RUST_LOG": "warn",  # one line per request would be a soak of the disk
    }
    for setting in args.env:
        var, sep, value = setting.partition("=")
        if not sep:
            raise pytest.UsageError(f"--soak-env {setting}: expected VAR=VALUE")
        env[var] = value
    svc = Service(tmp_path, "service", per_address_limits=True, **env)
    port = svc.port
    for _ in range(100):
        if (http_get(svc.base + "/readyz")[0] == 200
                and metric(http_get(svc.base + "/metrics")[1].decode(), "redis_up") == 1):
            break
        time.sleep(0.1)
    else:
        pytest.fail("soak: the service did not become ready with Redis up")
    lua = write_wrk_script(tmp_path / "soak.lua",
                           WRK_SCRIPT % {"max_n": MAX_N, "too_big": MAX_N + 1, "clients": args.clients})

    print(f"soak: {binary()}, {args.minutes} min, {args.clients} clients, wrk -t2 -c32, warm-up {warmup} s, "
          f"CACHE_MAX_BYTES={env['CACHE_MAX_BYTES']}" + "".join(f", {setting}" for setting in args.env)
          + (", Redis down " + " and ".join(f"from t={a} s to t={b} s" for a, b in outages) if outages
             else ", Redis up throughout"))
    wrk = spawn(["wrk", "-t2", "-c32", f"-d{duration}s", "--timeout", "10s", "-s", str(lua), f"http://127.0.0.1:{port}/"],
                pipe=True)
    t0 = time.monotonic()
    samples: list[tuple[int, int, float | None, float | None]] = []  # (t, rss KiB, limiter keys, redis_up)
    pending = [(a, "kill") for a, _ in outages] + [(b, "restart") for _, b in outages]
    pending.sort()
    service_died = None
    next_sample = 0.0
    print(f"{'t':>6} {'RSS MiB':>8} {'limiter keys':>13} {'redis_up':>9}")
    while wrk.poll() is None and time.monotonic() - t0 < duration + 30:
        t = time.monotonic() - t0
        if svc.proc.poll() is not None:
            service_died = svc.proc.returncode
            print(f"{t:6.0f} the service exited with {service_died}:")
            print(svc.tail(20))
            break
        while pending and t >= pending[0][0]:
            _, action = pending.pop(0)
            if action == "kill":
                redis.kill()
                print(f"{t:6.0f} redis-server killed")
            else:
                redis.restart()
                print(f"{t:6.0f} redis-server restarted")
        if t >= next_sample:
            status, raw = http_get(svc.base + "/metrics")
            if status != 200:
                print(f"{t:6.0f} /metrics failed: status {status}")
            text = raw.decode()
            sample = (round(t), vm_kib(svc.pid, "VmRSS"), metric(text, "rate_limiter_keys"), metric(text, "redis_up"))
            samples.append(sample)
            print(f"{sample[0]:6d} {sample[1] / 1024:8.1f} {sample[2] or 0:13.0f} {sample[3] or 0:9.0f}", flush=True)
            next_sample += SAMPLE_EVERY
        time.sleep(0.2)
    if service_died is not None:
        wrk.kill()
        pytest.fail(f"soak: the service exited with {service_died} under load")
    out = wrk.communicate(timeout=30)[0].decode() if wrk.poll() is not None else ""
    text = http_get(svc.base + "/metrics")[1].decode()
    samples.append((round(time.monotonic() - t0), vm_kib(svc.pid, "VmRSS"), metric(text, "rate_limiter_keys"),
                    metric(text, "redis_up")))
    redis_keys = redis_command(redis_port, "DBSIZE").decode().strip().lstrip(":")

    v = Verdict()
    check = v.check

    print()
    res = wrk_report(out)
    check(res is not None, "wrk ran to the end and reported")
    if res is not None:
        st = res["statuses"]
        secs = res["duration_us"] / 1e6
        print(f"  wrk: {res['requests']} requests in {secs:.0f} s ({res['requests'] / secs:.0f}/s), "
              f"statuses {dict(sorted(st.items()))}, errors {res['errors']}")
        print(f"  latency p50 {res['latency_p50_us'] / 1000:.1f} ms, p99 {res['latency_p99_us'] / 1000:.1f} ms, "
              f"max {res['latency_max_us'] / 1000:.1f} ms")
        fivexx = sum(n for s, n in st.items() if s.startswith("5"))
        check(fivexx == 0, f"no 5xx ({fivexx})")
        check(sum(res["errors"].values()) == 0, f"no connection error or timeout ({res['errors']})")
        check(all(st.get(s, 0) > 0 for s in ("200", "400", "404", "429")),
              "the mix was served: 200, 400, 404 and 429 all seen")
    rss = [(t, kib) for t, kib, _, _ in samples]
    base_t, base = next(((t, kib) for t, kib in rss if t >= warmup), rss[-1])
    later = [kib for t, kib in rss if t > base_t] or [base]
    bound = max(base * 0.10, 8 * 1024)
    growth = max(later) - base
    print(f"  RSS series (MiB, every {SAMPLE_EVERY} s): " + " ".join(f"{kib / 1024:.1f}" for _, kib in rss))
    check(growth < bound, f"RSS after the warm-up (t={base_t} s: {base / 1024:.1f} MiB) grew by "
          f"{growth / 1024:+.1f} MiB, bound {bound / 1024:.1f} MiB (max of 10% and 8 MiB)")
    keys = [k for _, _, k, _ in samples if k is not None]
    check(max(keys, default=0) <= MAX_KEYS, f"rate_limiter_keys never above RATE_LIMIT_MAX_KEYS={MAX_KEYS} "
          f"(max seen {max(keys, default=0):.0f})")
    for a, b in outages:
        # The gauge is updated by the limiter's sweep, every 5 s.
        during = [k or 0 for t, _, k, _ in samples if a < t <= b + SAMPLE_EVERY]
        check(any(k > 0 for k in during), f"the in-process limiter took over during the outage at t={a}..{b} s "
              f"(keys {', '.join(f'{k:.0f}' for k in during)})")
    print(f"  Redis at the end: {redis_keys} keys (cache entries and rate-limit counters)")
    check(metric(text, "redis_up") == 1, "redis_up is 1 at the end")
    check((metric(text, "rate_limit_rejections_total") or 0) > 0,
          f"the limits were exercised ({metric(text, 'rate_limit_rejections_total') or 0:.0f} rejections)")
    rc = svc.stop_sync(20)
    check(rc == 0, f"the service exits 0 on SIGTERM (exit {rc})")
    v.done()
