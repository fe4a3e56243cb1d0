"""Budgets: a job whose next LLM call would cost more than it has left fails permanently, and
the call is never made."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import submit, wait_state
from tests.support.chat_server import ChatServer, chat_server, reply

AI_TASKS = "tests.support.tasks,tests.support.ai_tasks"


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatServer]:
    with chat_server() as server:
        yield server


@pytest.fixture(scope="module")
def llm_stack(module_stacks: StackFactory, chat: ChatServer) -> Stack:
    return module_stacks(
        STEPSTREAM_TASK_MODULES=AI_TASKS,
        STEPSTREAM_LLM_PROVIDER="openai",
        STEPSTREAM_LLM_BASE_URL=chat.url,
    )


def post(stack: Stack, body: dict[str, object]) -> httpx.Response:
    return http.post(f"{stack.url}/api/jobs", json=body, timeout=10)


def test_the_task_budget_stops_the_job_before_the_call_that_would_exceed_it(
    llm_stack: Stack, chat: ChatServer
) -> None:
    # llm_spend: 0.01 a call, a default budget of 0.025: two calls fit, the third does not.
    chat.reset(default=reply("ok", 10, 1))
    job = submit(llm_stack.url, "llm_spend", {"calls": 5})
    done = wait_state(llm_stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "failed"
    error = done["error"]
    assert error["type"] == "BudgetExceeded" and error["retryable"] is False
    assert error["step"] == "call 3"
    assert "budget exceeded" in error["message"] and "0.025" in error["message"]
    assert done["attempt"] == 1, "a budget is not retried"
    assert len(chat.requests) == 2, "the local server saw no call past the budget"
    assert done["cost"] == pytest.approx(0.02)
    assert done["usage"]["calls"] == 2
    states = [s["state"] for s in done["steps"]]
    assert states == ["completed", "completed", "failed", "pending", "pending"]


def test_the_submit_body_sets_a_jobs_budget(llm_stack: Stack, chat: ChatServer) -> None:
    chat.reset(default=reply("ok", 10, 1))
    tight = post(llm_stack, {"task": "llm_spend", "input": {"calls": 5}, "budget": 0.015})
    assert tight.status_code == 202, tight.text
    assert tight.json()["budget"] == 0.015
    done = wait_state(llm_stack.url, tight.json()["id"], {"completed", "failed"})
    assert done["state"] == "failed" and done["error"]["type"] == "BudgetExceeded"
    assert len(chat.requests) == 1

    chat.reset(default=reply("ok", 10, 1))
    roomy = post(llm_stack, {"task": "llm_spend", "input": {"calls": 5}, "budget": 1})
    done = wait_state(llm_stack.url, roomy.json()["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    assert len(chat.requests) == 5
    assert done["cost"] == pytest.approx(0.05) and done["usage"]["calls"] == 5


def test_a_budget_must_be_a_number_of_at_least_zero(llm_stack: Stack) -> None:
    for bad in (-1, "10", True, [1]):
        response = post(llm_stack, {"task": "llm_spend", "input": {}, "budget": bad})
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["code"] == "invalid_body"
