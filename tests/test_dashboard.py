"""The dashboard in real headless Chromium against real web and worker processes.

Each test asserts what a person sees: the badge, the "Step 3 of 7 · ..." line, the bar's
``aria-valuenow``, the connection indicator, the detail view's timeline, result and error.
The page runs under a Content-Security-Policy without 'unsafe-inline', and any script error or
CSP violation fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import Browser, expect

from stepstream.tasks.demo.analyze_document import STEPS as ANALYZE_DOCUMENT_STEPS
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import submit, wait_state
from tests.support.browser import ARTIFACTS, ROOT, Dashboard, chromium, requires_chromium
from tests.support.tasks import gate_key

pytestmark = [pytest.mark.browser, requires_chromium]

ANALYZE_STEPS = list(ANALYZE_DOCUMENT_STEPS)


def assert_log_once_each(lines: list[str]) -> None:
    """The analysis's activity log: its lifecycle and its two own log lines, each exactly once."""
    assert len(lines) == 5, lines
    assert lines[:2] == ["Queued", "Attempt 1 of 3 started"]
    assert lines[2].startswith("Parsed ") and lines[3].startswith("Top keywords: ")
    assert lines[4] == "Completed"


TEXT = (
    "Stepstream takes long jobs off the request path. Workers record every step in a durable "
    "log. Browsers watch progress live and resume after a dropped connection. Scripts follow "
    "the same streams. Nothing is missed and the result is kept."
)
QUOTE = {
    "client": "Initech",
    "roles": [
        {"role": "ml_engineer", "level": "senior", "count": 2},
        {"role": "data_scientist", "level": "mid"},
        {"role": "product_designer", "level": "junior", "allocation": 0.5},
    ],
    "weeks": 8,
    "tier": "priority",
}

OpenDashboard = Callable[..., Dashboard]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def dashboard(browser: Browser, stack: Stack) -> Iterator[OpenDashboard]:
    """Open the dashboard in a fresh browser context (``url`` defaults to the shared stack)."""
    opened: list[Dashboard] = []

    def open_dashboard(url: str | None = None, **size: int) -> Dashboard:
        page = Dashboard(browser, url or stack.url, **size)
        opened.append(page)
        return page.open()

    yield open_dashboard
    errors = [error for page in opened for error in page.errors]
    for page in opened:
        page.close()
    assert errors == [], "the page logged errors or CSP violations"


def analyze(pace: float, **extra: Any) -> dict[str, Any]:
    return {"title": "Test report", "text": TEXT, "pace": pace, **extra}


