"""Delayed jobs (``run_at`` or ``delay`` keeps a job ``scheduled`` until its time) and recurring
jobs declared in code (cron syntax, arq's cron)."""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime, timedelta
from typing import cast

import httpx
import pytest

from stepstream import Client, JobState
from stepstream.tasks.recurring import cron_schedules, next_ticks, parse_cron
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.ai_tasks import executions_key
from tests.support.api import get_job, wait_state
from tests.support.cli import run_cli
from tests.support.sse import read_stream

AI_TASKS = "tests.support.tasks,tests.support.ai_tasks"


@pytest.fixture(scope="module")
def ai_stack(module_stacks: StackFactory) -> Stack:
    return module_stacks(STEPSTREAM_TASK_MODULES=AI_TASKS)


def post(stack: Stack, body: dict[str, object]) -> httpx.Response:
    return http.post(f"{stack.url}/api/jobs", json=body, timeout=10)


def rfc3339(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_delayed_job_is_scheduled_and_starts_no_earlier_than_its_time(ai_stack: Stack) -> None:
    # Five seconds: a loaded machine (flake-rate, load 11) took over two for the checks below.
    delay = 5
    submitted = time.time()
    response = post(ai_stack, {"task": "ai_echo", "input": {"counter": "delay"}, "delay": delay})
    answered = time.time()
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "scheduled"
    run_at = datetime.fromisoformat(job["run_at"])
    # The delay from when the server took the request (microseconds in the answer).
    assert submitted + delay - 1e-3 <= run_at.timestamp() <= answered + delay + 1e-3

    listed = http.get(f"{ai_stack.url}/api/jobs?status=scheduled", timeout=10).json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]
    time.sleep(0.5)
    state = get_job(ai_stack.url, job["id"])["state"]
    executions = ai_stack.redis().get(executions_key("delay"))
    assert time.time() < run_at.timestamp(), "looked after the job was due: tested nothing"
    assert state == "scheduled" and executions is None

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


def test_the_client_and_the_cli_schedule_jobs(ai_stack: Stack) -> None:
    """A backend schedules through the client (a delay, an aware datetime) and an operator
    through the CLI; each job is scheduled at the time asked and runs no earlier."""
    with Client(ai_stack.url) as client:
        before = time.time()
        delayed = client.submit("ai_echo", {"counter": "client-delay"}, delay=2)
        when = datetime.now(UTC) + timedelta(seconds=2)
        timed = client.submit("ai_echo", {"counter": "client-run-at"}, run_at=when)
        with pytest.raises(ValueError, match="timezone"):
            client.submit("ai_echo", {}, run_at=datetime.now())
        with pytest.raises(ValueError, match="not both"):
            client.submit("ai_echo", {}, delay=1, run_at=when)
    assert delayed.state is JobState.scheduled and timed.state is JobState.scheduled
    assert delayed.run_at is not None and timed.run_at == rfc3339(when)
    assert datetime.fromisoformat(delayed.run_at).timestamp() >= before + 2 - 1e-3

    cli = run_cli(ai_stack.url, "submit", "ai_echo", "--input", "{}", "--delay", "2", "--json")
    assert cli.returncode == 0, cli.stderr
    from_cli = json.loads(cli.stdout)
    assert from_cli["state"] == "scheduled" and from_cli["run_at"]
    both = run_cli(
        ai_stack.url, "submit", "ai_echo", "--delay", "1", "--run-at", "2030-01-01T09:00Z"
    )
    assert both.returncode == 64 and "not allowed with" in both.stderr

    for job_id, run_at in (
        (delayed.id, delayed.run_at),
        (timed.id, timed.run_at),
        (from_cli["id"], from_cli["run_at"]),
    ):
        done = wait_state(ai_stack.url, job_id, {"completed", "failed"})
        assert done["state"] == "completed"
        assert done["result"]["started_at"] >= datetime.fromisoformat(run_at).timestamp()


def test_a_cancelled_scheduled_job_never_runs(ai_stack: Stack) -> None:
    job = post(ai_stack, {"task": "ai_echo", "input": {"counter": "never"}, "delay": 2}).json()
    cancelled = http.post(f"{ai_stack.url}/api/jobs/{job['id']}/cancel", timeout=10)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    # Past the time it was due, with a second for a worker to (wrongly) take it.
    time.sleep(max(0.0, datetime.fromisoformat(job["run_at"]).timestamp() - time.time()) + 1)
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
        {"run_at": "0001-01-01T00:00:00+01:00"},  # overflows when turned to UTC
        {"run_at": "9999-12-31T23:59:59Z"},
        {"run_at": "2030-01-01T09:00:00Z", "delay": 5},
        {"when": 5},
    ],
)
def test_bad_schedules_are_refused(ai_stack: Stack, extra: dict[str, object]) -> None:
    response = post(ai_stack, {"task": "ai_echo", "input": {}, **extra})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_body"


# -- recurring jobs -----------------------------------------------------------------------


