"""Driving the dashboard in real headless Chromium (Debian's /usr/bin/chromium) with Playwright.

The page is served with the Content-Security-Policy the project will add later (no
'unsafe-inline'), so an inline script, inline style attribute or inline handler shows up as a
violation that the tests fail on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Playwright,
    Route,
    expect,
    sync_playwright,
)

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

requires_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium package to run the browser tests",
)

# Runs in the page before any of its scripts: records the streams stepstream.js opens (fetches
# that accept text/event-stream: when each opened and closed, so a test can tell how many were
# open at once) and every value each progress bar ever showed.
INIT_SCRIPT = """
(() => {
  const nativeFetch = window.fetch;
  window.__streams = [];
  window.fetch = function (input, init) {
    const accept = init && init.headers && init.headers.Accept;
    if (accept !== "text/event-stream") return nativeFetch.apply(this, arguments);
    const entry = { url: String(input), opened: performance.now(), closed: null };
    window.__streams.push(entry);
    const close = () => { entry.closed ??= performance.now(); };
    if (init.signal) init.signal.addEventListener("abort", close);
    const answer = nativeFetch.apply(this, arguments);
    answer.then((response) => { if (!response.ok || response.status === 204) close(); }, close);
    return answer;
  };
  window.__progress = {};
  const record = (bar) => {
    const id = bar.dataset && bar.dataset.jobId;
    if (!id) return;
    const seen = (window.__progress[id] ||= []);
    const value = Number(bar.getAttribute("aria-valuenow"));
    if (seen[seen.length - 1] !== value) seen.push(value);
  };
  // The "Step 3 of 7 · ..." line of each row, every distinct text in order.
  window.__stepLines = {};
  const recordStep = (el) => {
    const row = el.closest && el.closest("li.job");
    if (!row) return;
    const seen = (window.__stepLines[row.dataset.jobId] ||= []);
    const text = el.textContent;
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  };
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      if (m.type === "attributes") record(m.target);
      if (m.type === "childList" && m.target.classList && m.target.classList.contains("job-step")) {
        recordStep(m.target);
      }
      for (const node of m.addedNodes || []) {
        if (node.querySelectorAll) node.querySelectorAll('[role="progressbar"]').forEach(record);
      }
    }
  }).observe(document, {
    subtree: true, childList: true, attributes: true, attributeFilter: ["aria-valuenow"],
  });
})();
"""

# Messages Chromium logs by itself while a server is down on purpose.
EXPECTED_CONSOLE = re.compile(
    r"ERR_CONNECTION_REFUSED|ERR_EMPTY_RESPONSE|ERR_INCOMPLETE_CHUNKED|"
    r"Failed to load resource"
)


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            yield browser
        finally:
            browser.close()


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)


class Dashboard:
    """One browser page on the dashboard, with what a user can see and do."""

    def __init__(self, browser: Browser, base_url: str, width: int = 1280, height: int = 860):
        self.base_url = base_url
        self.context = browser.new_context(
            viewport={"width": width, "height": height},
            device_scale_factor=1,
            color_scheme="light",
            reduced_motion="no-preference",
        )
        self.context.add_init_script(INIT_SCRIPT)
        self.context.route(lambda url: urlparse(url).path == "/", self._with_csp)
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("console", self._console)

    @staticmethod
    def _with_csp(route: Route) -> None:
        """The server sends its own CSP (server/security.py); without one, ours applies."""
        response = route.fetch()
        headers = dict(response.headers)
        if not any(name.lower() == "content-security-policy" for name in headers):
            headers["content-security-policy"] = CSP
        route.fulfill(response=response, headers=headers)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not EXPECTED_CONSOLE.search(message.text):
            self.errors.append(f"console: {message.text}")
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            self.errors.append(f"CSP: {message.text}")

    def close(self) -> None:
        self.context.close()

    # -- navigation -------------------------------------------------------------------------

    def goto(self, path: str = "/") -> Dashboard:
        self.page.goto(self.base_url + path)
        return self

    def open(self, path: str = "/") -> Dashboard:
        self.page.goto(self.base_url + path)
        self.expect_connection("Live")
        expect(self.page.locator("#task-select")).to_be_enabled()
        return self

    def reload(self) -> None:
        self.page.reload()
        self.expect_connection("Live")

    # -- what a user sees -------------------------------------------------------------------

    @property
    def connection(self) -> Locator:
        return self.page.locator("#conn")

    def expect_connection(self, text: str, timeout: float = 15_000) -> None:
        expect(self.connection).to_contain_text(text, timeout=timeout)

    def row(self, job_id: str) -> Locator:
        return self.page.locator(f'li.job[data-job-id="{job_id}"]')

    def bar(self, job_id: str) -> Locator:
        return self.row(job_id).get_by_role("progressbar")

    def progress(self, job_id: str) -> int:
        return int(self.bar(job_id).get_attribute("aria-valuenow") or "-1")

    def wait_progress(self, job_id: str, at_least: int, timeout: float = 15_000) -> None:
        self.page.wait_for_function(
            """([id, least]) => {
                const row = document.querySelector(`li.job[data-job-id="${id}"]`);
                const bar = row && row.querySelector('[role="progressbar"]');
                return bar && Number(bar.getAttribute("aria-valuenow")) >= least;
            }""",
            arg=[job_id, at_least],
            timeout=timeout,
        )

    def progress_history(self, job_id: str) -> list[int]:
        history: list[int] = self.page.evaluate(f"window.__progress[{job_id!r}] || []")
        return history

    def step_lines(self, job_id: str) -> list[str]:
        lines: list[str] = self.page.evaluate(f"window.__stepLines[{job_id!r}] || []")
        return lines

    def streams(self) -> list[dict[str, Any]]:
        """The streams the page opened: ``url``, ``opened`` and ``closed`` (page ms or None)."""
        streams: list[dict[str, Any]] = self.page.evaluate("window.__streams")
        return streams

    def most_open_at_once(self, path: str) -> int:
        """The most streams to ``path`` (e.g. ``/api/events``) the page held open at once."""
        spans = [s for s in self.streams() if urlparse(s["url"]).path == path]
        most = 0
        for stream in spans:
            at = stream["opened"]
            open_then = [
                s for s in spans if s["opened"] <= at and (s["closed"] is None or s["closed"] > at)
            ]
            most = max(most, len(open_then))
        return most

    def expect_state(self, job_id: str, label: str, timeout: float = 20_000) -> None:
        expect(self.row(job_id).locator(".badge")).to_have_text(label, timeout=timeout)

    @property
    def detail(self) -> Locator:
        return self.page.locator("#detail")

    # -- what a user does -------------------------------------------------------------------

    def choose_task(self, name: str) -> None:
        self.page.get_by_label("Task", exact=True).select_option(name)

    def fill_sample(self) -> None:
        self.page.get_by_role("button", name="Fill sample").click()

    def field(self, label: str) -> Locator:
        # A required field's label ends with a "*" marker.
        name = re.compile(rf"^{re.escape(label)}( \*)?$")
        return self.page.locator("#form-fields").get_by_label(name)

    def open_more_options(self) -> None:
        more = self.page.locator("details.more-options")
        if more.count() and not more.evaluate("el => el.open"):
            more.locator("summary").click()

    def submit(self) -> dict[str, Any]:
        """Press "Start job"; returns the job record the server answered with."""
        with self.page.expect_response(
            lambda r: urlparse(r.url).path == "/api/jobs" and r.request.method == "POST"
        ) as info:
            self.page.get_by_role("button", name="Start job").click()
        response = info.value
        body: dict[str, Any] = response.json()
        assert response.status == 202, body
        self.row(body["id"]).wait_for()
        return body

    def open_detail(self, job_id: str) -> Locator:
        self.row(job_id).locator(".job-link").click()
        expect(self.detail).to_be_visible()
        return self.detail

    def screenshot(self, name: str, target: Path | None = None) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = target or ARTIFACTS / name
        self.page.screenshot(path=str(path), animations="disabled")
        return path
