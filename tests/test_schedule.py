"""Delayed jobs: ``run_at`` or ``delay`` keeps a job ``scheduled`` until its time."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.conftest import Stack, StackFactory
from tests.support.ai_tasks import executions_key
from tests.support.api import get_job, wait_state
from tests.support.sse import read_stream

AI_TASKS = "tests.support.tasks,tests.support.ai_tasks"


@pytest.fixture(scope="module")
def ai_stack(module_stacks: StackFactory) -> Stack:
    return module_stacks(STEPSTREAM_TASK_MODULES=AI_TASKS)


def post(stack: Stack, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{stack.url}/api/jobs", json=body, timeout=10)


def rfc3339(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_delayed_job_is_scheduled_and_starts_no_earlier_than_its_time(ai_stack: Stack) -> None:
    submitted = time.time()
    response = post(ai_stack, {"task": "ai_echo", "input": {"counter": "delay"}, "delay": 2})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "scheduled"
    run_at = datetime.fromisoformat(job["run_at"])
    assert abs(run_at.timestamp() - (submitted + 2)) < 1

    listed = httpx.get(f"{ai_stack.url}/api/jobs?status=scheduled", timeout=10).json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]
    time.sleep(1)
    assert get_job(ai_stack.url, job["id"])["state"] == "scheduled"
    assert ai_stack.redis().get(executions_key("delay")) is None

    done = wait_state(ai_stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed"
    assert done["result"]["started_at"] >= run_at.timestamp()
    _, log = read_stream(f"{ai_stack.url}/api/jobs/{job['id']}/events?after=0")
    assert [e.type for e in log][:2] == ["queued", "started"]
    assert log[0].data["run_at"] == job["run_at"]
    assert datetime.fromisoformat(log[1].data["at"]) >= run_at


def test_run_at_takes_an_rfc3339_time_and_a_past_time_means_now(ai_stack: Stack) -> None:
    when = datetime.now(UTC) + timedelta(seconds=1.5)
    local = when.astimezone(datetime.now().astimezone().tzinfo)
    job = post(
        ai_stack, {"task": "ai_echo", "input": {"counter": "run_at"}, "run_at": local.isoformat()}
    ).json()
    assert job["state"] == "scheduled" and job["run_at"] == rfc3339(when)
    past = post(
        ai_stack,
        {"task": "ai_echo", "input": {}, "run_at": "2001-01-01T00:00:00Z"},
    ).json()
    assert past["state"] == "queued" and past["run_at"] is None
    done = wait_state(ai_stack.url, job["id"], {"completed", "failed"})
    assert done["result"]["started_at"] >= when.timestamp()


def test_a_cancelled_scheduled_job_never_runs(ai_stack: Stack) -> None:
    job = post(ai_stack, {"task": "ai_echo", "input": {"counter": "never"}, "delay": 1}).json()
    cancelled = httpx.post(f"{ai_stack.url}/api/jobs/{job['id']}/cancel", timeout=10)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    time.sleep(2)
    assert get_job(ai_stack.url, job["id"])["state"] == "cancelled"
    assert ai_stack.redis().get(executions_key("never")) is None


@pytest.mark.parametrize(
    "extra",
    [
        {"delay": -1},
        {"delay": "soon"},
        {"delay": 10**9},
        {"run_at": "tomorrow"},
        {"run_at": "2030-01-01T09:00:00"},  # no zone
        {"run_at": "2030-01-01"},
        {"run_at": "2030-01-01T09:00:00Z", "delay": 5},
        {"when": 5},
    ],
)
def test_bad_schedules_are_refused(ai_stack: Stack, extra: dict[str, object]) -> None:
    response = post(ai_stack, {"task": "ai_echo", "input": {}, **extra})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_body"
