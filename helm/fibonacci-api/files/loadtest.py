"""Staging proves itself: the API checks and a short load test against the
in-cluster Service, judged by the chart's SLOs. Exits 1 when a check fails or
the SLO is not met, so the Argo CD PostSync hook (or `helm test`) that runs it
fails the sync.

Only the standard library: it runs in the plain python image, and
scripts/check-deploy runs this very file (from the rendered ConfigMap) against
the real service binary.

The load comes from one pod. Through a trusted proxy: the pod's address is in
the service's TRUSTED_PROXIES, and every request names a random client address
from LOAD_CLIENT_CIDR in X-Forwarded-For, so the per-client rate limits and
per-address connection limits see many clients, as in production, instead of
rejecting one. The first check proves the service believes that header.

With JWT auth on (the chart's ExternalSecret gives AUTH_JWT_HS256_SECRET), every
request carries a token signed with that secret for the service's audience,
its subject the synthetic client (the service counts rate limits by subject).
"""
import base64
import hashlib
import hmac
import ipaddress
import json
import os
import random
import sys
import threading
import time
import http.client
import urllib.parse


def env(name, default=None):
    value = os.environ.get(name, default)
    if value is None:
        sys.exit(f"loadtest: {name} is not set")
    return value


BASE = urllib.parse.urlsplit(env("LOAD_BASE_URL"))
DURATION = float(env("LOAD_DURATION_SECONDS", "30"))
CONCURRENCY = int(env("LOAD_CONCURRENCY", "8"))
MAX_N = int(env("LOAD_MAX_N", "1000"))
CLIENTS = ipaddress.ip_network(env("LOAD_CLIENT_CIDR", "198.18.0.0/15"))
MAX_ERROR_RATIO = float(env("LOAD_MAX_ERROR_RATIO"))
LATENCY_THRESHOLD = float(env("LOAD_LATENCY_THRESHOLD_SECONDS"))
LATENCY_TARGET = float(env("LOAD_LATENCY_TARGET"))
MIN_REQUESTS = int(env("LOAD_MIN_REQUESTS", "200"))
CHECKS = env("LOAD_CHECKS", "true") == "true"
TIMEOUT = float(env("LOAD_REQUEST_TIMEOUT_SECONDS", "10"))
JWT_SECRET = os.environ.get("LOAD_JWT_HS256_SECRET", "")
JWT_AUDIENCE = os.environ.get("LOAD_JWT_AUDIENCE", "")
JWT_ISSUER = os.environ.get("LOAD_JWT_ISSUER", "")

failures = []


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def client_address():
    return str(CLIENTS[random.randrange(CLIENTS.num_addresses)])


def _b64(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def token(subject):
    """An HS256 JWT for this subject, valid ten minutes."""
    claims = {"sub": subject, "iat": int(time.time()), "exp": int(time.time()) + 600,
              # "*" accepts any audience: name one anyway.
              "aud": JWT_AUDIENCE if JWT_AUDIENCE not in ("", "*") else "fibonacci-api-loadtest"}
    if JWT_ISSUER:
        claims["iss"] = JWT_ISSUER
    signing_input = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + _b64(json.dumps(claims).encode())
    signature = hmac.new(JWT_SECRET.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64(signature)).decode()


def connect():
    return http.client.HTTPConnection(BASE.hostname, BASE.port or 80, timeout=TIMEOUT)


def get(path, client=None, conn=None):
    """One GET: (status, headers, body). A fresh connection unless given one."""
    own = conn is None
    conn = conn or connect()
    try:
        client = client or client_address()
        headers = {"X-Forwarded-For": client}
        if JWT_SECRET:
            headers["Authorization"] = f"Bearer {token(client)}"
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        if own:
            conn.close()


def check(ok, what):
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)


