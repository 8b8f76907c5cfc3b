"""Fault scenarios against the real service binary: budgets under load and faults.

    tests/system/run -k faults                every scenario (about 90 s)
    tests/system/run -k "redis or sigterm"    only those

  redis           Redis killed (-9) and restarted under load: no non-200, no request
                  slower than 1 s, redis_up 0 during the outage and 1 again after.
  sigterm         SIGTERM under load: every answer a 200, no accepted request lost,
                  /readyz 503 during the drain while /fibonacci still answers 200, exit
                  0 within drain + 12 s.
  otlp-closed-*   OTLP collector unreachable (closed port), grpc and http/protobuf:
                  no error, p99 < 250 ms, exit 0 on SIGTERM within drain + 6 s.
  otlp-blackhole-*  OTLP collector accepting connections and never answering: the
                  same, exit within drain + 8 s (the SDK gives up flushing after 5 s).
  overload        MAX_IN_FLIGHT=4 and 128 connections (wrk) asking for large
                  uncached n: the excess gets 503 + Retry-After: 1 at once (99% within
                  5 ms server-side), 200s are not queued, /health and /readyz answer
                  200 within 1 s, VmHWM < 200 MiB.
  slow-clients    500 connections trickling their head a byte a second and 200 whose
                  body never comes: a fresh client is served within 1 s meanwhile, and
                  both kinds are cut within HEADER_READ_TIMEOUT_MS + 1.5 s; one address
                  holds at most MAX_CONNECTIONS_PER_ADDRESS of them.
  held-heads      1,280 connections from 20 addresses, each holding a request head
                  just under the 32 KiB cap, against MAX_CONNECTIONS=1024, twice: the
                  excess refused, RSS within the memory model's 96 KiB per connection
                  (docs/reliability.md), and handed back within 7 s of their closing.
  slow-readers    50 connections pipelining 400 requests each and never reading: all
                  cut within WRITE_TIMEOUT_MS + 2 s, RSS grows by less than 64 MiB.

Runs $FIBONACCI_API_BIN (default target/debug/fibonacci-api) on port 0. Every process
a scenario starts (the service, redis-server, wrk) listens on or talks to 127.0.0.1
only, is bounded in time (120 s per scenario), and is killed when the test ends. Each
check is printed as it is made; a failing scenario lists every check that did not hold.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from .harness import (
    ClosedPort,
    Rec,
    Redis,
    Service,
    Verdict,
    client,
    die_with_parent,
    error_kind,
    fetch,
    histogram_share,
    metric,
    ms,
    pct,
    redis_command,
    request_bytes,
    summary,
    vm_kib,
    write_wrk_script,
    wrk_report,
)

SCENARIO_TIMEOUT = 120


def run_scenario(scenario: Callable[[Verdict], Awaitable[None]]) -> None:
    """Runs one scenario within its time bound; the test fails listing every unmet check."""
    v = Verdict()
    try:
        asyncio.run(asyncio.wait_for(scenario(v), SCENARIO_TIMEOUT))
    except Exception as e:
        # A scenario that crashes fails listing the checks it had failed so far too.
        v.check(False, f"scenario raised {type(e).__name__}: {e}")
        raise AssertionError(v.report()) from e
    v.done()


WRK_SCRIPT = r"""
-- Distinct n over 0..MAX_N (answers counted by the harness's reporter).
function init(args)
  math.randomseed(os.time() * 1000 + id)
end
function request()
  return wrk.format("GET", "/fibonacci?n=" .. math.random(0, %(max_n)d))
end
"""


async def scenario_redis(v: Verdict, tmp: Path) -> None:
    """Redis killed with SIGKILL and restarted under load."""
    duration, kill_at, restart_at, max_n = 15, 5.0, 10.0, 100000
    redis = Redis(tmp)
    redis_port = redis.port
    svc = Service(tmp, "redis", REDIS_URL=redis.url, RATE_LIMITS="off", MAX_N=str(max_n),
                  SHUTDOWN_DRAIN_SECONDS="0")
    await svc.ready()
    for _ in range(50):
        if metric(await svc.metrics(), "redis_up") == 1:
            break
        await asyncio.sleep(0.1)
    v.check(metric(await svc.metrics(), "redis_up") == 1, "redis_up is 1 before the load")
    lua = write_wrk_script(tmp / "redis.lua", WRK_SCRIPT % {"max_n": max_n})
    wrk = await asyncio.create_subprocess_exec(
        "wrk", "-t2", "-c32", f"-d{duration}s", "--timeout", "5s", "-s", lua, f"http://127.0.0.1:{svc.port}/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent)
    t_start = time.monotonic()
    redis_up_samples: list[tuple[float, float | None]] = []
    killed = restarted = False
    while wrk.returncode is None and time.monotonic() - t_start < duration + 10:
        t = time.monotonic() - t_start
        if not killed and t >= kill_at:
            redis.kill()
            killed = True
            v.info(f"t={t:.1f}s: redis-server killed (SIGKILL)")
        if killed and not restarted and t >= restart_at:
            redis.restart()
            restarted = True
            v.info(f"t={time.monotonic() - t_start:.1f}s: redis-server restarted on the same port")
        try:
            redis_up_samples.append((t, metric(await svc.metrics(), "redis_up")))
        except (TimeoutError, OSError, RuntimeError) as e:
            v.check(False, f"/metrics during the load: {e}")
        try:
            await asyncio.wait_for(wrk.wait(), 0.25)
        except TimeoutError:
            pass
    assert wrk.stdout is not None
    out = (await wrk.stdout.read()).decode()
    if wrk.returncode is None:
        wrk.kill()
    res = wrk_report(out)
    if not v.check(res is not None, "wrk finished and reported"):
        print(out)
        svc.kill()
        return
    assert res is not None
    statuses = res["statuses"]
    errors = sum(res["errors"].values())
    v.info(f"wrk: {res['requests']} requests in {duration} s, statuses {statuses}, errors {res['errors']}, "
           f"latency p50 {res['latency_p50_us'] / 1000:.1f} ms, p99 {res['latency_p99_us'] / 1000:.1f} ms, "
           f"max {res['latency_max_us'] / 1000:.1f} ms")
    v.check(res["requests"] > 1000, f"load really ran ({res['requests']} requests)")
    v.check(set(statuses) == {"200"}, "every answer a 200")
    v.check(errors == 0, "no connection error or timeout")
    v.check(res["latency_max_us"] < 1_000_000, "no request slower than 1 s (REDIS_TIMEOUT_MS 50 + margin)")
    down = [t for t, up in redis_up_samples if up == 0]
    v.check(bool(down) and all(kill_at <= t <= restart_at + 2 for t in down),
            f"redis_up 0 during the outage only (seen 0 at t={down[0]:.1f}..{down[-1]:.1f}s)" if down
            else "redis_up 0 during the outage only (never seen 0)")
    t_wait = time.monotonic()
    up = None
    while time.monotonic() - t_wait < 10:
        up = metric(await svc.metrics(), "redis_up")
        if up == 1:
            break
        await asyncio.sleep(0.1)
    v.check(up == 1, "redis_up back to 1 after the restart")
    text = await svc.metrics()
    err = metric(text, "fibonacci_cache_requests_total", tier="redis", result="error") or 0
    hit = metric(text, "fibonacci_cache_requests_total", tier="redis", result="hit") or 0
    miss = metric(text, "fibonacci_cache_requests_total", tier="redis", result="miss") or 0
    v.info(f"Redis tier: {hit:.0f} hits, {miss:.0f} misses, {err:.0f} errors (skipped or failed calls)")
    v.check(err > 0, "the outage was seen by the Redis tier (redis/error > 0)")
    keys = redis_command(redis_port, "DBSIZE").decode().strip()
    v.check(keys.startswith(":") and int(keys[1:]) > 0, f"write-back resumed: the restarted Redis holds {keys[1:]} keys")
    rc, took = await svc.stop(20)
    v.check(rc == 0, f"exit 0 on SIGTERM (took {took:.1f} s)")
    redis.kill()


async def scenario_sigterm(v: Verdict, tmp: Path) -> None:
    """SIGTERM under load: drain, then stop accepting; nothing accepted is lost."""
    drain = 2.0
    svc = Service(tmp, "sigterm", SHUTDOWN_DRAIN_SECONDS=str(int(drain)), RATE_LIMITS="off", MAX_N="1000000")
    await svc.ready()
    recs: list[Rec] = []
    probes: list[tuple[float, str, int | None, float]] = []  # (t, path, status, latency)
    connects: list[tuple[float, bool]] = []
    t_term = None

    def over() -> bool:
        return svc.proc.poll() is not None or time.monotonic() > hard_stop

    hard_stop = time.monotonic() + 3 + drain + 15

    async def prober(path: str, every: float) -> None:
        while not over():
            t = time.monotonic()
            try:
                status, _, _ = await fetch(svc.port, path, timeout=5)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                status = None
            probes.append((t, path, status, time.monotonic() - t))
            await asyncio.sleep(every)

    async def connector() -> None:
        while not over():
            t = time.monotonic()
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", svc.port), 1)
                w.close()
                connects.append((t, True))
            except (TimeoutError, OSError):
                connects.append((t, False))
            await asyncio.sleep(0.02)

    async def terminate() -> None:
        nonlocal t_term
        await asyncio.sleep(3)
        t_term = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)

    cheap = lambda: f"/fibonacci?n={random.randint(0, 1000)}"
    big = lambda: f"/fibonacci?n={random.randint(500_000, 1_000_000)}"
    tasks = [client(svc.port, cheap, over, recs) for _ in range(24)]
    tasks += [client(svc.port, big, over, recs) for _ in range(4)]
    tasks += [prober("/readyz", 0.1), prober("/fibonacci?n=7", 0.1), connector(), terminate()]
    await asyncio.gather(*tasks)
    t_exit = time.monotonic()
    rc = svc.proc.poll()
    if rc is None:
        svc.kill()
    assert t_term is not None
    ok_connects = [t for t, ok in connects if ok]
    refused = [t for t, ok in connects if not ok and t > t_term]
    t_last_accept = max((t for t in ok_connects), default=t_term)
    t_closed = min(refused, default=t_exit)
    rel = lambda t: t - t_term
    v.info(f"SIGTERM at t=0; listener closed between t={rel(t_last_accept):.2f}s and t={rel(t_closed):.2f}s; "
           f"process gone at t={rel(t_exit):.2f}s, exit code {rc}")
    answered = [r for r in recs if r.status is not None]
    v.info("load: " + summary(recs))
    v.check(len(answered) > 1000, f"load really ran ({len(answered)} answers)")
    v.check(all(r.status == 200 for r in answered), "every answer a 200 (no 5xx during the drain)")
    served_in_drain = [r for r in answered if t_term < r.t0 and r.t1 < t_last_accept]
    v.check(len(served_in_drain) > 100, f"load kept being served during the drain ({len(served_in_drain)} answers)")
    early = [r for r in recs if r.error and not r.error.startswith("connect") and r.t1 < t_last_accept]
    v.check(not early, f"no connection error before the listener closed ({len(early)}: "
            f"{sorted({str(r.error) for r in early})})")
    late = [r for r in recs if r.error and not r.error.startswith("connect") and r.t1 >= t_last_accept]
    stale = [r for r in late if r.t0 < t_last_accept - 0.1]
    v.check(not stale, f"every request sent more than 100 ms before the close got its answer "
            f"({len(stale)} did not)")
    conns = 28
    v.info(f"at the close: {len(late)} requests ended without an answer ({sorted({str(r.error) for r in late})}; "
           f"{sum(1 for r in late if r.fresh)} first on their connection), sent "
           f"{', '.join(f'{(r.t0 - t_last_accept) * 1000:+.0f}' for r in sorted(late, key=lambda r: r.t0)[:30])} ms "
           f"from the last accepted connect, on {conns} busy keep-alive connections; "
           f"{sum(1 for r in recs if r.error == 'connect-refused')} connects refused after it")
    timeouts = [r for r in recs if r.error == "timeout"]
    v.check(not timeouts, f"no request timed out ({len(timeouts)})")
    # The server's own count: every /fibonacci 200 it logged was received by a client.
    logged = sum(1 for line in svc.log_lines() if line.get("route") == "/fibonacci" and line.get("status") == 200)
    received = len(answered) + sum(1 for p in probes if p[1].startswith("/fibonacci") and p[2] == 200)
    v.check(logged == received, f"the service answered {logged} /fibonacci requests, the clients received "
            f"{received}: no answered request lost")
    # Sent before the signal, except a 503 that came after it: a probe sent just before
    # the signal and answered once the drain began is rightly 503 (a loaded machine makes
    # that likely). A probe with no answer still counts against the check.
    before = [p for p in probes if p[1] == "/readyz" and p[0] < t_term
              and not (p[2] == 503 and p[0] + p[3] >= t_term)]
    during = [p for p in probes if t_term + 0.2 < p[0] < t_term + drain - 0.2]
    ready_during = [p[2] for p in during if p[1] == "/readyz"]
    fib_during = [p[2] for p in during if p[1].startswith("/fibonacci")]
    v.check(bool(before) and all(p[2] == 200 for p in before),
            f"/readyz 200 before SIGTERM ({len(before)} probes; not 200: "
            f"{[(round(rel(p[0]), 3), p[2], round(p[3], 3)) for p in before if p[2] != 200]})")
    v.check(len(ready_during) >= 5 and all(s == 503 for s in ready_during),
            f"/readyz 503 during the drain ({len(ready_during)} probes: {sorted(set(map(str, ready_during)))})")
    v.check(len(fib_during) >= 5 and all(s == 200 for s in fib_during),
            f"/fibonacci on new connections 200 during the drain ({len(fib_during)} probes)")
    bound = drain + 12
    v.check(rc == 0 and rel(t_exit) <= bound + 0.5,
            f"exit 0 within drain + 12 s = {bound:.0f} s (exit {rc} after {rel(t_exit):.2f} s)")


async def blackhole_server() -> tuple[asyncio.AbstractServer, int, dict]:
    """Accepts connections, reads and discards whatever comes, never answers."""
    stats = {"connections": 0, "bytes": 0}
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats["connections"] += 1
        writers.append(writer)
        try:
            while data := await reader.read(65536):
                stats["bytes"] += len(data)
        except OSError:
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.writers = writers  # type: ignore[attr-defined]
    return server, server.sockets[0].getsockname()[1], stats


async def scenario_otlp(v: Verdict, tmp: Path, protocol: str, blackhole: bool) -> None:
    """Traces exported to a collector that is not there, or that never answers."""
    drain = 1
    closed = None if blackhole else ClosedPort()
    if closed is None:
        server, port, stats = await blackhole_server()
    else:
        server, port, stats = None, closed.port, None
    name = f"otlp-{'blackhole' if blackhole else 'closed'}-{protocol.replace('/', '-')}"
    svc = Service(tmp, name, RATE_LIMITS="off", SHUTDOWN_DRAIN_SECONDS=str(drain),
                  OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}", OTEL_EXPORTER_OTLP_PROTOCOL=protocol)
    try:
        t0 = time.monotonic()
        await svc.ready()
        v.info(f"ready {time.monotonic() - t0:.2f} s after start")
        recs: list[Rec] = []
        end = time.monotonic() + 6
        path = lambda: f"/fibonacci?n={random.randint(0, 1000)}"
        await asyncio.gather(*[client(svc.port, path, lambda: time.monotonic() > end, recs) for _ in range(16)])
        lat = [r.latency for r in recs if r.status == 200]
        v.info("load: " + summary(recs))
        v.check(len(lat) > 1000, f"load really ran ({len(lat)} answers)")
        v.check(all(r.status == 200 for r in recs), "every request answered 200, no connection error")
        v.check(pct(lat, 99) < 0.25, f"p99 latency under 250 ms ({ms(pct(lat, 99))})")
        v.check(max(lat, default=0) < 1.0, f"no request slower than 1 s ({ms(max(lat, default=0))})")
        if stats is not None:
            v.info(f"black hole: {stats['connections']} connections from the exporter, {stats['bytes']} bytes "
                   f"received, none answered")
            v.check(stats["connections"] > 0, "the exporter did try the black hole")
        # Measured: about drain + 2.5 s with the port closed, drain + 5 s black-holed
        # (the SDK's shutdown gives up on the batch exporter after 5 s).
        bound = drain + (8 if blackhole else 6)
        rc, took = await svc.stop(bound + 10)
        v.check(rc == 0 and took <= bound, f"exit 0 on SIGTERM within drain + {bound - drain} s = {bound} s "
                f"(exit {rc} after {took:.2f} s)")
        errors = [line for line in svc.log_lines() if line.get("level") == "ERROR"]
        v.info(f"service log: {len(errors)} ERROR lines"
               + (f", first: {json.dumps(errors[0])[:300]}" if errors else ""))
    finally:
        svc.kill()
        if closed is not None:
            closed.close()
        if server is not None:
            for w in server.writers:  # type: ignore[attr-defined]
                w.close()
            server.close()


OVERLOAD_WRK_SCRIPT = r"""
-- Distinct large n per request (100,000..299,999); the harness's reporter counts answers
-- by status and the 503s without "Retry-After: 1" apart.
function init(args)
  counter = 0
end
function request()
  counter = counter + 1
  local n = 100000 + ((counter * 2 + id) * 7919) % 200000
  return wrk.format("GET", "/fibonacci?n=" .. n)
end
"""


async def scenario_overload(v: Verdict, tmp: Path) -> None:
    """More concurrent work than MAX_IN_FLIGHT: the excess is shed at once."""
    duration = 10
    svc = Service(tmp, "overload", MAX_IN_FLIGHT="4", MAX_N="300000", CACHE_MAX_BYTES="0", RATE_LIMITS="off",
                  SHUTDOWN_DRAIN_SECONDS="0")
    await svc.ready()
    lua = write_wrk_script(tmp / "overload.lua", OVERLOAD_WRK_SCRIPT)
    # wrk hammers with 128 connections (each sends its next request the moment an
    # answer comes); this process, lightly loaded, measures: a sampler asking for
    # large n one request at a time, and the probes.
    wrk = await asyncio.create_subprocess_exec(
        "wrk", "-t2", "-c128", f"-d{duration}s", "--timeout", "10s", "-s", lua, f"http://127.0.0.1:{svc.port}/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent)
    samples: list[Rec] = []
    probes: list[tuple[str, int | None, float]] = []
    rss: list[int] = []
    in_flight: list[float] = []
    t_end = time.monotonic() + duration - 0.5
    done = lambda: time.monotonic() > t_end
    sample_n = iter(range(10**9))

    async def sampler() -> None:
        # One request at a time, each on a new connection, 20 ms apart.
        await asyncio.sleep(0.5)
        while not done():
            t = time.monotonic()
            try:
                status, headers, body = await fetch(svc.port, f"/fibonacci?n={299_999 - next(sample_n)}", timeout=10)
                samples.append(Rec(t, time.monotonic(), status, headers=headers, body=body[:500]))
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                samples.append(Rec(t, time.monotonic(), error=error_kind(e)))
            await asyncio.sleep(0.02)

    async def prober() -> None:
        await asyncio.sleep(0.5)
        while not done():
            for p in ("/health", "/readyz"):
                t = time.monotonic()
                try:
                    status, _, _ = await fetch(svc.port, p, timeout=5)
                except (TimeoutError, OSError, asyncio.IncompleteReadError):
                    status = None
                probes.append((p, status, time.monotonic() - t))
            rss.append(vm_kib(svc.pid, "VmRSS"))
            try:
                in_flight.append(metric(await svc.metrics(), "http_requests_in_flight") or 0)
            except (TimeoutError, OSError, RuntimeError):
                pass
            await asyncio.sleep(0.1)

    await asyncio.gather(sampler(), prober())
    assert wrk.stdout is not None
    out = (await asyncio.wait_for(wrk.stdout.read(), 15)).decode()
    await wrk.wait()
    hwm = vm_kib(svc.pid, "VmHWM")
    text = await svc.metrics()
    res = wrk_report(out)
    if not v.check(res is not None, "wrk finished and reported"):
        print(out)
        return
    assert res is not None
    st = res["statuses"]
    v.info(f"wrk, 128 connections: {res['requests']} requests in {duration} s, statuses {st}, errors {res['errors']}, "
           f"latency p50 {res['latency_p50_us'] / 1000:.1f} ms, p99 {res['latency_p99_us'] / 1000:.1f} ms, "
           f"max {res['latency_max_us'] / 1000:.1f} ms")
    v.check(st.get("200", 0) > 100, f"work still gets done ({st.get('200', 0)} answered 200)")
    v.check(st.get("503", 0) > st.get("200", 0), f"the excess is shed ({st.get('503', 0)} answered 503)")
    v.check(set(st) <= {"200", "503"} and sum(res["errors"].values()) == 0,
            "nothing but 200 and 503, no connection error")
    v.check(res["bad503"] == 0, f"every 503 carries Retry-After: 1 ({res['bad503']} did not)")
    ok = [r.latency for r in samples if r.status == 200]
    shed = [r for r in samples if r.status == 503]
    v.info(f"sampler (one request at a time): {summary(samples)}")
    v.info(f"  200: p50 {ms(pct(ok, 50))}, max {ms(max(ok, default=0))}; 503: p50 "
           f"{ms(pct([r.latency for r in shed], 50))}, p99 {ms(pct([r.latency for r in shed], 99))}, "
           f"max {ms(max((r.latency for r in shed), default=0))}")
    v.check(len(shed) >= 50, f"the sampler saw the shedding ({len(shed)} of its {len(samples)} requests got 503)")
    # Measured by a client on a machine whose two cores wrk and the service saturate,
    # so generous; the server-side figure below is the tight one.
    shed_lat = [r.latency for r in shed]
    v.check(pct(shed_lat, 50) < 0.1 and max(shed_lat, default=9) < 1.0,
            f"503s are fast as the client sees them: median {ms(pct(shed_lat, 50))} < 100 ms, "
            f"max {ms(max(shed_lat, default=0))} < 1 s")
    v.check(all(s.status in (200, 503) for s in samples), "the sampler got nothing but 200 and 503")
    bad_503 = []
    for r in shed:
        try:
            body = json.loads(r.body or b"")
            headers = r.headers or {}
            good = (headers.get("retry-after") == "1" and isinstance(body.get("error"), str)
                    and headers.get("content-type", "").startswith("application/json"))
        except ValueError:
            good = False
        if not good:
            bad_503.append(r)
    v.check(not bad_503, "every sampled 503 is JSON {\"error\": ...} with Retry-After: 1"
            + (f" (not: {bad_503[0].headers} {bad_503[0].body!r})" if bad_503 else ""))
    below, total = histogram_share(text, "http_request_duration_seconds", "0.005", route="/fibonacci", status="503")
    v.info(f"server side: {below:.0f} of {total:.0f} 503s answered within 5 ms "
           f"(http_request_duration_seconds); in flight sampled: max {max(in_flight, default=0):.0f}")
    v.check(total > 0 and below / total >= 0.99, f"server side: 99% of 503s within 5 ms ({below / max(total, 1):.2%})")
    below, total = histogram_share(text, "http_request_duration_seconds", "1", route="/fibonacci", status="200")
    v.check(total > 0 and below == total, f"server side: every 200 within 1 s, nothing queued ({below:.0f} of {total:.0f})")
    probe_lat = [lat for _, s, lat in probes]
    v.info(f"probes: {len(probes)}, latency p50 {ms(pct(probe_lat, 50))}, max {ms(max(probe_lat, default=0))}")
    v.check(len(probes) >= 20 and all(s == 200 for _, s, _ in probes), "/health and /readyz answer 200 throughout")
    v.check(max(probe_lat, default=9) < 1.0, f"probes answer promptly (max {ms(max(probe_lat, default=0))} < 1 s)")
    v.info(f"RSS during the overload: {min(rss) // 1024}..{max(rss) // 1024} MiB; VmHWM {hwm / 1024:.1f} MiB")
    v.check(hwm < 200 * 1024, f"peak RSS (VmHWM) under 200 MiB ({hwm / 1024:.1f} MiB)")
    rc, took = await svc.stop(20)
    v.check(rc == 0, f"exit 0 on SIGTERM afterwards (took {took:.1f} s)")


async def scenario_slow_clients(v: Verdict, tmp: Path) -> None:
    """Slowloris: heads trickled a byte a second, bodies announced and never sent."""
    header_timeout = 2.0
    margin = 1.5
    # The service's own per-address limits: the attack comes from one address, 127.0.0.1;
    # the fresh client is another one.
    svc = Service(tmp, "slow-clients", HEADER_READ_TIMEOUT_MS=str(int(header_timeout * 1000)), RATE_LIMITS="off",
                  SHUTDOWN_DRAIN_SECONDS="0", MAX_CONNECTIONS_PER_ADDRESS="64", CONNECTION_RATE_PER_ADDRESS="64")
    await svc.ready()
    fds_before = metric(await svc.metrics(), "process_open_fds")
    observe_until = time.monotonic() + 10
    tricklers: list[dict] = []
    withholders: list[dict] = []

    async def watch_close(reader: asyncio.StreamReader, rec: dict) -> None:
        try:
            while time.monotonic() < observe_until:
                data = await asyncio.wait_for(reader.read(65536), observe_until - time.monotonic())
                if not data:
                    rec["closed"] = time.monotonic()
                    return
                rec.setdefault("first_data", time.monotonic())
                rec["data"] = rec.get("data", b"") + data
        except TimeoutError:
            pass
        except OSError:
            rec["closed"] = time.monotonic()

    async def connect(rec: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to the service, its start (or its failure) noted in `rec`."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        except OSError as e:
            rec["connect_error"] = str(e)
            return None
        rec["t0"] = time.monotonic()
        return reader, writer

    async def trickler() -> None:
        rec: dict = {}
        tricklers.append(rec)
        if (conn := await connect(rec)) is None:
            return
        reader, writer = conn
        watcher = asyncio.ensure_future(watch_close(reader, rec))
        head = request_bytes("/fibonacci?n=1", "X-Padding: " + "a" * 40 + "\r\n")
        for byte in head:
            if "closed" in rec or time.monotonic() > observe_until:
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except OSError:
                rec.setdefault("closed", time.monotonic())
                break
            await asyncio.sleep(1)
        await watcher
        writer.close()

    async def withholder() -> None:
        rec: dict = {}
        withholders.append(rec)
        if (conn := await connect(rec)) is None:
            return
        reader, writer = conn
        writer.write(request_bytes("/fibonacci?n=1", "Content-Length: 1000\r\n"))
        await watch_close(reader, rec)
        writer.close()

    fresh: list[tuple[int | None, float]] = []

    async def fresh_client() -> None:
        await asyncio.sleep(0.5)
        end = time.monotonic() + 3
        while time.monotonic() < end:
            t = time.monotonic()
            try:
                status, _, _ = await fetch(svc.port, "/fibonacci?n=10", timeout=5)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                status = None
            fresh.append((status, time.monotonic() - t))
            await asyncio.sleep(0.2)

    fds_during: list[float] = []

    async def fd_sampler() -> None:
        await asyncio.sleep(1.0)
        fds_during.append(metric(await svc.metrics(), "process_open_fds") or 0)

    t_start = time.monotonic()
    await asyncio.gather(*[trickler() for _ in range(500)], *[withholder() for _ in range(200)],
                         fresh_client(), fd_sampler())
    fds_after = metric(await svc.metrics(), "process_open_fds")
    v.info(f"{len(tricklers)} tricklers and {len(withholders)} withholders opened in "
           f"{max(r.get('t0', t_start) for r in tricklers + withholders) - t_start:.2f} s; "
           f"service open fds: {fds_before:.0f} before, {fds_during[0] if fds_during else float('nan'):.0f} "
           f"1 s in, {fds_after:.0f} at the end")
    lat = [lat for _, lat in fresh]
    v.check(len(fresh) >= 5 and all(s == 200 for s, _ in fresh),
            f"a fresh client gets 200 while they are open ({len(fresh)} requests: {sorted({str(s) for s, _ in fresh})})")
    v.check(max(lat, default=9) < 1.0, f"... each within 1 s (max {ms(max(lat, default=0))})")
    refused = metric(await svc.metrics(), "http_connections_refused_total") or 0
    v.info(f"connections refused by the per-address limits: {refused:.0f} of {len(tricklers) + len(withholders)}")
    v.check(refused >= len(tricklers) + len(withholders) - 64,
            "one address holds at most MAX_CONNECTIONS_PER_ADDRESS=64 of them; the rest are closed at once")
    cut = [r["closed"] - r["t0"] for r in tricklers if "closed" in r]
    v.info(f"tricklers cut after {min(cut, default=0):.2f}..{max(cut, default=0):.2f} s "
           f"({len(cut)} of {len(tricklers)}); any answer: {sum(1 for r in tricklers if 'data' in r)}")
    v.check(len(cut) == len(tricklers) and max(cut) <= header_timeout + margin,
            f"every trickler cut within HEADER_READ_TIMEOUT_MS + {margin} s = {header_timeout + margin} s")
    answered = [r for r in withholders if r.get("data")]
    statuses = sorted({r["data"].split(b" ", 2)[1].decode() for r in answered})
    w_cut = [r["closed"] - r["t0"] for r in withholders if "closed" in r]
    v.info(f"withheld bodies: {len(answered)} of {len(withholders)} answered (status {', '.join(statuses)}) "
           f"without waiting for the body; connection closed by the server after "
           f"{min(w_cut, default=0) * 1000:.0f}..{max(w_cut, default=0) * 1000:.0f} ms ({len(w_cut)} of "
           f"{len(withholders)}; {len(withholders) - len(w_cut)} still open after "
           f"{observe_until - t_start:.0f} s)")
    v.check(len(w_cut) == len(withholders) and max(w_cut) <= header_timeout + margin,
            f"every connection whose body never came closed within {header_timeout + margin} s")
    v.check(fds_after is not None and fds_before is not None and fds_after <= fds_before + 10,
            "the service's open fds are back to where they were")
    rc, took = await svc.stop(20)
    v.check(rc == 0, f"exit 0 on SIGTERM afterwards (took {took:.1f} s)")


# The memory model's cost of one connection holding a request head at the cap
# (docs/reliability.md "Memory stays flat"; the chart sizes its limit with it): hyper's
# read buffer grows 8 -> 24 -> 48 KiB on its way to the 32 KiB cap, plus its 8 KiB
# write buffer and the connection's task: 51-60 KiB measured for one wave. While such
# connections churn, heap freed by the last wave but not yet reused or trimmed adds to
# it (a second wave measured 52-64 KiB per connection, in one CI run 64.2): hence 96.
HELD_HEAD_KIB = 96


async def scenario_held_heads(v: Verdict, tmp: Path) -> None:
    """Connections parked on an unfinished request head just under the 32 KiB cap: the
    most memory a client can make one connection hold. MAX_CONNECTIONS bounds them, so
    it bounds the memory; the heap they took goes back to the kernel once they close."""
    addresses, per_address, cap, waves = 20, 64, 1024, 2
    # The client's sockets and the service's (it inherits this limit) exceed the usual
    # soft limit of 1,024 descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    # Scraped on the admin port: the API port is full.
    svc = Service(tmp, "held-heads", RATE_LIMITS="off", HEADER_READ_TIMEOUT_MS="60000", SHUTDOWN_DRAIN_SECONDS="0",
                  MAX_CONNECTIONS=str(cap), MAX_CONNECTIONS_PER_ADDRESS=str(per_address),
                  CONNECTION_RATE_PER_ADDRESS=str(per_address), ADMIN_LISTEN_ADDR="127.0.0.1:0")
    admin = int(next(r["admin_addr"] for r in svc.log_lines() if r.get("message") == "serving").rsplit(":", 1)[1])
    for _ in range(100):  # /readyz is on the admin port only
        if (await fetch(admin, "/readyz"))[0] == 200:
            break
        await asyncio.sleep(0.05)

    async def scrape() -> str:
        status, _, body = await fetch(admin, "/metrics", timeout=5)
        assert status == 200, f"/metrics on the admin port answered {status}"
        return body.decode()

    await asyncio.sleep(1.0)  # past start-up's first sweep
    rss_before = vm_kib(svc.pid, "VmRSS")
    # No end of head (\r\n\r\n): hyper keeps reading, and keeps the buffer.
    head = request_bytes("/fibonacci?n=1", "X-Padding: " + "a" * (31 * 1024 + 512) + "\r\n")[:-4]
    loop = asyncio.get_running_loop()
    writers: list[asyncio.StreamWriter] = []

    async def hold(address: str) -> None:
        sock = socket.socket()
        sock.bind((address, 0))
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", svc.port))
            _, writer = await asyncio.open_connection(sock=sock)
            writer.write(head)
            await writer.drain()
            writers.append(writer)
        except OSError:
            sock.close()

    # Two waves: the second lands on the heap the first freed (before a trim), the
    # worst case for pages already touched.
    peak_growth = 0
    for wave in range(waves):
        for w in writers:
            w.close()
        writers.clear()
        await asyncio.gather(*[hold(f"127.0.0.{2 + a}") for a in range(addresses) for _ in range(per_address)])
        # Until the service holds them all (the scrape's own connection is on the admin
        # port, counted too) and has read their heads: RSS up by 31 KiB each at least.
        deadline = time.monotonic() + 10
        open_now = 0.0
        while time.monotonic() < deadline:
            open_now = metric(await scrape(), "http_connections_open") or 0
            if open_now >= cap + 1 and vm_kib(svc.pid, "VmRSS") - rss_before >= cap * 31:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        growth = vm_kib(svc.pid, "VmRSS") - rss_before
        peak_growth = max(peak_growth, growth)
        v.info(f"wave {wave + 1}: {addresses * per_address} connections tried, {open_now - 1:.0f} held; RSS "
               f"{rss_before / 1024:.1f} MiB before, +{growth / 1024:.1f} MiB: {growth / cap:.1f} KiB per connection")
        v.check(open_now - 1 == cap and growth >= cap * 31,
                f"wave {wave + 1}: the service holds MAX_CONNECTIONS={cap} connections and has read their heads "
                f"(RSS up by at least 31 KiB each)")
    v.check(peak_growth <= cap * HELD_HEAD_KIB,
            f"RSS grew by at most MAX_CONNECTIONS x {HELD_HEAD_KIB} KiB = {cap * HELD_HEAD_KIB / 1024:.0f} MiB "
            f"(the memory model's figure; at most {peak_growth / 1024:.1f} MiB)")
    closed_at = time.monotonic()
    for w in writers:
        w.close()
    returned = None
    while time.monotonic() - closed_at < 7.0:
        await asyncio.sleep(0.25)
        if vm_kib(svc.pid, "VmRSS") <= rss_before + 8 * 1024:
            returned = time.monotonic() - closed_at
            break
    v.check(returned is not None,
            f"RSS back within 8 MiB of where it was {ms(returned) if returned is not None else 'never'} after they "
            f"closed (within 7 s: jemalloc purges freed pages after ~1 s; now "
            f"{vm_kib(svc.pid, 'VmRSS') / 1024:.1f} MiB)")
    # Every connection past the cap is refused. In the second wave some are refused by
    # the per-address rate instead (CONNECTION_RATE_PER_ADDRESS: the first wave spent
    # each address's burst a few seconds before), so count every reason there.
    text = await scrape()
    at_cap = metric(text, "http_connections_refused_total", reason="max_connections") or 0
    refused = metric(text, "http_connections_refused_total") or 0
    v.check(at_cap >= addresses * per_address - cap and refused >= waves * (addresses * per_address - cap),
            f"the excess refused: {refused:.0f} of {waves * addresses * per_address} ({at_cap:.0f} as max_connections, "
            f"at least the first wave's {addresses * per_address - cap})")
    status, _, _ = await fetch(svc.port, "/fibonacci?n=10")
    v.check(status == 200, "and the service serves as before")
    rc, took = await svc.stop(20)
    v.check(rc == 0, f"exit 0 on SIGTERM afterwards (took {took:.1f} s)")


async def scenario_slow_readers(v: Verdict, tmp: Path) -> None:
    """Clients that pipeline hundreds of requests and never read the answers."""
    write_timeout = 1.0
    margin = 2.0
    conns, pipelined = 50, 400
    svc = Service(tmp, "slow-readers", WRITE_TIMEOUT_MS=str(int(write_timeout * 1000)), RATE_LIMITS="off",
                  MAX_N="100000", SHUTDOWN_DRAIN_SECONDS="0")
    await svc.ready()
    # Warm the one answer they all ask for, so the test is about buffering, not computing.
    await fetch(svc.port, "/fibonacci?n=100000", timeout=30)
    rss_before = vm_kib(svc.pid, "VmRSS")
    head = request_bytes("/fibonacci?n=100000") * pipelined
    records: list[dict] = []

    async def reader_that_never_reads() -> None:
        rec: dict = {}
        records.append(rec)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", svc.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        rec["t0"] = time.monotonic()
        writer.write(head)
        try:
            await asyncio.wait_for(writer.drain(), 10)
        except (TimeoutError, OSError):
            pass
        rec["sent"] = time.monotonic()
        rec["writer"], rec["reader"] = writer, reader

    await asyncio.gather(*[reader_that_never_reads() for _ in range(conns)])
    # ~21 kB answers x 400 x 50 = 420 MB asked for and never read: buffered, it would show.
    peak = rss_before
    deadline = time.monotonic() + write_timeout + margin + 3
    open_now = None
    while time.monotonic() < deadline:
        peak = max(peak, vm_kib(svc.pid, "VmRSS"))
        open_now = metric(await svc.metrics(), "http_connections_open")
        if open_now is not None and open_now <= 1:
            break
        await asyncio.sleep(0.1)
    cut_after = time.monotonic() - max(r["sent"] for r in records)
    v.info(f"{conns} connections x {pipelined} pipelined requests, never read; RSS {rss_before / 1024:.1f} MiB "
           f"before, peak {peak / 1024:.1f} MiB; open connections {open_now} after {cut_after:.1f} s")
    v.check(open_now is not None and open_now <= 1,
            f"every non-reading connection cut within WRITE_TIMEOUT_MS + {margin} s (open: {open_now})")
    v.check(peak - rss_before < 64 * 1024,
            f"RSS grew by {(peak - rss_before) / 1024:.1f} MiB (< 64 MiB): nothing buffers unread answers")
    status, _, _ = await fetch(svc.port, "/fibonacci?n=10")
    v.check(status == 200, "and the service serves as before")
    for r in records:
        r["writer"].close()
    rc, took = await svc.stop(20)
    v.check(rc == 0, f"exit 0 on SIGTERM afterwards (took {took:.1f} s)")


@pytest.mark.usefixtures("needs_wrk")
def test_redis(tmp_path: Path) -> None:
    """Redis killed (SIGKILL) and restarted under load: every answer a 200, no request
    slower than 1 s, redis_up 0 during the outage only and 1 again after, the outage seen
    by the Redis tier, write-back resumed, exit 0 on SIGTERM."""
    run_scenario(lambda v: scenario_redis(v, tmp_path))


def test_sigterm(tmp_path: Path) -> None:
    """SIGTERM under load: every answer a 200, no accepted request lost, no timeout,
    /readyz 503 during the drain while /fibonacci on new connections still answers 200,
    exit 0 within drain + 12 s."""
    run_scenario(lambda v: scenario_sigterm(v, tmp_path))


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"], ids=["grpc", "http"])
@pytest.mark.parametrize("blackhole", [False, True], ids=["otlp-closed", "otlp-blackhole"])
def test_otlp(tmp_path: Path, protocol: str, blackhole: bool) -> None:
    """OTLP collector unreachable (closed port) or black-holing (accepts, never answers),
    grpc and http/protobuf: every request 200, p99 < 250 ms, none over 1 s, exit 0 on
    SIGTERM within drain + 6 s (closed) or drain + 8 s (black hole)."""
    run_scenario(lambda v: scenario_otlp(v, tmp_path, protocol, blackhole))


@pytest.mark.usefixtures("needs_wrk")
def test_overload(tmp_path: Path) -> None:
    """MAX_IN_FLIGHT=4 and 128 connections asking for large uncached n: the excess gets
    503 + Retry-After: 1 at once (99% within 5 ms server-side), 200s are not queued
    (every one within 1 s), /health and /readyz answer 200 within 1 s, VmHWM < 200 MiB."""
    run_scenario(lambda v: scenario_overload(v, tmp_path))


def test_slow_clients(tmp_path: Path) -> None:
    """500 connections trickling their head a byte a second and 200 whose body never
    comes: a fresh client is served within 1 s meanwhile, both kinds are cut within
    HEADER_READ_TIMEOUT_MS + 1.5 s, one address holds at most MAX_CONNECTIONS_PER_ADDRESS."""
    run_scenario(lambda v: scenario_slow_clients(v, tmp_path))


def test_held_heads(tmp_path: Path) -> None:
    """1,280 connections from 20 addresses holding a request head just under the 32 KiB
    cap, MAX_CONNECTIONS=1024, in two waves: the excess refused, RSS grows by at most
    96 KiB per held connection and is handed back within 7 s of their closing."""
    run_scenario(lambda v: scenario_held_heads(v, tmp_path))


def test_slow_readers(tmp_path: Path) -> None:
    """50 connections pipelining 400 requests each and never reading: all cut within
    WRITE_TIMEOUT_MS + 2 s, RSS grows by less than 64 MiB, the service serves as before."""
    run_scenario(lambda v: scenario_slow_readers(v, tmp_path))
