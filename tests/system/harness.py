"""The one copy of the system tests' plumbing: processes, the service, Redis, metrics, HTTP.

Owns: where the binary is ($FIBONACCI_API_BIN), starting it on port 0 and reading the
address it bound from its "serving" log line (as tests/api/helpers.rs does), private
redis-server processes (port retried when the bind loses a race), a closed port that
stays closed, Prometheus text parsing, a raw asyncio HTTP/1.1 client with per-request
records, and process cleanup: every child dies with the test run (PR_SET_PDEATHSIG)
and is killed when its test ends (`kill_all`, called by conftest.py).

Nothing here asserts: the scenarios in test_*.py do, through `Verdict`.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
# Every artifact a run keeps (JUnit XML, screenshot) goes here; the rest is per-test tmp.
ARTIFACTS = ROOT / "target" / "artifacts"
PROCS: list[subprocess.Popen[bytes]] = []


def binary() -> str:
    """The service binary under test: $FIBONACCI_API_BIN, else the debug build."""
    return os.environ.get("FIBONACCI_API_BIN") or str(ROOT / "target" / "debug" / "fibonacci-api")


def cargo_target_dir() -> Path:
    """Where cargo puts its builds (CARGO_TARGET_DIR is honoured, as cargo does)."""
    return Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")


# ------------------------------------------------------------------ processes --


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when pytest dies, even by SIGKILL, so nothing
    outlives the run."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(args: list[str], *, env: dict[str, str] | None = None, log: Path | None = None,
          pipe: bool = False) -> subprocess.Popen[bytes]:
    """A child registered for cleanup; its output to `log`, a pipe, or nowhere."""
    out: IO[bytes] | int
    if pipe:
        out = subprocess.PIPE
    elif log is not None:
        out = open(log, "wb")  # noqa: SIM115 (the child owns it; closed with the process)
    else:
        out = subprocess.DEVNULL
    # preexec_fn is unsafe only with threads forking; the tests start none.
    proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent)  # noqa: PLW1509
    PROCS.append(proc)
    return proc


def kill_all() -> None:
    """Kills every child still running (after each test, and at exit)."""
    while PROCS:
        proc = PROCS.pop()
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


class ClosedPort:
    """A loopback port bound but not listening, held for the test: connecting to it is
    refused, and no other process can take it meanwhile (a port picked and released
    could be bound by someone else before the test is done with it)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def vm_kib(pid: int, field_name: str) -> int:
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} for pid {pid}")


# ------------------------------------------------------------------- metrics --


def metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels`; None if there is none."""
    total = None
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.MULTILINE):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total = (total or 0.0) + float(m.group(2))
    return total


def histogram_share(text: str, name: str, le: str, **labels: str) -> tuple[float, float]:
    """(count of observations <= le, total count) of a Prometheus histogram."""
    below = metric(text, name + "_bucket", le=le, **labels) or 0.0
    total = metric(text, name + "_count", **labels) or 0.0
    return below, total


def statuses_by_route(text: str, route: str) -> dict[str, float]:
    """http_requests_total of one route, summed by status."""
    seen: dict[str, float] = {}
    for m in re.finditer(r"^http_requests_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("route") == route:
            seen[labels["status"]] = seen.get(labels["status"], 0) + float(m.group(2))
    return seen


# --------------------------------------------------------------------- service --


def serving_addr(line: str) -> str | None:
    """The bound address from the service's "serving" log line (JSON or text format)."""
    try:
        record = json.loads(line)
    except ValueError:
        rest = line.split(" serving ", 1)[1] if " serving " in line else ""
        m = re.search(r'addr="([^"]+)"', rest)
        return m.group(1) if m else None
    if isinstance(record, dict) and record.get("message") == "serving":
        return str(record.get("addr") or "") or None
    return None


class Service:
    """The service binary on 127.0.0.1 port 0, its environment set from scratch over
    these defaults; `port` is read from its "serving" line, so no port is ever picked
    here and bound later by another process."""

    def __init__(self, tmp: Path, name: str, *, bin_path: str | None = None, per_address_limits: bool = False,
                 **env: str) -> None:
        self.log = tmp / f"{name}.log"
        full = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LISTEN_ADDR": "127.0.0.1:0",
            "LOG_FORMAT": "json",
            "RUST_LOG": "info",
        }
        if not per_address_limits:
            # wrk and schemathesis on 127.0.0.1 stand for many clients: per-address
            # connection limits off, except where a scenario sets them or runs on the
            # service's defaults (per_address_limits=True).
            full.update(MAX_CONNECTIONS_PER_ADDRESS="0", CONNECTION_RATE_PER_ADDRESS="0")
        full.update(env)
        # However quiet the scenario wants the log, the line with the address must come.
        full["RUST_LOG"] += ",fibonacci_api::serving=info"
        self.env = full
        self.started = time.monotonic()
        self.proc = spawn([bin_path or binary()], env=full, log=self.log)
        self.pid = self.proc.pid
        self.port = self._wait_serving()
        self.base = f"http://127.0.0.1:{self.port}"

    def _wait_serving(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        offset = 0
        pending = b""
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                addr = serving_addr(line.decode(errors="replace"))
                if addr:
                    return int(addr.rsplit(":", 1)[1])
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode} at start:\n{self.tail()}")
            time.sleep(0.02)
        raise RuntimeError(f"service logged no 'serving' line within {timeout:.0f} s:\n{self.tail()}")

    async def ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode} at start:\n{self.tail()}")
            try:
                status, _, _ = await fetch(self.port, "/readyz", timeout=1)
                if status == 200:
                    return
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"service not ready within {timeout:.0f} s")

    async def metrics(self) -> str:
        status, _, body = await fetch(self.port, "/metrics", timeout=5)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return body.decode()

    async def stop(self, bound: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if still running after `bound` s, seconds taken)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        while time.monotonic() - t0 < bound and self.proc.poll() is None:
            await asyncio.sleep(0.02)
        took = time.monotonic() - t0
        if self.proc.poll() is None:
            self.kill()
            return None, took
        return self.proc.returncode, took

    def stop_sync(self, bound: float) -> int | None:
        """SIGTERM and wait; the exit code, or None if it outlived `bound` s (then killed)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 10) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        with open(self.log, errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    out.append(record)
        return out


# ----------------------------------------------------------------------- Redis --


def redis_command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    payload = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(4096)


def redis_dbsize(port: int) -> int:
    """DBSIZE, or -1 when Redis does not answer."""
    try:
        reply = redis_command(port, "DBSIZE").decode().strip()
    except OSError:
        return -1
    return int(reply[1:]) if reply.startswith(":") else -1


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    """A private redis-server on loopback, without persistence. redis-server cannot
    report a port it chose, so one is picked and, when the bind loses a race with
    another process (the server exits at once), picked again."""

    def __init__(self, tmp: Path, name: str = "redis") -> None:
        self.tmp = tmp
        self.name = name
        self.starts = 0
        for _ in range(10):
            self.port = unused_port()
            if self._start():
                return
        raise RuntimeError("redis-server did not start on any of 10 ports")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _start(self) -> bool:
        self.starts += 1
        self.proc = spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", str(self.tmp)],
                          log=self.tmp / f"{self.name}-{self.starts}.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # most likely the port was taken meanwhile
            try:
                if redis_command(self.port, "PING").startswith(b"+PONG"):
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def kill(self) -> None:
        """SIGKILL, as an outage."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        """A new, empty redis-server on the same port (the service's REDIS_URL names it);
        retried a few times in case the freed port is briefly taken."""
        self.kill()
        for _ in range(20):
            if self._start():
                return
            time.sleep(0.25)
        raise RuntimeError(f"redis-server did not restart on port {self.port}")


# ----------------------------------------------------------------- HTTP client --


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A blocking GET: (status, body); (0, b"") when the server cannot be reached."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length and status not in (204, 304) else b""
    return status, headers, body


def request_bytes(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


async def fetch(port: int, path: str, *, timeout: float = 5.0, extra: str = "",
                source: str = "127.0.0.2") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection from `source`: probes and fresh clients come
    from 127.0.0.2, a client of their own beside the load on 127.0.0.1."""

    async def go() -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        try:
            writer.write(request_bytes(path, extra + "Connection: close\r\n"))
            return await read_response(reader)
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


@dataclass(slots=True)
class Rec:
    t0: float  # request sent (or connect attempted)
    t1: float  # response complete (or error seen)
    status: int | None = None
    error: str | None = None  # connect-refused, connect-error, eof, reset, timeout
    fresh: bool = False  # first request on its connection
    headers: dict[str, str] | None = None  # kept for non-200 answers
    body: bytes | None = None

    @property
    def latency(self) -> float:
        return self.t1 - self.t0


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "eof"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    return type(exc).__name__


async def client(port: int, next_path: Callable[[], str], until: Callable[[], bool], out: list[Rec], *,
                 timeout: float = 15.0, extra_fn: Callable[[], str] | None = None) -> None:
    """One keep-alive connection sending requests back to back until `until()` is true;
    reconnects after an error or a `Connection: close`."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    fresh = False
    while not until():
        if writer is None or reader is None:
            t = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
                fresh = True
            except ConnectionRefusedError:
                out.append(Rec(t, time.monotonic(), error="connect-refused", fresh=True))
                await asyncio.sleep(0.05)
                continue
            except (TimeoutError, OSError) as e:
                out.append(Rec(t, time.monotonic(), error="connect-" + error_kind(e), fresh=True))
                await asyncio.sleep(0.05)
                continue
        assert reader is not None and writer is not None  # connected above, or continued
        path = next_path()
        extra = extra_fn() if extra_fn else ""
        t0 = time.monotonic()
        try:
            writer.write(request_bytes(path, extra))
            status, headers, body = await asyncio.wait_for(read_response(reader), timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            out.append(Rec(t0, time.monotonic(), error=error_kind(e), fresh=fresh))
            writer.close()
            reader = writer = None
            continue
        t1 = time.monotonic()
        if status == 200:
            out.append(Rec(t0, t1, status, fresh=fresh))
        else:
            out.append(Rec(t0, t1, status, fresh=fresh, headers=headers, body=body[:500]))
        fresh = False
        if headers.get("connection", "").lower() == "close":
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def summary(recs: list[Rec]) -> str:
    lat = [r.latency for r in recs if r.status is not None]
    statuses: dict[Any, int] = {}
    for r in recs:
        key = r.status if r.status is not None else r.error
        statuses[key] = statuses.get(key, 0) + 1
    return (f"{len(recs)} requests, {', '.join(f'{k}: {v}' for k, v in sorted(statuses.items(), key=str))}; "
            f"latency p50 {ms(pct(lat, 50))}, p99 {ms(pct(lat, 99))}, max {ms(max(lat, default=0))}")


# The half of every scenario's wrk script that counts and reports: per thread, the answers
# by status and the 503s without "Retry-After: 1"; at the end one WRK_JSON line that
# wrk_report() parses. A scenario's own half defines init() and request().
WRK_REPORTER_LUA = r"""
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
function response(status, headers, body)
  counts = counts or {}
  bad503 = bad503 or 0
  counts[status] = (counts[status] or 0) + 1
  if status == 503 and headers["retry-after"] ~= "1" then bad503 = bad503 + 1 end
end
function done(summary, latency, requests)
  local all, bad = {}, 0
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("counts") or {}) do
      all[tostring(status)] = (all[tostring(status)] or 0) + n
    end
    bad = bad + (t:get("bad503") or 0)
  end
  local parts = {}
  for status, n in pairs(all) do table.insert(parts, string.format('"%s": %d', status, n)) end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "statuses": {%s}, "bad503": %d, "errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, "latency_max_us": %d, "latency_p99_us": %d, "latency_p50_us": %d}\n',
    summary.requests, summary.duration, table.concat(parts, ", "), bad, e.connect, e.read, e.write, e.timeout,
    latency.max, latency:percentile(99), latency:percentile(50)))
end
"""


def write_wrk_script(path: Path, requests_lua: str) -> Path:
    """A wrk script at `path`: a scenario's init()/request() and the shared reporter."""
    path.write_text(requests_lua + WRK_REPORTER_LUA)
    return path


def wrk_report(out: str) -> dict[str, Any] | None:
    """The WRK_JSON line the scenarios' Lua scripts print from done(), parsed."""
    m = re.search(r"^WRK_JSON (.*)$", out, re.MULTILINE)
    return json.loads(m.group(1)) if m else None


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


# --------------------------------------------------------------------- verdict --


class Verdict:
    """The assertions of one scenario: each printed as it is made, and the test fails at
    the end listing every one that did not hold (not just the first), as the scripts
    reported them."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, cond: object, text: str) -> bool:
        print(f"  {'ok    ' if cond else 'NOT OK'} {text}", flush=True)
        if not cond:
            self.failed.append(text)
        return bool(cond)

    def info(self, text: str) -> None:
        print(f"  {text}", flush=True)

    @property
    def ok(self) -> bool:
        return not self.failed

    def report(self) -> str:
        return "not met:\n" + "\n".join(f"  - {t}" for t in self.failed)

    def done(self) -> None:
        assert not self.failed, self.report()
