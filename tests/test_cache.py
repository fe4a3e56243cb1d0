"""Cached results: the same input within a task's ``cache_ttl`` completes at once, unrun."""

from __future__ import annotations

from typing import Any, cast

import pytest

from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.ai_tasks import executions_key
from tests.support.api import submit, wait_state
from tests.support.sse import read_stream

AI_TASKS = "tests.support.tasks,tests.support.ai_tasks"


@pytest.fixture(scope="module")
def ai_stack(module_stacks: StackFactory) -> Stack:
    return module_stacks(STEPSTREAM_TASK_MODULES=AI_TASKS)


def runs(stack: Stack, counter: str) -> int:
    value = cast(str | None, stack.redis().get(executions_key(counter)))
    return int(value or 0)


def test_the_same_input_returns_the_cached_result_without_running(ai_stack: Stack) -> None:
    first = submit(ai_stack.url, "ai_cached", {"value": 21, "counter": "cache-a"})
    assert first["cached"] is False
    done = wait_state(ai_stack.url, first["id"], {"completed", "failed"})
    assert done["state"] == "completed" and done["result"]["value"] == 42
    assert runs(ai_stack, "cache-a") == 1

    # Keys in another order are the same input.
    again = submit(ai_stack.url, "ai_cached", {"counter": "cache-a", "value": 21})
    assert again["id"] != first["id"]
    assert again["state"] == "completed" and again["cached"] is True
    assert again["result"] == done["result"]
    assert first["id"] in again["message"]
    status, log = read_stream(f"{ai_stack.url}/api/jobs/{again['id']}/events?after=0")
    assert status == 200
    assert [e.type for e in log] == ["queued", "completed"]
    assert log[-1].data["cached"] is True and log[-1].data["source"] == first["id"]

    other = submit(ai_stack.url, "ai_cached", {"value": 22, "counter": "cache-a"})
    assert other["state"] == "queued" and other["cached"] is False
    assert wait_state(ai_stack.url, other["id"], {"completed"})["result"]["value"] == 44
    assert runs(ai_stack, "cache-a") == 2


def test_tasks_without_cache_ttl_always_run(ai_stack: Stack) -> None:
    for _ in range(2):
        job = submit(ai_stack.url, "ai_echo", {"value": 1, "counter": "cache-b"})
        assert wait_state(ai_stack.url, job["id"], {"completed"})["cached"] is False
    assert runs(ai_stack, "cache-b") == 2


def test_a_failed_job_is_not_cached(ai_stack: Stack) -> None:
    body = {"value": 5, "counter": "cache-c", "fail": True}
    for _ in range(2):
        job = submit(ai_stack.url, "ai_cached", body)
        assert wait_state(ai_stack.url, job["id"], {"completed", "failed"})["state"] == "failed"
    assert runs(ai_stack, "cache-c") == 2


def test_a_cached_job_keeps_its_own_subject(ai_stack: Stack) -> None:
    def submit_for(subject: str) -> dict[str, Any]:
        body = {"task": "ai_cached", "input": {"value": 7, "counter": "cache-s"}}
        response = http.post(f"{ai_stack.url}/api/jobs", json={**body, "subject": subject})
        assert response.status_code == 202, response.text
        job: dict[str, Any] = response.json()
        return job

    first = submit_for("s-1")
    assert wait_state(ai_stack.url, first["id"], {"completed"})["subject"] == "s-1"
    again = submit_for("s-2")
    assert again["cached"] is True and again["subject"] == "s-2"
    listed = http.get(f"{ai_stack.url}/api/jobs", params={"subject": "s-2"}).json()["jobs"]
    assert [j["id"] for j in listed] == [again["id"]]


def test_a_batch_counts_its_cached_children_as_it_is_created(ai_stack: Stack) -> None:
    warm = [{"value": v, "counter": "cache-batch"} for v in (31, 32)]
    for item in warm:
        job = submit(ai_stack.url, "ai_cached", item)
        assert wait_state(ai_stack.url, job["id"], {"completed"})["cached"] is False

    def post(inputs: list[dict[str, Any]]) -> dict[str, Any]:
        response = http.post(
            f"{ai_stack.url}/api/batches", json={"task": "ai_cached", "inputs": inputs}
        )
        assert response.status_code == 202, response.text
        parent: dict[str, Any] = response.json()
        return parent

    # Every child cached: the batch is complete in the answer, its log whole.
    whole = post(warm)
    assert whole["state"] == "completed"
    assert whole["batch"] == {"size": 2, "done": 2, "completed": 2, "failed": 0, "cancelled": 0}
    status, log = read_stream(f"{ai_stack.url}/api/jobs/{whole['id']}/events?after=0")
    assert status == 200
    assert [e.type for e in log] == ["queued", "started", "progress", "progress", "completed"]
    assert [e.data["child"]["result"]["value"] for e in log[2:4]] == [62, 64]
    assert [e.data["current"] for e in log[2:4]] == [1, 2]

    # One cached, one to run: counted at once, then the other as it ends, once each.
    mixed = post([warm[0], {"value": 33, "counter": "cache-batch"}])
    assert mixed["state"] == "running" and mixed["batch"]["done"] == 1
    done = wait_state(ai_stack.url, mixed["id"], {"completed"})
    assert done["batch"] == {"size": 2, "done": 2, "completed": 2, "failed": 0, "cancelled": 0}
    status, log = read_stream(f"{ai_stack.url}/api/jobs/{mixed['id']}/events?after=0")
    reported = [e.data["child"]["index"] for e in log if e.type == "progress"]
    assert reported == [0, 1]
    assert runs(ai_stack, "cache-batch") == 3
