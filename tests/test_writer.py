"""A task's burst of progress through the job's EventWriter, in a real worker."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import Stack
from tests.support import http
from tests.support.api import submit, wait_state
from tests.support.processes import wait_until


def script_calls(stack: Stack) -> int:
    stats: dict[str, Any] = stack.redis().info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def stored_events(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    rows = stack.redis().xrange(f"{stack.prefix}job:{{{job_id}}}:events")
    return [json.loads(fields["e"]) for _, fields in rows]


def test_a_burst_of_progress_is_stored_whole_and_in_order_in_few_round_trips(
    make_stack_module: Stack,
) -> None:
    s = make_stack_module
    events = 3_000
    before = script_calls(s)
    job = submit(s.url, "burst", {"events": events})
    done = wait_state(s.url, job["id"], {"completed", "failed"})
    calls = script_calls(s) - before
    assert done["state"] == "completed"
    log = stored_events(s, job["id"])
    types = [e["type"] for e in log]
    progress = [e["current"] for e in log if e["type"] == "progress"]
    assert progress == list(range(1, events + 1)), "every event, once, in order"
    # The last progress is in the log before the step ends and the job completes.
    assert types[-3:] == ["progress", "step_completed", "completed"]
    # Events gathered while an append was answered went together: fewer script calls than
    # events (one per event, and more for the step and the job, before the writer). How many
    # fewer depends on the machine's speed, so no ratio is asserted.
    assert calls < events, f"{calls} script calls for {events} events"


def test_a_cancel_stops_a_task_in_a_tight_progress_loop_with_nothing_after_it(
    make_stack_module: Stack,
) -> None:
    s = make_stack_module
    job = submit(s.url, "burst", {"events": 100_000, "padding": 1_000})
    r = s.redis()
    record = f"{s.prefix}job:{{{job['id']}}}"
    wait_until(lambda: r.hget(record, "state") == '"running"', 20, what="the job runs")
    wait_until(lambda: (r.hget(record, "message") or "null") != "null", 20, what="progress")
    response = http.post(f"{s.url}/api/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    done = wait_state(s.url, job["id"], {"cancelled", "completed", "failed"}, timeout=15)
    assert done["state"] == "cancelled"
    log = stored_events(s, job["id"])
    assert log[-1]["type"] == "cancelled"
    # The log may have been trimmed at its start; what it keeps has no gap.
    progress = [e["current"] for e in log if e["type"] == "progress"]
    assert progress and progress == list(range(progress[0], progress[0] + len(progress)))
    assert progress[-1] < 100_000, "the task stopped"
    assert done["steps"][0]["state"] == "cancelled"


def test_progress_is_stored_before_the_task_blocks_the_event_loop(
    make_stack_module: Stack,
) -> None:
    s = make_stack_module
    job = submit(s.url, "blocking", {"burst": 20, "block": 1.5})
    r = s.redis()
    record = f"{s.prefix}job:{{{job['id']}}}"
    # The event before the block came after some work, so it (and the burst before it) is
    # stored before progress() returns: while the task blocks, not after.
    # Held back to the task's next await, it would go in ONE append with "after the block" and
    # the record's message would never read "before the block" on its own.
    wait_until(lambda: r.hget(record, "message") == '"before the block"', 20, 0.01, "the event")
    assert r.hget(record, "state") == '"running"'
    wait_until(lambda: r.hget(record, "state") == '"completed"', 20, 0.01, "the job's end")
    progress = [e["message"] for e in stored_events(s, job["id"]) if e["type"] == "progress"]
    burst = [f"burst {i}" for i in range(1, 21)]
    assert progress == [*burst, "before the block", "after the block"]