def test_submit_from_the_form_shows_each_step_then_the_result(
    dashboard: OpenDashboard,
) -> None:
    page = dashboard()
    page.choose_task("analyze_document")

    # An input the task refuses: the server's 422 is shown next to the form, by field.
    page.field("Text").fill("")
    with page.page.expect_response(lambda r: r.url.endswith("/api/jobs")) as info:
        page.page.get_by_role("button", name="Start job").click()
    assert info.value.status == 422
    errors = page.page.locator("#form-errors")
    expect(errors).to_be_visible()
    expect(errors).to_contain_text("does not fit task 'analyze_document'")
    expect(errors).to_contain_text("Text: String should have at least 1 character")
    expect(page.page.locator('[data-field="text"] .field-error')).to_contain_text(
        "at least 1 character"
    )
    page.screenshot("form-error.png")

    # The sample, one click; slowed down so each step is on screen for a while.
    page.fill_sample()
    expect(page.field("Title")).to_have_value("Quarterly report")
    expect(page.field("Text")).to_have_value(re.compile(r"^Revenue grew twelve percent"))
    page.field("Pace").fill("0.25")
    job = page.submit()
    expect(errors).to_be_hidden()
    job_id = job["id"]
    row = page.row(job_id)
    expect(row.locator(".job-title")).to_have_text("Analyse a document")

    # Live: the row moves through the steps while we watch. Read from the page's own record of
    # each text the row showed: a step on screen for a quarter of a second can fall between
    # Playwright's polls, which are a second apart after the first few.
    page.page.wait_for_function(
        "id => (window.__stepLines[id] || []).includes('Step 3 of 7 · Embedding chunks')",
        arg=job_id,
        timeout=15_000,
    )
    page.expect_state(job_id, "Completed", timeout=30_000)
    expect(page.bar(job_id)).to_have_attribute("aria-valuenow", "100")
    expect(row.locator(".job-step")).to_have_text("Completed all 7 steps")
    expect(row.locator(".job-elapsed")).to_have_text(re.compile(r"^\d+(\.\d)? s$"))

    # The row showed the steps in order, and the bar never went backwards. A short step whose
    # events arrive within one frame of the next (the demo's last step lasts a millisecond; on a
    # loaded machine a paced one can too) may never be on screen; the detail timeline below
    # shows every step. What the row shows never goes back and never repeats.
    lines = page.step_lines(job_id)
    expected = [f"Step {i} of 7 · {name}" for i, name in enumerate(ANALYZE_STEPS, start=1)]
    seen = [line for line in lines if line.startswith("Step ")]
    positions = [expected.index(line) for line in seen if line in expected]
    assert len(positions) == len(seen), lines
    assert positions == sorted(set(positions)) and len(positions) >= 4, lines
    history = page.progress_history(job_id)
    assert history == sorted(history) and history[-1] == 100, history
    assert any(0 < value < 100 for value in history), history

    # The detail view: every step done with its duration and partial output, the result.
    detail = page.open_detail(job_id)
    steps = detail.locator(".timeline > li")
    expect(steps).to_have_count(7)
    for index, name in enumerate(ANALYZE_STEPS):
        step = steps.nth(index)
        expect(step.locator(".tl-name")).to_have_text(f"{index + 1}. {name}")
        expect(step.locator(".tl-state")).to_have_text("Done")
        expect(step.locator(".tl-time")).not_to_be_empty()
    expect(steps.nth(0).locator(".tl-output")).to_contain_text("sentences: 6")
    result = detail.locator("section", has=page.page.locator("#result-title"))
    expect(result).to_contain_text("Quarterly report")
    expect(result.locator(".chip").first).to_be_visible()
    expect(result).to_contain_text("Top chunks")
    result.get_by_text("Raw JSON").click()
    expect(result.locator("pre.raw")).to_contain_text('"keywords": [')
    expect(page.page).to_have_url(f"{page.base_url}/#/jobs/{job_id}")
    page.screenshot("finished-job-detail.png")

    # Opening by URL shows the same job; closing returns to the list.
    page.page.goto(f"{page.base_url}/#/jobs/{job_id}")
    page.page.reload()
    expect(page.detail.locator(".badge")).to_have_text("Completed")
    page.page.get_by_role("button", name="Close job details").click()
    expect(page.detail).to_be_hidden()


def test_reload_mid_job_continues_from_where_it_was(stack: Stack, dashboard: OpenDashboard) -> None:
    page = dashboard()
    job_id = submit(stack.url, "analyze_document", analyze(0.35, summary_sentences=6))["id"]
    page.row(job_id).wait_for()
    page.wait_progress(job_id, 40)
    before = page.progress(job_id)

    page.reload()
    # At once, from the record GET /api/jobs returned: never back at zero.
    page.row(job_id).wait_for()
    after_reload = page.progress_history(job_id)
    assert after_reload and after_reload[0] >= before, (before, after_reload)
    expect(page.row(job_id).locator(".badge")).to_have_text("Running")

    page.expect_state(job_id, "Completed", timeout=30_000)
    history = page.progress_history(job_id)
    assert history == sorted(history), history  # it moved on, and only forwards
    assert history[-1] == 100 and min(history) >= before, (before, history)


