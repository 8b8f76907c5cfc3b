"""API fuzzing from the OpenAPI document: schemathesis against the running service.

    tests/system/run -k api_fuzz

Starts the service on port 0, fetches its /openapi.json and runs schemathesis against
it with every check (`--checks all`, plus a response-time bound and the README's
promises in api_fuzz_hooks.py beside this file), twice:

  1. RATE_LIMITS=off      every request reaches the handler, so valid data must be
                          accepted (positive_data_acceptance) and every 200, 304, 400,
                          405 is checked against the document;
  2. default rate limits  30/minute per client: after 30 requests the answers are 429s,
                          and those are checked against the document too (status,
                          content type, ErrorBody schema, Retry-After).

After each run the service's /metrics must show that the statuses the run is there to
exercise really occurred (200, 304, 400, 405; then 429), the service must exit 0 on
SIGTERM within 15 s, and its log must hold no ERROR line. The document is loaded from a
file (fetched from the service) rather than from its URL, because schemathesis leaves
out the operation it loaded the document from: this way GET /openapi.json is fuzzed too.

Bounds: API_FUZZ_MAX_EXAMPLES (default 1000) test cases per operation and phase,
API_FUZZ_TIMEOUT (default 75) seconds of wall clock per run. API_FUZZ_SEED fixes the
seed (each run prints the one it used, to reproduce a failure). Schemathesis's own
JUnit report of each phase is kept in target/artifacts/api-fuzz-PHASE.xml.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import ARTIFACTS, Service, Verdict, http_get, statuses_by_route

HERE = Path(__file__).resolve().parent
MAX_EXAMPLES = os.environ.get("API_FUZZ_MAX_EXAMPLES", "1000")
RUN_TIMEOUT = int(os.environ.get("API_FUZZ_TIMEOUT", "75"))
SEED = os.environ.get("API_FUZZ_SEED", "")


def schemathesis() -> str:
    # The venv's, beside the interpreter running pytest (tests/system/run makes both).
    beside = Path(sys.executable).parent / "schemathesis"
    found = str(beside) if beside.exists() else shutil.which("schemathesis")
    if not found:
        pytest.fail("schemathesis is not installed (tests/system/run installs it)")
    return found


@pytest.mark.parametrize(("name", "limited"), [("no-limits", False), ("default-limits", True)],
                         ids=["no-limits", "default-limits"])
def test_api_fuzz(tmp_path: Path, name: str, limited: bool) -> None:
    """Schemathesis with every check finds nothing; the statuses the phase is there to
    exercise occurred (200, 304, 400 and 405 without limits; 429 with them); exit 0 on
    SIGTERM within 15 s; no ERROR in the service's log."""
    v = Verdict()
    if limited:
        svc = Service(tmp_path, name, SHUTDOWN_DRAIN_SECONDS="0")
    else:
        svc = Service(tmp_path, name, SHUTDOWN_DRAIN_SECONDS="0", RATE_LIMITS="off")
    deadline = time.monotonic() + 10
    while http_get(svc.base + "/livez", 1)[0] != 200:
        assert time.monotonic() < deadline, f"the service did not answer /livez within 10 s:\n{svc.tail()}"
        time.sleep(0.1)
    status, document = http_get(svc.base + "/openapi.json")
    assert status == 200, f"/openapi.json answered {status}"
    (tmp_path / "openapi.json").write_bytes(document)

    report = ARTIFACTS / f"api-fuzz-{name}.xml"
    # --checks all: every built-in check plus the hooks' own. A generous response-time
    #   bound (the debug binary answers in milliseconds) catches a stall.
    # --generation-database none: nothing is written into the work tree.
    cmd = [schemathesis(), "run", str(tmp_path / "openapi.json"), "--url", svc.base, "--checks", "all",
           "--max-response-time", "2", "--max-examples", MAX_EXAMPLES, "--generation-database", "none",
           "--request-timeout", "10", "--no-color", "--report", "junit", "--report-junit-path", str(report)]
    if SEED:
        cmd += ["--seed", SEED]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="api_fuzz_hooks", PYTHONPATH=str(HERE), PYTHONDONTWRITEBYTECODE="1",
               FUZZ_RATE_LIMITED="1" if limited else "0", FUZZ_MAX_N="1000")
    start = time.monotonic()
    try:
        rc: int | None = subprocess.run(cmd, cwd=tmp_path, env=env, timeout=RUN_TIMEOUT,
                                               check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"schemathesis did not finish within {RUN_TIMEOUT}s")
        rc = None
    v.info(f"(schemathesis took {time.monotonic() - start:.0f}s)")
    v.check(rc == 0, f"{name}: schemathesis, all checks, zero failures (exit {rc})")

    seen = statuses_by_route(http_get(svc.base + "/metrics")[1].decode(), "/fibonacci")
    v.info("/fibonacci answers seen: " + ", ".join(f"{s}: {int(c)}" for s, c in sorted(seen.items())))
    wanted = ["429"] if limited else ["200", "304", "400", "405"]
    missing = [s for s in wanted if not seen.get(s)]
    v.check(not missing, f"{name}: {', '.join(wanted)} responses occurred and were checked"
            + (f" (missing: {', '.join(missing)}: the run did not exercise them)" if missing else ""))

    code = svc.stop_sync(15)
    v.check(code == 0, f"{name}: service exits 0 on SIGTERM within 15 s afterwards (exit {code})")
    errors = [line for line in svc.log_lines() if line.get("level") == "ERROR"]
    v.check(not errors, f"{name}: the service logged no ERROR"
            + (": " + "; ".join(json.dumps(e)[:300] for e in errors[:5]) if errors else ""))
    v.done()
