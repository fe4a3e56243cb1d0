"""An owner's unfinished-jobs limit holds under concurrent submits and batches, and a job
scheduled past the retention outlives it until it has run.

The limit is checked and taken in the create itself, so requests racing for the last places
get exactly those places; what a refused request would have stored never appears. An id whose
record has gone (expired) holds no place, so a lost record never locks its owner out.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

import httpx

from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import get_job, submit, wait_state
from tests.support.processes import wait_until
from tests.support.sse import read_stream
from tests.test_jobs import store_snapshot

# The per-second submission limit is not under test here.
FAST = {"STEPSTREAM_SUBMISSIONS_PER_SECOND": "100000"}
SETTING = "STEPSTREAM_MAX_UNFINISHED_PER_OWNER"


def records(stack: Stack) -> int:
    """Job records stored (``job:{id}`` hashes; ``job:{id}:events`` and the like excluded)."""
    return sum(1 for _ in stack.redis().scan_iter(f"{stack.prefix}job:{{*}}", count=1_000))


def unfinished(stack: Stack) -> int:
    """The development owner's unfinished jobs, as the limit counts them."""
    return int(stack.redis().zcard(f"{stack.prefix}unfinished:-"))


def queue_entries(stack: Stack) -> int:
    return int(stack.redis().zcard(f"{stack.prefix}queue"))


