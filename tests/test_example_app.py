"""examples/host_app driven as its users would: a product on its own origin submits jobs for its
signed-in users with its one API key, hands their browsers stream tokens, and shows each user
only their own jobs with /stepstream.js. Production mode, 2-second tokens, and the Stepstream
web process restarted in the middle of a job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from stepstream.tasks.demo.analyze_document import STEPS
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import DOC
from tests.support.browser import chromium, requires_chromium
from tests.support.processes import Uvicorn, Web, free_port, wait_until
from tests.support.sse import read_stream

pytestmark = [pytest.mark.browser, requires_chromium]

KEY = "acme-key-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {KEY}"}
TOKEN_TTL = 2


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


class HostApp(Uvicorn):
    """examples/host_app, the product, on its own origin."""

    ready_path = "/session"

    def __init__(self, stack: Stack, log_dir: Path, port: int) -> None:
        env = {
            **stack.env,
            "ACME_STEPSTREAM_URL": stack.url,
            "ACME_STEPSTREAM_KEY": KEY,
            "ACME_SECRET": "acme-cookie-secret",
        }
        super().__init__("examples.host_app.app:app", env, log_dir, port, name="host")


@pytest.fixture
def product(make_stack: StackFactory, tmp_path: Path) -> Iterator[tuple[Stack, HostApp]]:
    host_port = free_port()
    stack = make_stack(
        STEPSTREAM_MODE="production",
        STEPSTREAM_SECRET="example-app-secret-0123456789abcdef",
        STEPSTREAM_API_KEYS=f"acme:{KEY}",
        STEPSTREAM_TOKEN_TTL_SECONDS=str(TOKEN_TTL),
        STEPSTREAM_CORS_ORIGINS=f"http://127.0.0.1:{host_port}",
    )
    host = HostApp(stack, tmp_path, host_port).start()
    try:
        yield stack, host
    finally:
        host.stop()


CONSOLE: dict[Page, list[str]] = {}


def sign_in(browser: Browser, host: HostApp, user: str) -> Page:
    page = browser.new_context().new_page()
    # Kept for a failure's message: what the page's client said while it reconnected.
    lines = CONSOLE.setdefault(page, [])
    page.on("console", lambda message: lines.append(f"{message.type}: {message.text}"))
    page.goto(host.url)
    page.get_by_label("Your name").fill(user)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who")).to_have_text(f"Signed in as {user}")
    expect(page.locator("#connection")).to_have_text("Live", timeout=15_000)
    return page


def acme(page: Page) -> dict[str, Any]:
    value: dict[str, Any] = page.evaluate("() => JSON.parse(JSON.stringify(window.acme))")
    return value


def stored_log(stack: Stack, job_id: str) -> list[str]:
    status, events = read_stream(f"{stack.url}/api/jobs/{job_id}/events?after=0", HEADERS)
    assert status == 200
    return [event.id for event in events if event.id]


def test_each_user_watches_only_their_own_jobs_across_token_expiry_and_a_web_restart(
    browser: Browser, product: tuple[Stack, HostApp]
) -> None:
    stack, host = product
    alice = sign_in(browser, host, "alice")
    bob = sign_in(browser, host, "bob")
    try:
        alice.get_by_label("Pace (s)").fill("1")
        alice.get_by_role("button", name="Analyze").click()
        row = alice.locator("li.report")
        expect(row).to_have_count(1)
        job_id = row.get_attribute("data-job-id")
        assert job_id
        record = http.get(f"{stack.url}/api/jobs/{job_id}", headers=HEADERS).json()
        assert record["subject"] == "alice" and record["owner"] == "acme"

        # Mid-job, the Stepstream web process goes away and comes back on the same port: once
        # a token has run out on a live stream (on a loaded machine the first one can outlive
        # two steps and expire only while the web is down, which shows as a 401 instead).
        expect(row.locator(".steps > li")).to_have_count(2, timeout=20_000)
        wait_until(lambda: "expired" in acme(alice)["tokenReasons"], 20, 0.1, "a token expiry")
        (web,) = stack.webs
        web.stop()
        assert http.get(f"{host.url}/session").status_code == 200  # the product stays up
        time.sleep(1.5)
        state_while_down = stack.redis().hget(f"{stack.prefix}job:{{{job_id}}}", "state")
        stack.webs[0] = Web(stack.env, stack.log_dir, port=web.port).start()

        try:
            expect(row).to_have_attribute("data-state", "completed", timeout=40_000)
        except AssertionError as exc:
            seen = acme(alice)
            stored = stack.redis().hget(f"{stack.prefix}job:{{{job_id}}}", "state")
            raise AssertionError(
                f"{exc}\njob in Valkey: {stored}"
                f"\ntoken reasons: {seen['tokenReasons']}\nerrors: {seen['errors']}"
                f"\nevents: {[e['type'] for e in seen['events'].get(job_id, [])]}"
                f"\nconsole:\n" + "\n".join(CONSOLE[alice][-40:])
            ) from exc
        steps = row.locator(".steps > li").all_inner_texts()
        assert steps == STEPS, steps  # each step once, across renewals and the restart
        expect(row.locator(".result")).not_to_be_empty()

        seen = acme(alice)
        # The restart really came mid-job, and tokens really ran out on the way.
        assert state_while_down == '"running"', state_while_down
        # (A token that ran out while the web process was down comes back as a 401.)
        reasons = seen["tokenReasons"]
        assert reasons[0] == "connect" and "expired" in reasons, reasons
        assert len(reasons) >= 3 and set(reasons) <= {"connect", "expired", "unauthorized"}
        # Every stored event exactly once, in log order, and the end once.
        assert [e["id"] for e in seen["events"][job_id]] == stored_log(stack, job_id)
        assert seen["ended"][job_id] == 1
        assert seen["errors"] == []

        # A report alice starts elsewhere (another tab) appears on her page, live.
        cookies = {c["name"]: c["value"] for c in alice.context.cookies()}
        other = http.post(
            f"{host.url}/reports", json={"text": DOC, "pace": 0}, cookies=cookies
        ).json()
        expect(alice.locator(f'li.report[data-job-id="{other["id"]}"]')).to_have_attribute(
            "data-state", "completed", timeout=20_000
        )

        # Bob sees none of it, live or on reload, and cannot get a token for it.
        expect(bob.locator("li.report")).to_have_count(0)
        bob.reload()
        expect(bob.locator("#connection")).to_have_text("Live", timeout=15_000)
        expect(bob.locator("li.report")).to_have_count(0)
        bob_cookies = {c["name"]: c["value"] for c in bob.context.cookies()}
        refused = http.post(f"{host.url}/reports/{job_id}/token", cookies=bob_cookies)
        assert refused.status_code == 404
        assert acme(bob)["events"] == {}
    finally:
        alice.context.close()
        bob.context.close()
