"""/docs in a real browser: headless Chromium (Debian's package, never a browser
download) driven by Playwright renders the page and runs GET /fibonacci for n=10.

    tests/system/run -k docs_page [--update-doc-images]   (or UPDATE_DOC_IMAGES=1)

Starts the service on port 0 with its default settings (rate limits on: the page and
its files must never be limited), opens /docs as a person would and fails unless, in
that browser:
  * Swagger UI renders the document (its title and the GET /fibonacci operation);
  * "Try it out" -> n=10 -> "Execute" shows the response 200 whose body has fibonacci
    55, from a request the page made to the same origin;
  * every request the page made went to the service's own origin (nothing from a CDN,
    no validator badge from swagger.io);
  * the browser console logged no error and the page threw no exception
    (a Content-Security-Policy violation is a console error).
A second pass runs with HS256 JWT auth on: the page offers Authorize, and Execute then
sends the token and gets 55. The screenshot is taken after the response is shown and
kept in target/artifacts/docs-page.png (CI keeps it); --update-doc-images also writes
docs/images/docs-page.png, the one the docs show. $CHROMIUM overrides /usr/bin/chromium.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Locator, Page, Response, sync_playwright

from .harness import ARTIFACTS, ROOT, Service, Verdict, http_get

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def start_service(tmp: Path, name: str, **settings: str) -> Service:
    """The service on its defaults (per-address and rate limits on), answering /health."""
    svc = Service(tmp, name, per_address_limits=True, SHUTDOWN_DRAIN_SECONDS="0", **settings)
    deadline = time.monotonic() + 30
    while http_get(svc.base + "/health", 1)[0] != 200:
        assert time.monotonic() < deadline, f"docs-page: the service did not answer /health:\n{svc.tail()}"
        time.sleep(0.1)
    return svc


def finish(v: Verdict, svc: Service) -> None:
    """Stops the service; on failure shows its log; fails the test on any unmet check."""
    svc.stop_sync(15)
    if not v.ok:
        print("--- the service's log ---\n" + svc.tail(60)[-4000:])
    v.done()


def execute_fibonacci(page: Page, n: int) -> tuple[Locator, Response]:
    """Opens GET /fibonacci, fills n and presses Execute as a person would; returns the
    operation's element and the response the page got."""
    op = (
        page.locator(".opblock-get")
        .filter(has=page.locator(".opblock-summary-path", has_text="/fibonacci"))
        .first
    )
    op.wait_for(timeout=10_000)
    op.locator(".opblock-summary").click()
    # The page opens with "Try it out" on (tryItOutEnabled): the button then reads
    # "Cancel", and clicking it would turn the inputs off.
    try_out = op.locator("button.try-out__btn")
    if try_out.inner_text().strip() == "Try it out":
        try_out.click()
    op.locator("tr[data-param-name='n'] input").fill(str(n))
    with page.expect_response(lambda r: f"/fibonacci?n={n}" in r.url) as answer:
        op.locator("button.execute").click()
    return op, answer.value