def test_web_restart_shows_reconnecting_then_live_and_misses_no_step(
    make_stack: StackFactory, dashboard: OpenDashboard
) -> None:
    own = make_stack()
    port = own.webs[0].port
    job_id = submit(own.url, "analyze_document", analyze(0.6, summary_sentences=5))["id"]
    page = dashboard(own.url)
    page.page.goto(f"{own.url}/#/jobs/{job_id}")
    detail = page.detail
    expect(detail.locator(".timeline > li").nth(0).locator(".tl-state")).to_have_text(
        "Done", timeout=10_000
    )

    own.webs[0].stop()
    page.expect_connection("Reconnecting", timeout=10_000)
    page.screenshot("reconnecting.png")
    own.add_web(port=port)
    page.expect_connection("Live", timeout=20_000)

    expect(detail.locator(".badge")).to_have_text("Completed", timeout=30_000)
    page.expect_state(job_id, "Completed", timeout=10_000)
    steps = detail.locator(".timeline > li")
    for index, name in enumerate(ANALYZE_STEPS):
        step = steps.nth(index)
        expect(step.locator(".tl-name")).to_have_text(f"{index + 1}. {name}")
        expect(step.locator(".tl-state")).to_have_text("Done")
        expect(step.locator(".tl-time")).not_to_be_empty()
    # Each lifecycle event exactly once: nothing missed, nothing doubled by the resume.
    log = detail.locator(".log .log-text")
    assert_log_once_each(log.all_inner_texts())
    assert page.progress(job_id) == 100
    # Still one stream for the list: each reconnect replaced the one before, from its cursor.
    firehoses = [s["url"] for s in page.streams() if "/api/events" in s["url"]]
    assert len(firehoses) >= 2 and page.most_open_at_once("/api/events") == 1, firehoses
    assert "after=" in firehoses[-1], firehoses


def test_a_job_opened_while_the_server_is_away_is_shown_once_it_is_back(
    make_stack: StackFactory, dashboard: OpenDashboard
) -> None:
    own = make_stack()
    port = own.webs[0].port
    job_id = submit(own.url, "analyze_document", analyze(0.05))["id"]
    wait_state(own.url, job_id, {"completed"})
    page = dashboard(own.url)
    own.webs[0].stop()
    page.expect_connection("Reconnecting", timeout=10_000)
    record = f"/api/jobs/{job_id}"
    with page.page.expect_event(
        "requestfailed", predicate=lambda r: r.url.endswith(record), timeout=10_000
    ):
        page.page.goto(f"{own.url}/#/jobs/{job_id}")  # its record cannot be fetched now
    detail = page.detail
    # The list's copy stays shown, not a verdict that the job does not exist.
    expect(detail.locator(".detail-title")).to_have_text("Analyse a document")
    own.add_web(port=port)
    expect(detail.locator(".badge")).to_have_text("Completed", timeout=30_000)
    expect(detail.locator(".timeline > li")).to_have_count(len(ANALYZE_STEPS))


def test_cancel_a_running_job_and_retry_a_failed_one(
    stack: Stack, dashboard: OpenDashboard
) -> None:
    page = dashboard()
    # A job that fails on purpose, started from the form ("More options" › Fail At).
    page.choose_task("analyze_document")
    page.fill_sample()
    page.field("Pace").fill("0.05")
    page.open_more_options()
    page.field("Fail At").fill("Chunking document")
    failing = page.submit()["id"]

    # Paced to outlast a loaded machine's page: at load 6 a 0.5 s pace was past step 1 before
    # the row showed it. The test needs it running, at whichever step, when Cancel is clicked.
    slow = submit(stack.url, "analyze_document", analyze(2.0))["id"]
    row = page.row(slow)
    expect(row.locator(".job-step")).to_contain_text(re.compile(r"Step \d of 7"), timeout=15_000)
    row.get_by_role("button", name="Cancel").click()
    page.expect_state(slow, "Cancelled", timeout=10_000)
    expect(row.locator(".job-step")).to_contain_text("Cancelled")
    assert page.progress(slow) < 100
    expect(row.get_by_role("button", name="Retry")).to_be_visible()

    page.expect_state(failing, "Failed", timeout=15_000)
    failed_row = page.row(failing)
    expect(failed_row.locator(".job-message")).to_contain_text(
        "simulated failure at step 'Chunking document'"
    )
    detail = page.open_detail(failing)
    error = detail.locator(".error-box")
    expect(error).to_contain_text("The job failed at step 2 of 7 (Chunking document)")
    failed_step = detail.locator(".timeline > li").nth(1)
    expect(failed_step.locator(".tl-state")).to_have_text("Failed")
    expect(failed_row.locator(".job-step")).to_have_text(
        "Failed at step 2 of 7 · Chunking document"
    )
    expect(error).to_contain_text("simulated failure at step 'Chunking document', as the input")
    expect(error).to_contain_text("PermanentError")
    expect(detail.locator(".log")).to_contain_text("Failed: simulated failure")

    detail.get_by_role("button", name="Retry job").click()
    # It runs again (attempt 2) and, asked to fail, fails again: the view follows it live.
    expect(failed_row.locator(".job-attempt")).to_contain_text("Attempt 2", timeout=10_000)
    expect(detail.locator(".log")).to_contain_text("Queued again (retry)", timeout=10_000)
    expect(detail.locator(".log")).to_contain_text("Attempt 2 of")
    expect(detail.locator(".badge")).to_have_text("Failed", timeout=15_000)
    expect(detail.locator(".facts")).to_contain_text("2 of")
    page.expect_state(failing, "Failed")
    assert wait_state(stack.url, failing, {"failed"})["attempt"] == 2


