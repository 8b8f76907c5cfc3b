"""Disaster-recovery drill, locally (docs/disaster-recovery.md): the state a region loses
is the Redis cache and the rate-limit counters, nothing else. The drill measures:

  1. cold start: a new process against an EMPTY Redis (a region rebuilt from nothing):
     time from exec to /readyz 200, and to the first exact answer of
     GET /fibonacci?n=1000, which it also writes back to Redis;
  2. Redis lost under a running service: answers continue (computed), and after Redis
     comes back empty, time until the service uses it again (redis_up 1 on /metrics and
     a new key written).

    tests/system/run -k dr_drill        (DR_ROUNDS=N for more cold starts; default 3)

Every step has a deadline (30 s; 10 s for Redis itself and the write-back), and fails
the test when it misses it or an answer is wrong.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import Redis, Service, fib, http_get, redis_dbsize

DEADLINE = 30.0


def until(what: str, fn: Callable[[], bool], deadline: float = DEADLINE) -> float:
    """Seconds until fn() held; fails the test when it does not within `deadline`."""
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        if fn():
            return time.monotonic() - start
        time.sleep(0.01)
    pytest.fail(f"dr-drill: {what} not within {deadline:.0f}s")


def cold_start(tmp: Path, i: int, last: bool, want: bytes) -> tuple[float, float]:
    """One round: (seconds to /readyz 200, seconds to the exact F(1000)); in the last one,
    Redis is also lost under the running service and comes back empty."""
    redis = Redis(tmp, f"redis-{i}")
    rport = redis.port
    until("redis-server answering", lambda: redis_dbsize(rport) == 0, 10)
    # The clock starts before exec: Service returns once the port is known (its
    # "serving" line), and /readyz is timed from the same start.
    t0 = time.monotonic()
    svc = Service(tmp, f"service-{i}", per_address_limits=True, REDIS_URL=redis.url, RUST_LOG="warn",
                  SHUTDOWN_DRAIN_SECONDS="0", RATE_LIMITS="off")
    base = svc.base
    until("/readyz 200", lambda: http_get(base + "/readyz", 0.5)[0] == 200)
    ready = time.monotonic() - t0
    until("the exact F(1000)", lambda: http_get(base + "/fibonacci?n=1000")[1] == want)
    answered = time.monotonic() - t0
    until("the answer written back to Redis", lambda: redis_dbsize(rport) > 0, 10)
    print(f"  cold start {i + 1}: ready after {ready * 1000:.0f} ms, exact F(1000) after "
          f"{answered * 1000:.0f} ms, Redis holds it")
    if last:
        # Redis lost under the running service, then back empty.
        redis.stop()
        lost = time.monotonic()
        for n in (1000, 999, 998):
            status, body = http_get(f"{base}/fibonacci?n={n}")
            assert status == 200 and json.loads(body)["fibonacci"] == fib(n), \
                f"dr-drill: with Redis gone, n={n} answered {status}"
        redis.restart()
        until("redis-server answering", lambda: redis_dbsize(rport) == 0, 10)
        back = time.monotonic()

        def using_redis() -> bool:
            http_get(f"{base}/fibonacci?n={int((time.monotonic() * 1000) % 900)}")
            metrics = http_get(base + "/metrics")[1].decode()
            return "\nredis_up 1" in "\n" + metrics and redis_dbsize(rport) > 0

        again = until("the service using the new, empty Redis", using_redis)
        print(f"  Redis lost: every answer still exact ({(back - lost) * 1000:.0f} ms without it); back empty, "
              f"in use again after {again * 1000:.0f} ms")
    svc.stop_sync(15)
    redis.stop()
    return ready, answered


def test_dr_drill(tmp_path: Path) -> None:
    """Cold starts against an empty Redis reach /readyz 200, the exact F(1000) and a
    write-back within 30 s (10 s for the write-back); with Redis lost every answer stays
    exact, and a new empty Redis is used again within 30 s."""
    rounds = int(os.environ.get("DR_ROUNDS", "3"))
    want = json.dumps({"n": 1000, "fibonacci": fib(1000)}, separators=(",", ":")).encode()
    print(f"dr-drill: {rounds} cold starts against an empty Redis, then Redis lost and back")
    times = [cold_start(tmp_path, i, i == rounds - 1, want) for i in range(rounds)]
    ready = [r for r, _ in times]
    answered = [a for _, a in times]
    print(f"dr-drill: cold start to ready: median {statistics.median(ready) * 1000:.0f} ms "
          f"(max {max(ready) * 1000:.0f}); to the first exact answer: median "
          f"{statistics.median(answered) * 1000:.0f} ms (max {max(answered) * 1000:.0f})")
