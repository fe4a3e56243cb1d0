"""The dashboard's view of a parent job and its children, in real headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from tests.conftest import Stack
from tests.support.api import submit
from tests.support.browser import Dashboard, chromium, requires_chromium

pytestmark = [pytest.mark.browser, requires_chromium]

DOCUMENTS = [f"Document {i} has a first sentence. It has a second one too." for i in range(1, 7)]


@pytest.fixture
def page(stack: Stack) -> Iterator[Dashboard]:
    with chromium() as browser:
        dashboard = Dashboard(browser, stack.url).open()
        try:
            yield dashboard
            assert dashboard.errors == [], "the page logged errors or CSP violations"
        finally:
            dashboard.close()


def test_a_parent_s_detail_lists_its_children_live_with_links_both_ways(
    stack: Stack, page: Dashboard
) -> None:
    parent = submit(
        stack.url,
        "analyze_corpus",
        # Slow enough (each child about 3 s, two at a time) that a page opened on a loaded
        # machine still finds children running: the test fails if it saw none.
        {"documents": DOCUMENTS, "pace": 0.4, "concurrency": 2},
    )["id"]
    detail = page.open_detail(parent)
    rows = detail.locator(".child-row")
    # Live: children show up running, then end one by one, while the parent waits.
    expect(rows.locator(".badge", has_text="Running").first).to_be_visible(timeout=20_000)
    done = detail.locator('.child-row[data-state="completed"]')
    expect(done).not_to_have_count(0, timeout=20_000)
    assert done.count() < len(DOCUMENTS), "every child had ended before any was seen running"
    expect(rows).to_have_count(len(DOCUMENTS), timeout=60_000)
    expect(done).to_have_count(len(DOCUMENTS), timeout=60_000)
    page.expect_state(parent, "Completed", timeout=60_000)
    expect(detail.locator(".facts")).to_contain_text("6: 6 completed, 0 failed, 0 cancelled")
    expect(rows.locator(".child-link")).to_have_text(
        [f"{i}. Analyse a document" for i in range(1, 7)]
    )

    # A child's detail links back to its parent.
    first = rows.first
    child = first.get_attribute("data-id")
    first.locator(".child-link").click()
    expect(page.page).to_have_url(f"{page.base_url}/#/jobs/{child}")
    back = detail.locator(".parent-link")
    expect(back).to_have_text(f"child 1 of job {parent[:8]}", timeout=10_000)
    back.click()
    expect(page.page).to_have_url(f"{page.base_url}/#/jobs/{parent}")