def api_checks():
    status, _, body = get("/health")
    check(status == 200 and json.loads(body).get("status") == "healthy", f"GET /health -> {status} {body[:80]!r}")
    for n in sorted({0, 1, 2, 10, 93, 94, MAX_N // 2, MAX_N}):
        status, _, body = get(f"/fibonacci?n={n}")
        ok = status == 200 and json.loads(body) == {"n": n, "fibonacci": fib(n)}
        check(ok, f"GET /fibonacci?n={n} -> {status}, {'the exact F(n)' if ok else body[:80]}")
    for bad in ("-1", "abc", "1.5", str(MAX_N + 1), ""):
        status, headers, body = get(f"/fibonacci?n={bad}")
        check(status == 400 and headers.get("content-type", "").startswith("application/"),
              f"GET /fibonacci?n={bad} -> {status} (400 expected)")
    status, _, body = get("/openapi.json")
    check(status == 200 and "/fibonacci" in json.loads(body).get("paths", {}), f"GET /openapi.json -> {status}")
    # The rate limiter must see the synthetic client addresses: two requests
    # as client A, then one as client B, who must have more left than A.
    a, b = client_address(), client_address()
    get("/fibonacci?n=5", client=a)
    _, ha, _ = get("/fibonacci?n=5", client=a)
    _, hb, _ = get("/fibonacci?n=5", client=b)
    if "ratelimit-remaining" in ha:
        left_a, left_b = int(ha["ratelimit-remaining"]), int(hb["ratelimit-remaining"])
        check(left_b > left_a, f"X-Forwarded-For believed (client A has {left_a} left, client B {left_b}); "
              "if not, this pod is outside TRUSTED_PROXIES and every request counts as one client")
        # One client past its smallest limit is answered 429 with Retry-After.
        limit = int(ha.get("ratelimit-limit", "0") or 0)
        status = 200
        for _ in range(limit + 1):
            status, headers, _ = get("/fibonacci?n=7", client=b)
            if status == 429:
                break
        check(status == 429 and "retry-after" in headers, f"client past RateLimit-Limit {limit} -> {status} with Retry-After")


def load():
    """CONCURRENCY workers for DURATION seconds, each on a keep-alive
    connection, random n and random client address per request."""
    results = []
    lock = threading.Lock()
    deadline = time.monotonic() + DURATION

    def worker():
        local = []
        conn = connect()
        while time.monotonic() < deadline:
            path = f"/fibonacci?n={random.randint(0, MAX_N)}"
            client = client_address()
            start = time.monotonic()
            try:
                status, _, _ = get(path, client=client, conn=conn)
            except (OSError, http.client.HTTPException):
                # A keep-alive connection the server closed (a pod draining,
                # a restart): retried once on a new one, as HTTP clients do
                # for idempotent requests; a second failure counts.
                conn.close()
                conn = connect()
                try:
                    status, _, _ = get(path, client=client, conn=conn)
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = connect()
                    status = 0
            local.append((status, time.monotonic() - start))
        conn.close()
        with lock:
            results.extend(local)

    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main():
    print(f"target {BASE.geturl()}; clients from {CLIENTS}{' with JWTs' if JWT_SECRET else ''}; "
          f"SLO: errors <= {MAX_ERROR_RATIO:.4%}, "
          f"{LATENCY_TARGET:.2%} within {LATENCY_THRESHOLD}s", flush=True)
    if CHECKS:
        api_checks()
    results = load()
    total = len(results)
    errors = sum(1 for status, _ in results if status != 200)
    slow = sum(1 for _, seconds in results if seconds > LATENCY_THRESHOLD)
    latencies = sorted(seconds for _, seconds in results)
    p99 = latencies[int(0.99 * (total - 1))] if total else float("nan")
    summary = {"requests": total, "rps": round(total / DURATION, 1), "errors": errors,
               "error_ratio": round(errors / total, 6) if total else None,
               "slow_ratio": round(slow / total, 6) if total else None, "p99_seconds": round(p99, 4),
               "statuses": {str(s): sum(1 for st, _ in results if st == s) for s in sorted({st for st, _ in results})}}
    print("summary " + json.dumps(summary), flush=True)
    check(total >= MIN_REQUESTS, f"{total} requests in {DURATION:g}s (at least {MIN_REQUESTS} to judge)")
    if total:
        check(errors / total <= MAX_ERROR_RATIO, f"error ratio {errors / total:.4%} <= {MAX_ERROR_RATIO:.4%}")
        check(slow / total <= 1 - LATENCY_TARGET,
              f"{slow / total:.4%} slower than {LATENCY_THRESHOLD}s <= {1 - LATENCY_TARGET:.4%}")
    if failures:
        print(f"loadtest: {len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("loadtest: every check passed and the SLO was met", flush=True)


if __name__ == "__main__":
    main()
