"""Schemathesis hooks for tests/system/test_api_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

Schemathesis checks every response against the OpenAPI document. These hooks add
what the document cannot say, so that the fuzzing also fails when the service
breaks a promise the README makes:

* conditional requests: about 40% of the generated /fibonacci requests carry an
  If-None-Match (the right ETag, its weak form, `*`, a list, or a wrong one), so 304
  responses are produced and checked against the document too;
* checks (run with every built-in one):
  - fibonacci_is_exact:    a 200 from /fibonacci carries F(n), exactly, for the n asked,
                           with ETag "fib-v1-{n}" and the immutable Cache-Control;
  - conditional_get:       304 exactly when If-None-Match names the current ETag;
  - retry_after_present:   every 429 and 503 carries Retry-After, whole seconds >= 1;
  - rate_limit_headers:    with limits on (FUZZ_RATE_LIMITED=1), every 200, 304, 400 and
                           429 from /fibonacci carries the RateLimit-* fields;
  - security_headers:      every response has X-Content-Type-Options: nosniff and leaks
                           no server software (no Server / X-Powered-By header).

Environment: FUZZ_MAX_N (the service's MAX_N, default 1000), FUZZ_RATE_LIMITED (1 when
the service runs with rate limits).
"""

from __future__ import annotations

import json
import os
import random
from urllib.parse import parse_qs, urlsplit

import schemathesis

MAX_N = int(os.environ.get("FUZZ_MAX_N", "1000"))
RATE_LIMITED = os.environ.get("FUZZ_RATE_LIMITED") == "1"
RATE_LIMIT_FIELDS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "ratelimit-policy")


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def valid_n(raw_values: list[str] | None) -> int | None:
    """The n the service must accept, or None if it must answer 400 (README "Input rules")."""
    if raw_values is None or len(raw_values) != 1:
        return None
    value = raw_values[0]
    if not value or not all("0" <= c <= "9" for c in value):
        return None
    n = int(value)
    return n if n <= MAX_N else None


def request_n(response) -> tuple[int | None, bool]:
    """(valid n or None, whether the request was for GET /fibonacci)."""
    parts = urlsplit(response.request.url)
    if parts.path != "/fibonacci" or response.request.method != "GET":
        return None, False
    query = parse_qs(parts.query, keep_blank_values=True)
    return valid_n(query.get("n")), True


def if_none_match_matches(value: str | None, n: int | None) -> bool:
    """RFC 9110 13.1.2: `*` or any listed entity tag, compared weakly, that equals the ETag."""
    if value is None or n is None:
        return False
    if value.strip() == "*":
        return True
    tags = [tag.strip() for tag in value.split(",")]
    return any(tag.removeprefix("W/") == f'"fib-v1-{n}"' for tag in tags)


def header(response, name: str) -> str | None:
    values = response.headers.get(name)
    return values[0] if values else None


@schemathesis.hook
def map_case(context, case):
    if case.operation.path != "/fibonacci" or case.method.upper() != "GET":
        return case
    query = case.query if isinstance(case.query, dict) else {}
    raw = query.get("n")
    # Decided by the case's own content, so that shrinking and replays send the same.
    rng = random.Random(repr(raw))
    pick = rng.random()
    text = str(raw) if raw is not None else ""
    if not (text.isascii() and text.isprintable()):
        return case  # a header value must be visible ASCII; the query still gets fuzzed
    n = int(text) if text.isdigit() else text
    if pick < 0.2:
        etag = f'"fib-v1-{n}"'
    elif pick < 0.25:
        etag = f'W/"fib-v1-{n}"'
    elif pick < 0.28:
        etag = "*"
    elif pick < 0.31:
        etag = f'"fib-v0-{n}", "fib-v1-{n}"'
    elif pick < 0.4:
        etag = rng.choice(['"fib-v1-not-this-one"', f'"fib-v1-{n}0"', f"fib-v1-{n}", '""', ","])
    else:
        return case
    headers = dict(case.headers or {})
    headers["If-None-Match"] = etag
    case.headers = headers
    return case


@schemathesis.check
def fibonacci_is_exact(ctx, response, case):
    n, is_fib = request_n(response)
    if not is_fib or response.status_code != 200:
        return
    if n is None:
        raise AssertionError(f"200 for an n the service must reject: {response.request.url}")
    body = json.loads(response.content)  # Python's int is exact at any size
    if body != {"n": n, "fibonacci": fib(n)}:
        raise AssertionError(f"wrong answer for n={n}: {response.content[:300]!r}")
    if header(response, "etag") != f'"fib-v1-{n}"':
        raise AssertionError(f"ETag {header(response, 'etag')!r} for n={n}, want \"fib-v1-{n}\"")
    if "immutable" not in (header(response, "cache-control") or ""):
        raise AssertionError(f"Cache-Control {header(response, 'cache-control')!r} is not immutable")
    return


@schemathesis.check
def conditional_get(ctx, response, case):
    n, is_fib = request_n(response)
    if not is_fib:
        return
    inm = response.request.headers.get("If-None-Match")
    matches = if_none_match_matches(inm, n)
    if response.status_code == 304:
        if not matches:
            raise AssertionError(f"304 although If-None-Match {inm!r} does not name the ETag of n={n}")
        if header(response, "etag") != f'"fib-v1-{n}"':
            raise AssertionError(f"304 without the ETag: {header(response, 'etag')!r}")
        if response.content:
            raise AssertionError(f"304 with a body: {response.content[:100]!r}")
    elif response.status_code == 200 and matches:
        raise AssertionError(f"200 although If-None-Match {inm!r} names the current ETag (want 304)")
    return


@schemathesis.check
def retry_after_present(ctx, response, case):
    if response.status_code not in (429, 503):
        return
    value = header(response, "retry-after")
    if value is None or not value.isdigit() or int(value) < 1:
        raise AssertionError(f"{response.status_code} with Retry-After {value!r}: want whole seconds >= 1")
    return


@schemathesis.check
def rate_limit_headers(ctx, response, case):
    _, is_fib = request_n(response)
    if not RATE_LIMITED or not is_fib or response.status_code not in (200, 304, 400, 429):
        return
    missing = [name for name in RATE_LIMIT_FIELDS if header(response, name) is None]
    if missing:
        raise AssertionError(f"{response.status_code} from /fibonacci without {', '.join(missing)}")
    return


@schemathesis.check
def security_headers(ctx, response, case):
    if header(response, "x-content-type-options") != "nosniff":
        raise AssertionError(f"X-Content-Type-Options is {header(response, 'x-content-type-options')!r}")
    for name in ("server", "x-powered-by"):
        if header(response, name) is not None:
            raise AssertionError(f"{name}: {header(response, name)!r} leaks the server software")