def hs256_token(secret: str, audience: str) -> str:
    """A JWT as an identity provider would sign it (HS256), valid for five minutes."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": "docs-page-check", "aud": audience, "exp": int(time.time()) + 300}
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(
        secret.encode(), f"{header}.{body}".encode(), hashlib.sha256
    ).digest()
    return f"{header}.{body}.{b64(signature)}"


def test_docs_page(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    """Swagger UI renders with a tight CSP, Try it out for n=10 shows 200 and 55 from the
    same origin, nothing loaded from another origin, no console or page error, and 40
    more loads of the page and its files are never 429."""
    v = Verdict()
    update_doc_images = pytestconfig.getoption("update_doc_images")
    svc = start_service(tmp_path, "docs-page")
    origin = svc.base
    requests: list[str] = []
    console_errors: list[str] = []
    page_errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                # Root in a container has no user namespaces for Chromium's sandbox.
                args=["--no-sandbox"],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.on(
                "console",
                lambda m: console_errors.append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: page_errors.append(str(e)))

            response = page.goto(f"{origin}/docs", wait_until="load")
            v.check(
                response is not None and response.status == 200,
                f"GET /docs answers 200 (got {response.status if response else None})",
            )
            csp = (
                response.headers.get("content-security-policy") if response else ""
            ) or ""
            loose = [
                w
                for w in ("unsafe-inline", "unsafe-eval", "*", "http:", "https:")
                if w in csp.split()
            ]
            v.check(
                "frame-ancestors 'none'" in csp
                and "default-src 'none'" in csp
                and not loose,
                f"the page's Content-Security-Policy is tight ({csp!r})",
            )
            page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
            title = page.inner_text(".swagger-ui .info .title")
            v.check(
                "fibonacci" in title.lower(),
                f"the UI shows the API's title ({title!r})",
            )

            op, api = execute_fibonacci(page, 10)
            v.check(
                urlsplit(api.url).netloc == urlsplit(origin).netloc,
                f"Execute calls the same origin ({api.url})",
            )
            status_cell = op.locator(
                ".live-responses-table .response .response-col_status"
            )
            status_cell.wait_for(timeout=10_000)
            shown_status = status_cell.inner_text().strip()
            v.check(
                shown_status.startswith("200"),
                f"the page shows status 200 ({shown_status!r})",
            )
            body_text = op.locator(
                ".live-responses-table .response-col_description .microlight"
            ).first.inner_text()
            try:
                shown = json.loads(body_text)
            except ValueError:
                shown = None
            v.check(
                isinstance(shown, dict)
                and shown.get("n") == 10
                and shown.get("fibonacci") == 55,
                f"the page shows the response body with fibonacci 55 ({body_text.strip()!r})",
            )

            # Anything the page fetched lazily (fonts, images) has been requested by now.
            page.wait_for_load_state("networkidle")
            foreign = sorted(
                {
                    u
                    for u in requests
                    if not u.startswith(origin + "/") and not u.startswith("data:")
                }
            )
            v.check(
                not foreign, f"nothing loaded from another origin ({foreign or 'none'})"
            )
            v.check(
                not console_errors, f"no console errors ({console_errors or 'none'})"
            )
            v.check(
                not page_errors, f"no uncaught page errors ({page_errors or 'none'})"
            )

            # Past the default limits (30 a minute): the page and its files are never limited.
            assets = sorted({u for u in requests if u.startswith(origin + "/docs")})
            statuses = [page.request.get(u).status for _ in range(40) for u in assets]
            v.check(
                len(assets) >= 5 and 429 not in statuses,
                f"{len(statuses)} more loads of the page and its {len(assets)} files: never 429 "
                f"({sorted(set(statuses))})",
            )

            shot = ARTIFACTS / "docs-page.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            op.scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=False)
            print(f"screenshot: {shot}")
            if update_doc_images:
                target = ROOT / "docs" / "images" / "docs-page.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, target)
                print(f"updated {target.relative_to(ROOT)}")
            browser.close()
    finally:
        finish(v, svc)


def test_docs_page_with_auth(tmp_path: Path) -> None:
    """With JWT auth on, the page offers Authorize and Try it out sends the token: Execute
    sends "Bearer ..." and gets 200 with fibonacci 55."""
    v = Verdict()
    secret = secrets.token_hex(32)
    svc = start_service(tmp_path, "docs-page-auth", AUTH_JWT_HS256_SECRET=secret, AUTH_JWT_AUDIENCE="fibonacci-api")
    origin = svc.base
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{origin}/docs", wait_until="load")
            page.locator(".auth-wrapper button.authorize").click()
            page.locator(".modal-ux input").first.fill(
                hs256_token(secret, "fibonacci-api")
            )
            page.locator(".modal-ux .auth-btn-wrapper button.authorize").click()
            page.locator(".modal-ux button.btn-done").click()
            _, api = execute_fibonacci(page, 10)
            sent = api.request.headers.get("authorization", "")
            v.check(
                sent.startswith("Bearer "),
                "with JWT auth on, Authorize makes Execute send the token",
            )
            v.check(
                api.status == 200 and api.json().get("fibonacci") == 55,
                f"and the answer is 200 with fibonacci 55 (got {api.status})",
            )
            browser.close()
    finally:
        finish(v, svc)
