"""The dashboard answers a waiting job, in real headless Chromium against real processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, expect

from tests.conftest import Stack
from tests.support.api import submit, wait_state
from tests.support.browser import Dashboard, chromium, requires_chromium
from tests.test_inputs import full_log, waiting

pytestmark = [pytest.mark.browser, requires_chromium]

QUOTE = {
    "client": "Initech",
    "roles": [{"role": "ml_engineer", "level": "senior", "count": 2}],
    "weeks": 8,
    "review": True,
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def test_the_approval_form_of_a_quote_under_review_completes_it(
    browser: Browser, make_stack_module: Stack
) -> None:
    s = make_stack_module
    job = submit(s.url, "generate_quote", QUOTE)
    waiting(s.url, job["id"])
    page = Dashboard(browser, s.url).open()
    try:
        page.expect_state(job["id"], "Waiting for input")
        detail = page.open_detail(job["id"])
        form = detail.locator("form.input-form")
        expect(form).to_be_visible(timeout=10_000)
        expect(form).to_contain_text("Approve the costs for Initech")
        approved = form.get_by_label("Approved")
        expect(approved).to_have_attribute("type", "checkbox")
        expect(form.get_by_label("Note")).to_have_attribute("type", "text")
        # Sent unticked with a note: a rejection would cancel; tick it first.
        approved.check()
        form.get_by_label("Note").fill("Looks right")
        form.get_by_role("button", name="Send").click()
        expect(detail.locator(".badge")).to_have_text("Completed", timeout=15_000)
        answers = detail.locator(".answers")
        expect(answers).to_contain_text('{"approved":true,"note":"Looks right"}')
        expect(answers).to_contain_text("by anonymous")
        expect(form).to_have_count(0)
        expect(detail.locator(".log")).to_contain_text("Input “approval” given by anonymous")
        page.expect_state(job["id"], "Completed")
    finally:
        page.close()
    assert page.errors == [], "the page logged errors or CSP violations"
    done = wait_state(s.url, job["id"], {"completed"})
    assert done["answers"]["approval"]["value"] == {"approved": True, "note": "Looks right"}
    assert [e.type for e in full_log(s.url, job["id"])].count("input") == 1