def test_cron_expressions_become_arq_schedules() -> None:
    assert parse_cron("*/15 9-17 * * 1-5") == {
        "second": {0},
        "minute": {0, 15, 30, 45},
        "hour": set(range(9, 18)),
        "day": None,
        "month": None,
        "weekday": {0, 1, 2, 3, 4},  # Monday to Friday in Python's (arq's) numbering
    }
    assert parse_cron("0 3 1,15 * 0")["weekday"] == {6}  # cron's Sunday
    assert cron_schedules("*/15 9-17 * * 1-5") == [parse_cron("*/15 9-17 * * 1-5")]
    assert parse_cron("0 3 * * 7")["weekday"] == {6}
    assert parse_cron("* * * * * */20")["second"] == {0, 20, 40}
    assert parse_cron("5/20 * * * *")["minute"] == {5, 25, 45}
    for bad in ("* * * *", "61 * * * *", "a * * * *", "*/0 * * * *", "5-1 * * * *"):
        with pytest.raises(ValueError):
            parse_cron(bad)


def test_day_of_month_and_day_of_week_together_mean_either_as_in_cron() -> None:
    """crontab(5): "the 1st and 15th of each month, as well as on every Sunday"."""
    start = datetime(2026, 12, 1, 4, 0)  # a Tuesday, after that day's 03:00
    ticks = [t.strftime("%a %d %H:%M") for t in next_ticks("0 3 1,15 * 0", start, 6)]
    assert ticks == [
        "Sun 06 03:00",
        "Sun 13 03:00",
        "Tue 15 03:00",
        "Sun 20 03:00",
        "Sun 27 03:00",
        "Fri 01 03:00",
    ]
    # A day that is both the 15th and a Sunday fires once.
    both = next_ticks("0 3 15 * 0", datetime(2027, 8, 14, 4, 0), 2)
    assert [t.strftime("%a %d") for t in both] == ["Sun 15", "Sun 22"]
    # With one day field left as *, the other alone decides, as before.
    assert [t.day for t in next_ticks("0 3 1,15 * *", start, 2)] == [15, 1]


def test_a_recurring_job_creates_ordinary_jobs_once_per_tick(make_stack: StackFactory) -> None:
    # Two workers: arq's unique cron id lets one of them create each tick's job.
    stack = make_stack(workers=2, STEPSTREAM_TASK_MODULES=AI_TASKS + ",tests.support.ai_recurring")
    deadline = time.monotonic() + 20
    jobs: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        listed = http.get(f"{stack.url}/api/jobs?task=ai_echo&limit=50", timeout=10).json()
        jobs = [j for j in listed["jobs"] if j["state"] == "completed"]
        if len(jobs) >= 3:
            break
        time.sleep(0.2)
    assert len(jobs) >= 3
    created = sorted(datetime.fromisoformat(str(j["created_at"])) for j in jobs)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(created)]
    assert all(gap >= 1.5 for gap in gaps), f"one job per 2-second tick: {gaps}"
    first = jobs[-1]
    _, log = read_stream(f"{stack.url}/api/jobs/{first['id']}/events?after=0")
    assert [e.type for e in log][:2] == ["queued", "started"] and log[-1].type == "completed"
    assert log[0].data["recurring"] == "tick"
    time.sleep(0.5)
    listed = http.get(f"{stack.url}/api/jobs?task=ai_echo&limit=50", timeout=10).json()["jobs"]
    runs = int(cast(str, stack.redis().get(executions_key("tick"))))
    # Each job ran once (a tick may be mid-flight: between its completed jobs and all of them).
    assert len([j for j in listed if j["state"] == "completed"]) <= runs <= len(listed)


def test_resending_a_delayed_request_with_its_idempotency_key_finds_the_same_job(
    ai_stack: Stack,
) -> None:
    body = {"task": "ai_echo", "input": {"counter": "idem"}, "delay": 30}
    headers = {"Idempotency-Key": "delayed-once"}
    first = http.post(f"{ai_stack.url}/api/jobs", json=body, headers=headers, timeout=10)
    time.sleep(0.3)
    again = http.post(f"{ai_stack.url}/api/jobs", json=body, headers=headers, timeout=10)
    assert (first.status_code, again.status_code) == (202, 200), again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["run_at"] == first.json()["run_at"]
    other = http.post(
        f"{ai_stack.url}/api/jobs", json={**body, "delay": 31}, headers=headers, timeout=10
    )
    assert other.status_code == 409
    http.post(f"{ai_stack.url}/api/jobs/{first.json()['id']}/cancel", timeout=10)


def test_scheduled_jobs_count_toward_the_owners_unfinished_jobs(make_stack: StackFactory) -> None:
    stack = make_stack(
        workers=0, STEPSTREAM_TASK_MODULES=AI_TASKS, STEPSTREAM_MAX_UNFINISHED_PER_OWNER="2"
    )
    body = {"task": "ai_echo", "input": {}, "delay": 60}
    first, second = (post(stack, body).json() for _ in range(2))
    refused = post(stack, body)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_unfinished_jobs"
    http.post(f"{stack.url}/api/jobs/{first['id']}/cancel", timeout=10)
    assert post(stack, body).status_code == 202, "a cancelled scheduled job no longer counts"
    assert get_job(stack.url, second["id"])["state"] == "scheduled"
