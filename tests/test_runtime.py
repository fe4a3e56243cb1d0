"""Retries with rules, checkpoints and timeouts, run by a real worker."""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import submit, wait_state
from tests.support.processes import wait_until
from tests.support.sse import Event, read_stream
from tests.support.tasks import executions_key, gate_key, holding_key


def full_log(base: str, job_id: str) -> list[Event]:
    status, events = read_stream(f"{base}/api/jobs/{job_id}/events?after=0")
    assert status == 200
    return events


def at(event: Event) -> datetime:
    return datetime.fromisoformat(event.data["at"])


def test_a_transient_failure_retries_with_backoff_and_completed_steps_do_not_rerun(
    stack: Stack,
) -> None:
    job = submit(stack.url, "counted", {"transient_failures": 2, "fail_at": "three"})
    done = wait_state(stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed"
    assert done["attempt"] == 3
    assert stack.redis().hgetall(executions_key(job["id"])) == {
        "one": "1",
        "two": "1",
        "three": "3",
        "four": "1",
        "five": "1",
    }
    log = full_log(stack.url, job["id"])
    types = [e.type for e in log]
    assert types.count("started") == 3 and types.count("retrying") == 2
    retrying = [e for e in log if e.type == "retrying"]
    assert [e.data["attempt"] for e in retrying] == [1, 2]
    assert all(e.data["max_attempts"] == 3 for e in retrying)
    assert retrying[0].data["error"]["type"] == "TransientError"
    assert retrying[0].data["error"]["step"] == "three"
    # Backoff 0.2 s then 0.4 s (this task has no jitter): the next start waits for retry_at.
    starts = [e for e in log if e.type == "started"]
    for retry, start, wait in zip(retrying, starts[1:], (0.2, 0.4), strict=True):
        assert (at(start) - at(retry)).total_seconds() >= wait * 0.9
        assert datetime.fromisoformat(retry.data["retry_at"]) <= at(start)
    # Steps one and two ran once; later attempts restored them from their checkpoints.
    restored = [e.data["step"]["name"] for e in log if e.data.get("restored")]
    assert restored == ["one", "two", "one", "two"]
    completed_for_real = [
        e.data["step"]["name"]
        for e in log
        if e.type == "step_completed" and not e.data.get("restored")
    ]
    assert completed_for_real == ["one", "two", "three", "four", "five"]


def test_a_permanent_failure_fails_at_once_with_the_step_and_a_traceback(stack: Stack) -> None:
    job = submit(stack.url, "counted", {"permanent_failure": True, "fail_at": "two"})
    done = wait_state(stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "failed"
    assert done["attempt"] == 1
    error = done["error"]
    assert error["type"] == "PermanentError" and error["step"] == "two"
    assert error["retryable"] is False
    assert "refused at two" in error["message"]
    assert "Traceback" in error["traceback"] and "PermanentError" in error["traceback"]
    assert done["input"] == {"permanent_failure": True, "fail_at": "two"}
    assert [s["state"] for s in done["steps"]][:2] == ["completed", "failed"]
    log = full_log(stack.url, job["id"])
    assert log[-1].type == "failed" and "retrying" not in [e.type for e in log]
    assert "traceback" not in log[-1].data["error"], "tracebacks stay in the record"


def test_invalid_output_is_a_permanent_failure(stack: Stack) -> None:
    # The demo's own validation step: an unknown role is refused without retrying.
    job = submit(stack.url, "generate_quote", {"roles": [{"role": "wizard"}], "weeks": 2})
    done = wait_state(stack.url, job["id"], {"failed"})
    assert done["attempt"] == 1
    assert "wizard" in done["error"]["message"]


def test_a_flaky_demo_job_recovers_on_its_own(stack: Stack) -> None:
    job = submit(
        stack.url,
        "analyze_document",
        {"text": "One sentence. Two sentences.", "flaky_attempts": 1, "fail_at": "Ranking chunks"},
    )
    done = wait_state(stack.url, job["id"], {"completed", "failed"}, timeout=60)
    assert done["state"] == "completed" and done["attempt"] == 2


def test_a_step_timeout_is_transient_then_fails_when_attempts_run_out(stack: Stack) -> None:
    job = submit(stack.url, "slow_step", {"sleep": 5, "timeout": 0.2})
    done = wait_state(stack.url, job["id"], {"completed", "failed"}, timeout=30)
    assert done["state"] == "failed"
    assert done["attempt"] == 2
    assert done["error"]["type"] == "StepTimeout"
    assert "timed out after 0.2s" in done["error"]["message"]
    log = full_log(stack.url, job["id"])
    assert [e.type for e in log].count("retrying") == 1


def test_a_task_s_concurrency_limit_holds_across_workers(make_stack: StackFactory) -> None:
    # One job at a time per worker: while one worker holds the slot, only the other can take
    # the next job, so both compete even when a loaded machine makes one of them slow to poll.
    s = make_stack(webs=1, workers=2, STEPSTREAM_MAX_JOBS="1")
    r = s.redis()
    r.delete("test:limited:running", "test:limited:max")
    # Both workers up (each has sent its first heartbeat) before the jobs are queued: otherwise
    # the first one can take all four before the second polls.
    wait_until(
        lambda: http.get(f"{s.url}/api/stats", timeout=5).json()["workers_alive"] == 2,
        20,
        0.05,
        "both workers' heartbeats",
    )
    jobs = [submit(s.url, "limited", {"hold": 0.8}) for _ in range(4)]
    for job in jobs:
        done = wait_state(s.url, job["id"], {"completed", "failed"}, timeout=60)
        assert done["state"] == "completed" and done["attempt"] == 1
    assert r.get("test:limited:max") == "1", "two jobs of a limit-1 task ran at once"
    picked = [sum(job["id"] in w.log() for job in jobs) for w in s.workers]
    assert all(picked), f"both workers should have competed for the slot: {picked}"


def test_a_failure_names_the_step_it_happened_in(stack: Stack) -> None:
    job = submit(stack.url, "analyze_document", {"text": "One. Two.", "fail_at": "Ranking chunks"})
    done = wait_state(stack.url, job["id"], {"failed"})
    assert done["error"]["step"] == "Ranking chunks"
    states = {s["name"]: s["state"] for s in done["steps"]}
    assert states["Embedding chunks"] == "completed" and states["Ranking chunks"] == "failed"


@pytest.mark.slow
def test_a_job_that_does_not_stop_when_cancelled_is_reported_with_where_it_is(
    stack: Stack,
) -> None:
    job = submit(stack.url, "stubborn", {})
    r = stack.redis()
    try:
        wait_state(stack.url, job["id"], {"running"}, timeout=20)
        # Running is not enough: a cancel that lands while the task enters its step ends it.
        wait_until(
            lambda: r.exists(holding_key(job["id"])),
            20,
            what="the task waiting where it swallows its interruption",
        )
        assert http.post(f"{stack.url}/api/jobs/{job['id']}/cancel").status_code == 202
        log = stack.workers[0].log

        def reported() -> bool:
            return f"job {job['id']} was interrupted by its cancel" in log()

        wait_until(reported, 30, what="the worker to report the job that did not stop")
        report = log()[log().index(f"job {job['id']} was interrupted") :]
        assert "has not stopped" in report
        assert "in stubborn" in report, "the report says where the task is stuck"
    finally:
        r.rpush(gate_key(job["id"]), "go")
    assert wait_state(stack.url, job["id"], {"completed", "cancelled", "failed"}, timeout=20)
