"""/docs in a real browser: headless Chromium renders the page, runs /fibonacci for n=10.

Run by scripts/check-docs-page (which installs Chromium and Playwright); usable alone:

    .venv/bin/python scripts/docs_page.py [--bin target/debug/fibonacci-api]
        [--chromium /usr/bin/chromium] [--screenshot target/artifacts/docs-page.png]
        [--update-doc-images]

Starts the service on a free 127.0.0.1 port with its default settings (rate limits on:
the page and its files must never be limited), opens /docs as a person would and fails
unless, in that browser:
  * Swagger UI renders the document (its title and the GET /fibonacci operation);
  * "Try it out" → n=10 → "Execute" shows the response 200 whose body has fibonacci 55,
    from a request the page made to the same origin;
  * every request the page made went to the service's own origin (nothing from a CDN,
    no validator badge from swagger.io);
  * the browser console logged no error and the page threw no exception
    (a Content-Security-Policy violation is a console error).
The screenshot is taken after the response is shown: CI keeps it as an artifact, and
--update-doc-images also writes docs/images/docs-page.png, the one the docs show.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(binary: str, log, **settings: str) -> tuple[subprocess.Popen, int]:
    # A port freed here can be taken by someone else before the service binds it:
    # retry on a new port when the service exits early.
    for _ in range(5):
        port = free_port()
        # A clean environment: nothing from the caller's (REDIS_URL, DOCS_ENABLED, ...)
        # leaks in; the service runs on its defaults.
        env = {
            "PATH": os.environ.get("PATH", ""),
            "LISTEN_ADDR": f"127.0.0.1:{port}",
            "SHUTDOWN_DRAIN_SECONDS": "0",
            **settings,
        }
        proc = subprocess.Popen([binary], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/health", timeout=1
                ):
                    return proc, port
            except OSError:
                time.sleep(0.1)
        proc.kill()
        proc.wait()
    sys.exit("docs-page: the service did not start (see its log above)")


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: bool, text: str) -> None:
        print(("PASS " if ok else "FAIL ") + text, flush=True)
        if not ok:
            self.items.append(text)


def execute_fibonacci(page, n: int):
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


def stop_service(proc: subprocess.Popen, log, failures: Failures, what: str) -> int:
    """Stops the service; on failure shows its log. Returns the exit status to report."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    if failures.items:
        log.seek(0)
        print("--- the service's log ---\n" + log.read()[-4000:])
    print(f"{what}: {len(failures.items)} failed")
    return 1 if failures.items else 0


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryFile(mode="w+") as log:
        failed = check(args, log)
    with tempfile.TemporaryFile(mode="w+") as log:
        failed |= check_with_auth(args, log)
    return failed


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


def check_with_auth(args: argparse.Namespace, log) -> int:
    """With JWT auth on, the page offers Authorize and Try it out sends the token."""
    failures = Failures()
    secret = secrets.token_hex(32)
    proc, port = start_service(
        args.bin, log, AUTH_JWT_HS256_SECRET=secret, AUTH_JWT_AUDIENCE="fibonacci-api"
    )
    origin = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=args.chromium, headless=True, args=["--no-sandbox"]
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
            failures.check(
                sent.startswith("Bearer "),
                "with JWT auth on, Authorize makes Execute send the token",
            )
            failures.check(
                api.status == 200 and api.json().get("fibonacci") == 55,
                f"and the answer is 200 with fibonacci 55 (got {api.status})",
            )
            browser.close()
    finally:
        failed = stop_service(proc, log, failures, "docs-page (JWT auth on)")
    return failed


def check(args: argparse.Namespace, log) -> int:
    failures = Failures()
    proc, port = start_service(args.bin, log)
    origin = f"http://127.0.0.1:{port}"
    requests: list[str] = []
    console_errors: list[str] = []
    page_errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=args.chromium,
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
            failures.check(
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
            failures.check(
                "frame-ancestors 'none'" in csp
                and "default-src 'none'" in csp
                and not loose,
                f"the page's Content-Security-Policy is tight ({csp!r})",
            )
            page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
            title = page.inner_text(".swagger-ui .info .title")
            failures.check(
                "fibonacci" in title.lower(),
                f"the UI shows the API's title ({title!r})",
            )

            op, api = execute_fibonacci(page, 10)
            failures.check(
                urlsplit(api.url).netloc == urlsplit(origin).netloc,
                f"Execute calls the same origin ({api.url})",
            )
            status_cell = op.locator(
                ".live-responses-table .response .response-col_status"
            )
            status_cell.wait_for(timeout=10_000)
            shown_status = status_cell.inner_text().strip()
            failures.check(
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
            failures.check(
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
            failures.check(
                not foreign, f"nothing loaded from another origin ({foreign or 'none'})"
            )
            failures.check(
                not console_errors, f"no console errors ({console_errors or 'none'})"
            )
            failures.check(
                not page_errors, f"no uncaught page errors ({page_errors or 'none'})"
            )

            # Past the default limits (30 a minute): the page and its files are never limited.
            assets = sorted({u for u in requests if u.startswith(origin + "/docs")})
            statuses = [page.request.get(u).status for _ in range(40) for u in assets]
            failures.check(
                len(assets) >= 5 and 429 not in statuses,
                f"{len(statuses)} more loads of the page and its {len(assets)} files: never 429 "
                f"({sorted(set(statuses))})",
            )

            shot = Path(args.screenshot)
            shot.parent.mkdir(parents=True, exist_ok=True)
            op.scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=False)
            print(f"screenshot: {shot}")
            if args.update_doc_images:
                target = ROOT / "docs" / "images" / "docs-page.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, target)
                print(f"updated {target.relative_to(ROOT)}")
            browser.close()
    finally:
        failed = stop_service(proc, log, failures, "docs-page")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bin",
        default=os.environ.get("FIBONACCI_API_BIN", "target/debug/fibonacci-api"),
    )
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--screenshot", default="target/artifacts/docs-page.png")
    parser.add_argument(
        "--update-doc-images",
        action="store_true",
        help="also write docs/images/docs-page.png, the screenshot the docs show",
    )
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