def test_ten_jobs_at_once_all_update_live_on_one_page(
    stack: Stack, dashboard: OpenDashboard
) -> None:
    page = dashboard()
    # Each job reports half of its progress, then the rest, when the test releases it: the page
    # must show every job at 50 % before any ends, however slowly a loaded machine paints.
    ids = [submit(stack.url, "gated", {"events": 2})["id"] for _ in range(10)]
    for job_id in ids:
        page.row(job_id).wait_for(timeout=10_000)
    redis = stack.redis()
    for job_id in ids:
        redis.rpush(gate_key(job_id), "go")
    for job_id in ids:
        expect(page.bar(job_id)).to_have_attribute("aria-valuenow", "50", timeout=20_000)
    for job_id in ids:
        redis.rpush(gate_key(job_id), "go")
    for job_id in ids:
        page.expect_state(job_id, "Completed", timeout=30_000)
        expect(page.bar(job_id)).to_have_attribute("aria-valuenow", "100")
    for job_id in ids:
        history = page.progress_history(job_id)
        assert 50 in history, (job_id, history)
        assert history == sorted(history), (job_id, history)  # never backwards
    # One stream for the whole list, whatever the number of jobs.
    paths = {urlparse(s["url"]).path for s in page.streams()}
    assert paths == {"/api/events"}, paths
    assert page.most_open_at_once("/api/events") == 1, page.streams()

    # Anywhere on a row opens its job: on its progress bar too.
    page.bar(ids[0]).click()
    expect(page.detail).to_be_visible()
    expect(page.page).to_have_url(f"{page.base_url}/#/jobs/{ids[0]}")
    page.page.keyboard.press("Escape")
    expect(page.detail).to_be_hidden()
    box = page.row(ids[1]).locator(".job-elapsed").bounding_box()
    assert box is not None
    page.page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    expect(page.page).to_have_url(f"{page.base_url}/#/jobs/{ids[1]}")
    expect(page.detail.locator(".badge")).to_have_text("Completed")


def test_the_badge_trusts_the_stream_not_navigator_online(
    stack: Stack, dashboard: OpenDashboard
) -> None:
    """A browser that believes it is offline (a loopback server, a VPN) while the stream
    works: the badge says Live, and the page keeps updating."""
    page = dashboard()
    page.page.evaluate(
        """() => {
            Object.defineProperty(Navigator.prototype, "onLine", { get: () => false });
            window.dispatchEvent(new Event("offline"));
        }"""
    )
    job_id = submit(stack.url, "analyze_document", analyze(0.15))["id"]
    page.expect_state(job_id, "Completed", timeout=20_000)
    assert page.page.evaluate("navigator.onLine") is False
    expect(page.connection).to_have_attribute("data-state", "live")
    page.expect_connection("Live")