def fire_at_once(calls: list[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
    """POST every (base url, path, body) from its own thread, released together."""
    barrier = threading.Barrier(len(calls))
    responses: list[httpx.Response | None] = [None] * len(calls)
    clients = [httpx.Client(base_url=base, timeout=60, verify=http.TLS) for base, _, _ in calls]

    def send(i: int) -> None:
        _, path, body = calls[i]
        clients[i].get("/healthz")  # connected before the start, so the posts really race
        barrier.wait(timeout=30)
        responses[i] = clients[i].post(path, json=body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(calls))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
    finally:
        for client in clients:
            client.close()
    assert all(r is not None for r in responses), "a request did not finish within 90 s"
    return [r for r in responses if r is not None]


def assert_too_many_unfinished(response: httpx.Response, limit: int, requested: int) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert error["code"] == "too_many_unfinished_jobs"
    assert error["details"]["limit"] == limit and error["details"]["setting"] == SETTING
    assert error["details"]["requested"] == requested
    assert error["details"]["unfinished"] + requested > limit
    assert SETTING in error["message"]


def test_concurrent_batches_are_admitted_only_while_they_fit(make_stack: StackFactory) -> None:
    stack = make_stack(webs=2, workers=0, **{SETTING: "1000"}, **FAST)
    body = {"task": "counted", "inputs": [{} for _ in range(400)]}
    responses = fire_at_once([(stack.webs[i % 2].url, "/api/batches", body) for i in range(4)])

    # A batch takes a place per input (its parent is never queued): two fit in 1,000.
    accepted = [r for r in responses if r.status_code == 202]
    assert len(accepted) == 2, [r.status_code for r in responses]
    for refused in (r for r in responses if r.status_code != 202):
        assert_too_many_unfinished(refused, limit=1000, requested=400)
    assert unfinished(stack) == 800
    # The refused batches stored nothing: no parent, no child, no queue entry, no child list.
    assert records(stack) == 802
    assert queue_entries(stack) == 800
    listed = stack.redis().keys(f"{stack.prefix}job:{{*}}:children")
    assert sorted(listed) == sorted(
        f"{stack.prefix}job:{{{r.json()['id']}}}:children" for r in accepted
    )


def test_concurrent_submits_at_the_limit_take_exactly_the_places_left(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(webs=2, workers=0, **{SETTING: "20"}, **FAST)
    for _ in range(15):
        submit(stack.url, "counted")
    job = {"task": "counted", "input": {}}
    responses = fire_at_once([(stack.webs[i % 2].url, "/api/jobs", job) for i in range(40)])

    assert [r.status_code for r in responses].count(202) == 5
    for refused in (r for r in responses if r.status_code != 202):
        assert_too_many_unfinished(refused, limit=20, requested=1)
    assert (unfinished(stack), records(stack), queue_entries(stack)) == (20, 20, 20)


def test_a_refused_batch_or_submit_stores_nothing_and_ended_jobs_free_their_places(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=0, **{SETTING: "10"}, **FAST)
    batches = f"{stack.url}/api/batches"
    before = store_snapshot(stack)
    too_big = http.post(batches, json={"task": "counted", "inputs": [{}] * 11}, timeout=30)
    assert_too_many_unfinished(too_big, limit=10, requested=11)
    assert store_snapshot(stack) == before

    fits = http.post(batches, json={"task": "counted", "inputs": [{}] * 10}, timeout=30)
    assert fits.status_code == 202, fits.text  # exactly the ten places
    assert unfinished(stack) == 10
    before = store_snapshot(stack)
    one_more = http.post(f"{stack.url}/api/jobs", json={"task": "counted", "input": {}})
    assert_too_many_unfinished(one_more, limit=10, requested=1)
    assert store_snapshot(stack) == before

    # Cancelling the batch ends its children, then its parent: every place is free again.
    cancel = http.post(f"{batches}/{fits.json()['id']}/cancel", timeout=30)
    assert cancel.status_code == 202, cancel.text
    wait_state(stack.url, fits.json()["id"], {"completed"})
    assert unfinished(stack) == 0
    assert http.post(batches, json={"task": "counted", "inputs": [{}] * 10}).status_code == 202


def test_a_manual_retry_needs_a_free_place(make_stack: StackFactory) -> None:
    stack = make_stack(workers=0, **{SETTING: "1"}, **FAST)
    first = submit(stack.url, "counted")
    cancelled = http.post(f"{stack.url}/api/jobs/{first['id']}/cancel", timeout=10)
    assert cancelled.json()["state"] == "cancelled"
    submit(stack.url, "counted")  # takes the one place
    retry = http.post(f"{stack.url}/api/jobs/{first['id']}/retry", timeout=10)
    assert_too_many_unfinished(retry, limit=1, requested=1)
    assert get_job(stack.url, first["id"])["state"] == "cancelled"
    assert unfinished(stack) == 1


def test_a_job_scheduled_past_the_retention_still_runs_and_is_kept(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=1, STEPSTREAM_RETENTION_SECONDS="3", **FAST)
    created = time.time()
    job = http.post(
        f"{stack.url}/api/jobs", json={"task": "counted", "input": {}, "delay": 7}, timeout=10
    ).json()
    assert job["state"] == "scheduled"
    # Past the retention after its creation: still there, still listed (the index was trimmed
    # meanwhile by a later submit), still counted.
    time.sleep(max(0.0, created + 4 - time.time()))
    submit(stack.url, "counted")
    state = get_job(stack.url, job["id"])["state"]
    listed = http.get(f"{stack.url}/api/jobs?status=scheduled", timeout=10).json()["jobs"]
    due = datetime.fromisoformat(job["run_at"]).timestamp()
    assert time.time() < due, "looked after the job was due: tested nothing"
    assert state == "scheduled"
    assert [j["id"] for j in listed] == [job["id"]]

    done = wait_state(stack.url, job["id"], {"completed", "failed", "cancelled"}, timeout=20)
    assert done["state"] == "completed"
    status, log = read_stream(f"{stack.url}/api/jobs/{job['id']}/events?after=0")
    assert status == 200
    assert [e.type for e in log][:2] == ["queued", "started"] and log[-1].type == "completed"
    held = stack.redis().zscore(f"{stack.prefix}unfinished:-", job["id"])
    assert held is None, "it ended: it holds no place"


def test_a_retry_asked_for_past_the_retention_still_runs(make_stack: StackFactory) -> None:
    stack = make_stack(workers=1, STEPSTREAM_RETENTION_SECONDS="2", **FAST)
    # Due 10 s on: still ahead after the 3 s below, however late a loaded machine sees `retrying`.
    job = submit(stack.url, "retry_later", {"seconds": 10})
    waiting = wait_state(stack.url, job["id"], {"retrying"})
    assert waiting["error"]["type"] == "RetryAfter"
    time.sleep(3)  # past the retention after the `retrying` event
    assert get_job(stack.url, job["id"])["state"] == "retrying"
    done = wait_state(stack.url, job["id"], {"completed", "failed"}, timeout=20)
    assert (done["state"], done["attempt"]) == ("completed", 2)


def test_an_owner_whose_unfinished_jobs_expired_can_submit_again(
    make_stack: StackFactory,
) -> None:
    # No worker: the jobs stay queued until their records expire, as a lost record would.
    # Records kept 3 s: the third submit must come while both are unfinished, on a loaded
    # machine too (at 1 s they had expired once before it came).
    stack = make_stack(workers=0, STEPSTREAM_RETENTION_SECONDS="3", **{SETTING: "2"}, **FAST)
    jobs = [submit(stack.url, "counted") for _ in range(2)]
    full = http.post(f"{stack.url}/api/jobs", json={"task": "counted", "input": {}})
    assert full.status_code == 429 and full.json()["error"]["code"] == "too_many_unfinished_jobs"

    def gone() -> bool:
        return all(
            http.get(f"{stack.url}/api/jobs/{j['id']}", timeout=10).status_code == 404 for j in jobs
        )

    wait_until(gone, timeout=20, what="the records to expire")
    assert unfinished(stack) == 2, "precondition: the expired ids are still in the set"
    again = http.post(f"{stack.url}/api/jobs", json={"task": "counted", "input": {}})
    assert again.status_code == 202, again.text
    assert unfinished(stack) == 1, "the ids of the expired records were dropped"
