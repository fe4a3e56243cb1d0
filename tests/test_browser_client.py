"""The browser client, static/stepstream.js: its Node unit tests, how the server serves it and
opens its API to other origins, and a page on another origin watching a job in Chromium across
token renewals and a web restart."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect

from stepstream import Client
from tests.conftest import StackFactory
from tests.support import http
from tests.support.browser import EXPECTED_CONSOLE, ROOT, chromium, requires_chromium
from tests.support.pages import PageServer
from tests.support.processes import TEST_TASKS, wait_until
from tests.support.readme import README_ANY_PAGE, README_PAGE, README_TASKS, code_block
from tests.support.tasks import gate_key

NODE = shutil.which("node")
JS_TESTS = sorted((ROOT / "tests" / "js").glob("*.test.mjs"))

KEY = "alice-key-0123456789"
PRODUCTION = {
    "STEPSTREAM_MODE": "production",
    "STEPSTREAM_SECRET": "browser-client-test-secret-0123456789",
    "STEPSTREAM_API_KEYS": f"alice:{KEY}",
}


@pytest.mark.skipif(
    NODE is None, reason="`node` is not on PATH: the browser client's unit tests need Node 18+"
)
def test_node_unit_tests_of_the_browser_client() -> None:
    """tests/js/*.test.mjs with Node's own runner: the SSE parser, the cursor and dedup rules,
    token renewal, Retry-After, the 204 end (no browser, no npm packages)."""
    assert JS_TESTS, "no tests/js/*.test.mjs found"
    assert NODE is not None
    result = subprocess.run(
        [NODE, "--test", *map(str, JS_TESTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout, result.stdout[-3000:]
    passed = int(result.stdout.split("# pass ")[1].split()[0])
    assert passed >= 15, result.stdout[-3000:]


def test_served_to_any_origin_and_cors_opens_streams_token_calls_and_records(
    make_stack: StackFactory,
) -> None:
    page_origin = "https://app.example"
    own = make_stack(**PRODUCTION, STEPSTREAM_CORS_ORIGINS=page_origin)
    script = http.get(f"{own.url}/stepstream.js", headers={"Origin": "https://elsewhere.example"})
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.headers["access-control-allow-origin"] == "*"  # a public file
    assert "export function watchJob" in script.text
    assert script.text == (ROOT / "static" / "stepstream.js").read_text()
    types = http.get(f"{own.url}/stepstream.d.ts")
    assert types.status_code == 200 and "export function watchAll" in types.text

    origin = {"Origin": page_origin}
    with Client(own.url, api_key=KEY) as client:
        job = client.submit("gated", {"events": 1})
    # The token call from the page's origin: a preflight (it sends Authorization), then the POST.
    preflight = httpx.options(
        f"{own.url}/api/jobs/{job.id}/token",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == page_origin
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    minted = http.post(
        f"{own.url}/api/jobs/{job.id}/token",
        headers={**origin, "Authorization": f"Bearer {KEY}"},
    )
    assert minted.status_code == 200
    assert minted.headers["access-control-allow-origin"] == page_origin
    token = minted.json()["token"]
    events_token = http.post(
        f"{own.url}/api/events/token", headers={**origin, "Authorization": f"Bearer {KEY}"}
    )
    assert events_token.status_code == 200
    assert events_token.headers["access-control-allow-origin"] == page_origin

    # The record with the job's token (what onEnd fetches), readable from the page's origin,
    # with Retry-After among the headers a page may read.
    record = http.get(f"{own.url}/api/jobs/{job.id}", params={"token": token}, headers=origin)
    assert record.status_code == 200 and record.json()["id"] == job.id
    assert record.headers["access-control-allow-origin"] == page_origin
    exposed = record.headers["access-control-expose-headers"].lower()
    assert "retry-after" in exposed, exposed
    # Another job's token does not read it; no token at all is a 401 in production.
    with Client(own.url, api_key=KEY) as client:
        other = client.submit("gated", {"events": 1})
    other_token = http.post(
        f"{own.url}/api/jobs/{other.id}/token", headers={"Authorization": f"Bearer {KEY}"}
    ).json()["token"]
    refused = http.get(f"{own.url}/api/jobs/{job.id}", params={"token": other_token})
    assert refused.status_code == 404
    assert http.get(f"{own.url}/api/jobs/{job.id}").status_code == 401

    # The stream itself, from the page's origin: readable (no preflight: no custom header).
    with http.stream(
        "GET",
        f"{own.url}/api/jobs/{job.id}/events",
        params={"token": token, "after": "0"},
        headers={**origin, "Accept": "text/event-stream"},
        timeout=10,
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["access-control-allow-origin"] == page_origin
    # Not for an origin nobody configured.
    stranger = http.get(
        f"{own.url}/api/jobs/{job.id}",
        params={"token": token},
        headers={"Origin": "https://evil.example"},
    )
    assert "access-control-allow-origin" not in stranger.headers


def test_the_dashboard_uses_only_relative_urls_so_it_works_under_a_prefix() -> None:
    """Mounted at /progress/, a leading-slash URL would leave the mount (the app's own /api,
    /static): every URL in the page and its scripts is relative. The streams go through
    stepstream.js, the only place that opens one."""
    static = ROOT / "static"
    html = (static / "index.html").read_text()
    urls = re.findall(r'(?:href|src)="([^"]*)"', html)
    assert urls and [u for u in urls if u.startswith("/")] == [], urls
    absolute = re.compile(r"""[`'"]/(?:api|static|stepstream|openapi|metrics|healthz|readyz)\b""")
    for script in [static / "app.js", *sorted((static / "js").glob("*.js"))]:
        text = script.read_text()
        assert not absolute.search(text), f"{script.name}: {absolute.search(text)}"
        assert "EventSource" not in text and "Last-Event-ID" not in text, script.name


# -- A page on another origin, in Chromium -----------------------------------------------------

PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>A product page</title>
<script type="module" src="/page.js"></script></head>
<body><h1>Your report</h1><p id="state">connecting</p><p id="progress"></p></body></html>
"""

# The page's own code: what a product would write. Its key is here only because this test has no
# backend; a product's backend asks for the token and hands it to the page.
PAGE_JS = """
import { watchJob } from "%(api)s/stepstream.js";

const jobId = new URLSearchParams(location.search).get("job");
const seen = (window.__watch = { events: [], states: [], ends: [], errors: [], tokens: [] });

window.__stop = watchJob(jobId, {
  after: "0",
  getToken: async ({ reason }) => {
    const response = await fetch(`%(api)s/api/jobs/${jobId}/token`, {
      method: "POST",
      headers: { Authorization: "Bearer %(key)s" },
    });
    if (!response.ok) throw new Error(`token: ${response.status}`);
    seen.tokens.push(reason);
    return (await response.json()).token;
  },
  onEvent: (event) => {
    seen.events.push(event);
    if (event.type === "progress") {
      document.querySelector("#progress").textContent = event.data.message;
    }
  },
  onState: (state) => {
    seen.states.push(state);
    document.querySelector("#state").textContent = state;
  },
  onEnd: (record) => seen.ends.push(record),
  onError: (error) =>
    seen.errors.push({ status: error.status, message: error.message, fatal: error.fatal }),
});
"""

EVENTS = 40  # progress events of the "gated" task, each released by the test


def count(what: str) -> str:
    """A page function counting ``window.__watch`` entries (functions: the page forbids eval)."""
    return "() => " + what


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.mark.browser
@requires_chromium
def test_a_page_on_another_origin_sees_every_event_once_across_renewals_and_a_web_restart(
    browser: Browser, make_stack: StackFactory
) -> None:
    pages: dict[str, tuple[str, str, dict[str, str]]] = {}
    with PageServer(pages) as site:
        own = make_stack(
            **PRODUCTION,
            STEPSTREAM_CORS_ORIGINS=site.origin,
            STEPSTREAM_TOKEN_TTL_SECONDS="2",
        )
        web = own.webs[0]
        api = web.url
        assert api != site.origin  # another port: another origin
        # The product's page runs under a strict policy of its own: scripts and connections
        # only to itself and to Stepstream.
        csp = f"default-src 'self'; script-src 'self' {api}; connect-src {api}"
        pages["/"] = ("text/html; charset=utf-8", PAGE_HTML, {"Content-Security-Policy": csp})
        pages["/page.js"] = ("text/javascript", PAGE_JS % {"api": api, "key": KEY}, {})

        with Client(api, api_key=KEY) as client:
            job_id = client.submit("gated", {"events": EVENTS}).id
        redis = own.redis()

        def release(n: int) -> None:
            """The job writes its next ``n`` progress events, a little apart."""
            for _ in range(n):
                redis.rpush(gate_key(job_id), "go")
                time.sleep(0.05)

        context = browser.new_context()
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on(
            "console",
            lambda m: (
                problems.append(f"console: {m.text}")
                if m.type == "error" and not EXPECTED_CONSOLE.search(m.text)
                else None
            ),
        )
        progress = "window.__watch.events.filter(e => e.type === 'progress').length"
        expired = "window.__watch.tokens.filter(r => r === 'expired').length"
        try:
            page.goto(f"{site.origin}/?job={job_id}")
            release(10)
            page.wait_for_function(count(f"{progress} >= 10"), timeout=20_000)
            # Two tokens run out while the job waits: the page renews them and goes on.
            page.wait_for_function(count(f"{expired} >= 2"), timeout=15_000)
            release(5)
            page.wait_for_function(count(f"{progress} >= 15"), timeout=10_000)

            # The web process goes away mid-job; the job goes on writing; a new web process
            # takes the port.
            web.stop()
            stopped_at = time.time()
            seen_at_stop = page.evaluate(count("window.__watch.events.length"))
            page.wait_for_function(count("window.__watch.states.at(-1) !== 'live'"))
            release(10)
            time.sleep(0.5)
            restarted_at = time.time()
            own.add_web(port=web.port)
            page.wait_for_function(count(f"{progress} >= 25"), timeout=20_000)
            # And one more renewal on the new process.
            page.wait_for_function(count(f"{expired} >= 3"), timeout=15_000)
            release(EVENTS - 25)

            page.wait_for_function(count("window.__watch.ends.length >= 1"), timeout=20_000)
            time.sleep(1.0)  # a second onEnd, or a late event, would show up now
            seen: dict[str, Any] = page.evaluate(count("window.__watch"))
        finally:
            context.close()

    # While the web process is down the client may say, without giving up, that it cannot
    # connect (a loaded machine restarts it slower than three tries): only a fatal error fails.
    fatal = [error for error in seen["errors"] if error["fatal"] is not False]
    assert fatal == [] and problems == [], (seen["errors"], problems)
    with Client(api, api_key=KEY) as client:
        log = [(e.id, e.type) for e in client.events(job_id, after="0")]
        final = client.get(job_id)
    # Every stored event, once each, in log order: exactly the job's log.
    got = [(e["id"], e["type"]) for e in seen["events"]]
    assert got == log, (len(got), len(log))
    assert sum(1 for _, type_ in got if type_ == "progress") == EVENTS
    # onEnd once, with the completed record.
    assert len(seen["ends"]) == 1
    record = seen["ends"][0]
    assert record["state"] == "completed" and record["result"] == {"events": EVENTS}
    assert record["last_event_id"] == log[-1][0] == final.last_event_id

    # The renewals and the restart really happened, while the job ran.
    assert seen["tokens"][0] == "connect"
    assert seen["tokens"].count("expired") >= 3, seen["tokens"]
    assert 0 < seen_at_stop < len(log), (seen_at_stop, len(log))
    written_while_down = [
        e
        for e in seen["events"]
        if stopped_at < datetime.fromisoformat(e["data"]["at"]).timestamp() < restarted_at
    ]
    assert len(written_while_down) >= 5, "the resume had to fetch what no web process sent"
    states = seen["states"]
    assert states[0] == "connecting" and states[-1] == "closed", states
    dropped = states.index("reconnecting")
    assert "live" in states[dropped:], states
    assert json.dumps(seen["events"]).count('"token_expired"') == 0  # handled, never delivered


# -- What a page is told when it cannot watch, and the README's pages -------------------------

UNREACHABLE_AFTER = 3  # static/stepstream.js: connects in a row with no answer before onError

BLOCKED_PAGE_JS = """
import { watchJob } from "%(api)s/stepstream.js";

const jobId = new URLSearchParams(location.search).get("job");
const seen = (window.__watch = { attempts: 0, errors: [], states: [] });
const nativeFetch = window.fetch;
window.fetch = function (...args) {
  seen.attempts += 1;
  return nativeFetch.apply(this, args);
};
watchJob(jobId, {
  onState: (state) => seen.states.push(state),
  onError: (error) => seen.errors.push({
    fatal: error.fatal, code: error.code, status: error.status, message: error.message,
    attempts: seen.attempts,
  }),
});
"""


@pytest.mark.browser
@requires_chromium
def test_a_page_on_an_origin_not_allowed_is_told_why_and_the_server_log_names_the_setting(
    browser: Browser, make_stack: StackFactory
) -> None:
    """No STEPSTREAM_CORS_ORIGINS: the browser blocks every stream and tells the page only
    "network error". The page's onError hears it (not fatal: the watch goes on trying) with the
    hint, and the server's log names the origin and the setting, once for all the requests."""
    pages: dict[str, tuple[str, str, dict[str, str]]] = {}
    with PageServer(pages) as site:
        own = make_stack()  # development mode, CORS off
        web = own.webs[0]
        pages["/"] = ("text/html; charset=utf-8", PAGE_HTML, {})
        pages["/page.js"] = ("text/javascript", BLOCKED_PAGE_JS % {"api": web.url}, {})
        with Client(web.url) as client:
            job_id = client.submit("gated", {"events": 1}).id
        context = browser.new_context()
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        try:
            page.goto(f"{site.origin}/?job={job_id}")
            # Two more tries after the error: the watch went on.
            page.wait_for_function(
                count(
                    "window.__watch.errors.length >= 1 && "
                    f"window.__watch.attempts >= {UNREACHABLE_AFTER + 2}"
                ),
                timeout=20_000,
            )
            seen: dict[str, Any] = page.evaluate(count("window.__watch"))
        finally:
            context.close()

    assert problems == [], problems
    [error] = seen["errors"]
    assert error["fatal"] is False and error["code"] == "unreachable", error
    assert error["status"] == 0, error
    assert error["message"].startswith(
        "could not connect: a network error, or this page's origin is not in "
        "STEPSTREAM_CORS_ORIGINS"
    ), error
    assert error["attempts"] == UNREACHABLE_AFTER, error
    assert "closed" not in seen["states"], seen["states"]
    # Every try reached the server (the browser hid the answers), and the server said why once.
    said = "which STEPSTREAM_CORS_ORIGINS does not allow"
    wait_until(lambda: said in web.log(), timeout=5, what="the refused-origin warning")
    lines = [line for line in web.log().splitlines() if said in line]
    assert len(lines) == 1, lines
    assert repr(site.origin) in lines[0] and f"/api/jobs/{job_id}/events" in lines[0], lines


README_PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Your order</title><link rel="icon" href="data:,">
<script type="module" src="/page.js"></script></head>
<body><p id="label"></p><progress id="bar" max="1"></progress><p id="reply"></p>
<p id="badge"></p><p id="result"></p></body></html>
"""

# What the README's snippets take from the page around them: the job's id, its elements, and
# the functions that show a result.
README_PAGE_PRELUDE = """
const jobId = new URLSearchParams(location.search).get("job");
const [label, bar, reply, badge, result] = ["label", "bar", "reply", "badge", "result"].map(
  (id) => document.getElementById(id),
);
const show = (value) => (result.textContent = JSON.stringify(value));
const showResult = (state, value) => show(value);
"""


def readme_page(opening: str, api: str) -> str:
    """The README's code at ``opening`` as the module of a page, importing from ``api``."""
    code = code_block(opening)
    if "<script" in code:
        code = code.split(">", 1)[1].rsplit("</script>", 1)[0]
    assert "https://progress.example.com/stepstream.js" in code, code
    return README_PAGE_PRELUDE + code.replace("https://progress.example.com", api)


@pytest.mark.browser
@requires_chromium
@pytest.mark.parametrize(
    ("opening", "finished_label"),
    [
        (README_PAGE, "Step 3 of 3 · Label (completed)"),
        (README_ANY_PAGE, "Step 3 of 3 · Label"),
    ],
    ids=["put-it-behind-your-product", "watch-from-any-page"],
)
def test_the_readme_pages_show_a_finished_job_and_one_not_started_yet(
    browser: Browser, make_stack: StackFactory, tmp_path: Path, opening: str, finished_label: str
) -> None:
    """The README's page code, run as written in Chromium on another origin against its own
    example task: a job that finished before the page opened shows its last step and result,
    one scheduled for later shows that. (Handling `step` events alone showed nothing.)"""
    (tmp_path / "readme_tasks.py").write_text(code_block(README_TASKS))
    pages: dict[str, tuple[str, str, dict[str, str]]] = {}
    with PageServer(pages) as site:
        own = make_stack(
            **PRODUCTION,
            STEPSTREAM_CORS_ORIGINS=site.origin,
            STEPSTREAM_TASK_MODULES=f"{TEST_TASKS},readme_tasks",
            PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]),
        )
        api = own.url
        pages["/"] = ("text/html; charset=utf-8", README_PAGE_HTML, {})
        pages["/page.js"] = ("text/javascript", readme_page(opening, api), {})
        with Client(api, api_key=KEY) as client:
            done = client.submit("pack_order", {"item": "teapot"})
            assert client.wait(done.id, timeout=30).state == "completed"
            later = client.submit("pack_order", {"item": "kettle"}, delay=3600)
            assert later.state == "scheduled"
            tokens = {job.id: client.stream_token(job.id).token for job in (done, later)}

        context = browser.new_context()
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        noisy = ("error", "warning")  # the snippets' onError writes a warning
        page.on(
            "console",
            lambda m: problems.append(f"console: {m.text}") if m.type in noisy else None,
        )
        try:
            for job_id, token in tokens.items():
                # The product's backend: the token for this user's job, as both snippets ask.
                answer = ("application/json", json.dumps({"token": token}), {})
                pages[f"/my/jobs/{job_id}/token"] = answer
                pages["/my-backend/progress-token"] = answer
                page.goto(f"{site.origin}/?job={job_id}")
                if job_id == done.id:
                    expect(page.locator("#label")).to_have_text(finished_label, timeout=15_000)
                    receipt = "1 x teapot from shelf B4, parcel 1"
                    expect(page.locator("#result")).to_contain_text(receipt, timeout=15_000)
                else:
                    expect(page.locator("#label")).to_have_text("scheduled", timeout=15_000)
        finally:
            context.close()
    assert problems == [], problems
