"""pytest wiring of the system tests: command-line options, shared fixtures, cleanup.

Owns: the options (--soak-minutes and the other soak knobs, --update-doc-images, each
also an environment variable so `tests/system/run` passes them through CI), the
check that the service binary exists, the fixtures that require a tool (wrk,
redis-server, chromium), and killing whatever a test started when it ends. The
plumbing itself is harness.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from . import harness


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("system tests")
    group.addoption("--soak-minutes", type=int, default=int(os.environ.get("SOAK_MINUTES", "1")),
                    help="how long the soak drives load (default 1, env SOAK_MINUTES; 60 for a real soak)")
    group.addoption("--soak-clients", type=int, default=int(os.environ.get("SOAK_CLIENTS", "50000")),
                    help="distinct client addresses in the soak (default 50000, at most 131072)")
    group.addoption("--soak-no-outage", action="store_true", default=os.environ.get("SOAK_NO_OUTAGE") == "1",
                    help="keep Redis up the whole soak")
    group.addoption("--soak-env", action="append", default=[], metavar="VAR=VALUE",
                    help="another service setting for the soak, e.g. CACHE_MAX_BYTES=0 (repeatable)")
    group.addoption("--update-doc-images", action="store_true",
                    default=os.environ.get("UPDATE_DOC_IMAGES") == "1",
                    help="the /docs browser check also writes docs/images/docs-page.png (env UPDATE_DOC_IMAGES=1)")


def pytest_configure(config: pytest.Config) -> None:
    # Scenario output (each check as it is made) is part of the record: shown for
    # failures by default, and with -s live.
    harness.ARTIFACTS.mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session", autouse=True)
def service_binary() -> str:
    """Every test runs the service binary: a missing one fails early, saying so."""
    path = harness.binary()
    if not os.access(path, os.X_OK):
        pytest.exit(f"{path} is missing: build it first (cargo build), or set FIBONACCI_API_BIN", returncode=1)
    return path


@pytest.fixture(autouse=True)
def kill_children() -> Iterator[None]:
    """Nothing a test started outlives it, whatever way it ended."""
    yield
    harness.kill_all()


def _require(cmd: str) -> None:
    # tests/system/run installs these; a test run without them fails rather than
    # skipping, so a missing tool never turns a check green.
    if shutil.which(cmd) is None:
        pytest.fail(f"{cmd} is not installed (tests/system/run installs it)")


@pytest.fixture
def needs_wrk() -> None:
    _require("wrk")


@pytest.fixture(autouse=True)
def needs_redis_server() -> None:
    _require("redis-server")