def test_a_batch_shows_its_parent_counting_items_and_every_child(
    stack: Stack, dashboard: OpenDashboard
) -> None:
    page = dashboard()
    single_gets: list[str] = []
    page.page.on(
        "request",
        lambda r: single_gets.append(r.url) if re.search(r"/api/jobs/[^/?]+$", r.url) else None,
    )
    inputs = [analyze(0.1, title=f"Chapter {i}") for i in range(1, 13)]
    response = http.post(
        f"{stack.url}/api/batches", json={"task": "analyze_document", "inputs": inputs}, timeout=10
    )
    assert response.status_code == 202, response.text
    parent = response.json()["id"]
    row = page.row(parent)
    expect(row.locator(".job-title")).to_have_text("Batch · Analyse a document")
    expect(row.locator(".job-label")).to_have_text("12 items")
    page.expect_state(parent, "Completed", timeout=30_000)
    expect(row.locator(".job-step")).to_have_text("Completed all 12 items")
    expect(row.locator(".job-message")).to_have_text("12 of 12 done")
    children = page.page.locator("li.job", has_text="Chapter")
    expect(children).to_have_count(12)
    expect(children.locator(".badge")).to_have_text(["Completed"] * 12)
    history = page.progress_history(parent)
    assert history == sorted(history) and any(0 < v < 100 for v in history), history
    # Thirteen new jobs were found with list fetches, not one request per job.
    assert len(single_gets) <= 3, single_gets

    detail = page.open_detail(parent)
    expect(detail.locator(".log")).to_contain_text("Item 12 completed")
    expect(detail.locator(".facts")).to_contain_text("12: 12 completed, 0 failed, 0 cancelled")


def test_production_mode_signs_in_with_an_api_key_and_renews_stream_tokens(
    browser: Browser, make_stack: StackFactory
) -> None:
    """Every /api call needs a key; streams use ?token=, here valid for 2 s only, so both of
    the page's streams outlive their tokens while the job runs and must carry on seamlessly."""
    own = make_stack(
        STEPSTREAM_MODE="production",
        STEPSTREAM_SECRET="dashboard-test-secret-0123456789abcdef",
        STEPSTREAM_API_KEYS="alice:alice-key-0123456789",
        STEPSTREAM_TOKEN_TTL_SECONDS="2",
    )
    page = Dashboard(browser, own.url).goto()
    try:
        signin = page.page.locator("#signin")
        expect(signin).to_be_visible()
        expect(page.connection).to_contain_text("Signed out")
        # It says where the key goes, as the code below checks: this tab's session storage.
        expect(signin.locator(".help")).to_contain_text("for this tab only (session storage)")
        key = signin.get_by_label("API key")
        key.fill("not-a-key")
        signin.get_by_role("button", name="Sign in").click()
        expect(signin.get_by_role("alert")).to_have_text("That API key is not valid.")
        key.fill("alice-key-0123456789")
        signin.get_by_role("button", name="Sign in").click()
        page.expect_connection("Live")
        expect(signin).to_be_hidden()
        # The key is kept for this tab's session only, never in localStorage.
        stored = page.page.evaluate(
            "() => [sessionStorage.getItem('stepstream.apiKey'), JSON.stringify(localStorage)]"
        )
        assert stored == ["alice-key-0123456789", "{}"], stored

        page.choose_task("analyze_document")
        page.fill_sample()
        page.field("Pace").fill("0.4")
        job_id = page.submit()["id"]
        detail = page.open_detail(job_id)
        expect(detail.locator(".badge")).to_have_text("Completed", timeout=30_000)
        page.expect_state(job_id, "Completed", timeout=10_000)
        steps = detail.locator(".timeline > li .tl-state")
        expect(steps).to_have_text(["Done"] * 7)
        log = detail.locator(".log .log-text")
        assert_log_once_each(log.all_inner_texts())
        history = page.progress_history(job_id)
        assert history == sorted(history) and history[-1] == 100, history
        assert any(0 < value < 100 for value in history), history
        # Streams were opened with tokens, never with the key.
        urls = [s["url"] for s in page.streams()]
        assert urls and all("token=" in url and "alice-key" not in url for url in urls), urls
        # ... and opened again, with a new token, when one ran out.
        firehose_tokens = [
            parse_qs(urlparse(url).query)["token"][0] for url in urls if "/api/events?" in url
        ]
        assert len(set(firehose_tokens)) >= 2, urls

        page.page.keyboard.press("Escape")
        page.page.get_by_role("button", name="Sign out").click()
        expect(signin).to_be_visible()
        assert page.errors == [], page.errors
    finally:
        page.close()


