"""A step's streamed text on the dashboard, in real headless Chromium: it grows under the
running step, and a reload mid-stream shows the text so far, then goes on to the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser

from tests.conftest import StackFactory
from tests.support.api import get_job, submit, wait_state
from tests.support.browser import Dashboard, chromium, requires_chromium
from tests.support.output_tasks import streamed_text
from tests.support.tasks import gate_key

pytestmark = [pytest.mark.browser, requires_chromium]

OUTPUT_TASKS = "tests.support.tasks,tests.support.output_tasks"
STEP_TEXT = "#detail .timeline li:nth-child(2) .tl-text"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def shown_text(page: Dashboard) -> str:
    text: str = page.page.evaluate(f"document.querySelector({STEP_TEXT!r})?.textContent ?? ''")
    return text


@pytest.mark.slow  # a 3 s stream watched across a page load: about 14 s in all
def test_reload_mid_stream_keeps_the_text_and_it_grows_to_the_end(
    browser: Browser, make_stack: StackFactory
) -> None:
    s = make_stack(STEPSTREAM_TASK_MODULES=OUTPUT_TASKS)
    words = 150
    final = streamed_text(words)
    # Held at word 75 until the page has reloaded: the reload lands mid-stream on any machine.
    job = submit(s.url, "streamer", {"words": words, "word_seconds": 0.02, "gate_at": 75})
    page = Dashboard(browser, s.url)
    try:
        page.open(f"/#/jobs/{job['id']}")
        page.page.wait_for_function(
            f"() => (document.querySelector({STEP_TEXT!r})?.textContent ?? '').length > 300",
            timeout=20_000,
        )
        before = shown_text(page)
        assert final.startswith(before), "the text shown is not the text written"
        page.reload()
        page.page.wait_for_function(
            f"() => (document.querySelector({STEP_TEXT!r})?.textContent ?? '').length > 0",
            timeout=15_000,
        )
        after_reload = shown_text(page)
        record = get_job(s.url, job["id"])
        assert record["steps"][1]["state"] == "running", "the stream ended before the reload"
        assert final.startswith(after_reload), after_reload[-80:]
        assert len(after_reload) >= len(before), "the reload lost text"
        assert len(after_reload) < len(final), "the reload came after the stream had ended"
        s.redis().rpush(gate_key(job["id"]), "go")
        # It keeps going, and every text on the way is the start of the final one.
        page.page.wait_for_function(
            """([selector, final]) => {
                const text = document.querySelector(selector)?.textContent ?? '';
                window.__texts = window.__texts || [];
                window.__texts.push(text);
                return text === final;
            }""",
            arg=[STEP_TEXT, final],
            timeout=20_000,
            polling=50,
        )
        seen: list[str] = page.page.evaluate("window.__texts")
        assert all(final.startswith(text) for text in seen)
        assert len({len(text) for text in seen}) > 2, "the text did not grow in steps"
        assert shown_text(page) == final
        done = wait_state(s.url, job["id"], {"completed"})
        assert done["steps"][1]["text"] == final
        assert page.errors == [], "the page logged errors or CSP violations"
    finally:
        page.close()