def test_html_in_an_input_is_shown_as_text_and_runs_nothing(
    stack: Stack, dashboard: OpenDashboard
) -> None:
    # The page is served with a policy that forbids inline script and style.
    policy = http.get(f"{stack.url}/", timeout=10).headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy, policy
    title = "<img src=x onerror=window.__xss=1>"
    text = "<script>window.__xss=2</script> Plain words follow here. Another sentence ends."
    page = dashboard()
    page.choose_task("analyze_document")
    page.fill_sample()
    page.field("Title").fill(title)
    page.field("Text").fill(text)
    page.field("Pace").fill("0")
    job_id = page.submit()["id"]

    row = page.row(job_id)
    expect(row.locator(".job-label")).to_have_text(title)
    page.expect_state(job_id, "Completed", timeout=15_000)
    detail = page.open_detail(job_id)
    expect(detail.locator(".detail-sub")).to_contain_text(title)
    result = detail.locator("section", has=page.page.locator("#result-title"))
    expect(result.get_by_text(title, exact=True)).to_be_visible()
    expect(result).to_contain_text("<script>window.__xss=2</script>")
    detail.get_by_text("Input (JSON)").click()
    expect(detail.locator("pre.raw").last).to_contain_text(title)
    assert page.page.evaluate("typeof window.__xss") == "undefined"
    assert page.page.locator("#jobs img, #detail img, #jobs script, #detail script").count() == 0


def test_screenshots_of_a_running_and_a_finished_job(
    make_stack: StackFactory, dashboard: OpenDashboard
) -> None:
    """Screenshots in test-artifacts/; STEPSTREAM_DOCS_SCREENSHOT=1 also writes docs/."""
    own = make_stack()  # a list of its own, for a tidy picture
    done = submit(own.url, "generate_quote", {**QUOTE, "pace": 0})["id"]
    submit(own.url, "analyze_document", analyze(0, title="Quarterly report"))
    submit(
        own.url,
        "analyze_document",
        analyze(0, title="Incident review", fail_at="Ranking chunks"),
    )
    wait_state(own.url, done, {"completed"})

    page = dashboard(own.url)
    page.choose_task("generate_quote")
    page.fill_sample()
    running = submit(
        own.url, "analyze_document", analyze(0.5, title="Board memo", summary_sentences=6)
    )["id"]
    other = submit(own.url, "generate_quote", {**QUOTE, "pace": 0.6, "client": "Globex"})["id"]
    submit(own.url, "analyze_document", analyze(0.25, title="Customer interviews"))
    page.wait_progress(running, 30)
    expect(page.row(other).locator(".badge")).to_have_text("Running")
    page.page.evaluate("window.scrollTo(0, 0)")
    page.screenshot("dashboard-running.png")
    if os.environ.get("STEPSTREAM_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(ARTIFACTS / "dashboard-running.png", ROOT / "docs" / "dashboard.png")

    page.open_detail(running)
    expect(page.detail.locator(".timeline > li").nth(2).locator(".tl-state")).to_have_text(
        "Done", timeout=10_000
    )
    page.screenshot("running-job-detail.png")
    page.page.get_by_role("button", name="Close job details").click()

    page.open_detail(done)
    expect(page.detail.locator(".badge")).to_have_text("Completed")
    page.screenshot("finished-job-detail.png")

    phone = dashboard(own.url, width=375, height=812)
    expect(phone.row(running).locator(".badge")).to_be_visible()
    phone.screenshot("phone.png")
    phone.page.locator("#jobs-title").scroll_into_view_if_needed()
    phone.screenshot("phone-jobs.png")
    # Nothing wider than the phone's screen.
    assert phone.page.evaluate("document.documentElement.scrollWidth") <= 375
    phone.page.goto(f"{own.url}/#/jobs/{running}")
    expect(phone.detail.locator(".badge")).to_be_visible()
    phone.screenshot("phone-detail.png")
    assert phone.page.evaluate("document.documentElement.scrollWidth") <= 375
