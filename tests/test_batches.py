"""Batches: a parent job over one child job per input, counting them as they end."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from stepstream.tasks.models import utcnow
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore, new_event
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import get_job, wait_state
from tests.support.processes import Valkey, wait_until
from tests.support.sse import Event, read_stream
from tests.support.tasks import gate_key

AI_TASKS = "tests.support.tasks,tests.support.ai_tasks"


@pytest.fixture(scope="module")
def ai_stack(module_stacks: StackFactory) -> Stack:
    return module_stacks(
        STEPSTREAM_TASK_MODULES=AI_TASKS, STEPSTREAM_MAX_JOBS="4", STEPSTREAM_MAX_BATCH_SIZE="25"
    )


def post_batch(stack: Stack, body: dict[str, object]) -> httpx.Response:
    return http.post(f"{stack.url}/api/batches", json=body, timeout=30)


def test_a_batch_of_20_with_2_failing_items_counts_them_as_they_land(ai_stack: Stack) -> None:
    inputs = [
        {"value": i, "counter": "batch-20", "fail": i in (3, 11), "sleep": 0.05} for i in range(20)
    ]
    response = post_batch(ai_stack, {"task": "ai_echo", "inputs": inputs})
    assert response.status_code == 202, response.text
    parent = response.json()
    assert response.headers["location"] == f"/api/batches/{parent['id']}"
    assert parent["task"] == "batch:ai_echo" and parent["batch"]["size"] == 20
    assert parent["state"] in ("running", "completed")

    # Watch the parent live from the start, as a browser would.
    live: list[Event] = []
    watcher = threading.Thread(
        target=lambda: live.extend(
            read_stream(f"{ai_stack.url}/api/jobs/{parent['id']}/events?after=0")[1]
        )
    )
    watcher.start()
    done = wait_state(ai_stack.url, parent["id"], {"completed", "failed", "cancelled"})
    watcher.join(30)
    assert done["state"] == "completed"
    assert done["batch"] == {"size": 20, "done": 20, "completed": 18, "failed": 2, "cancelled": 0}
    assert done["result"] == {"size": 20, "completed": 18, "failed": 2, "cancelled": 0}
    assert done["message"] == "20 of 20 done (2 failed)"
    assert done["progress"] == 1.0

    progress = [e for e in live if e.type == "progress"]
    assert [e.data["current"] for e in progress] == list(range(1, 21)), "the count rose"
    assert all(e.data["total"] == 20 for e in progress)
    assert live[-1].type == "completed"
    children = {e.data["child"]["index"]: e.data["child"] for e in progress}
    assert {i for i, c in children.items() if c["state"] == "failed"} == {3, 11}
    assert children[3]["error"]["message"] == "item 3 refused"
    assert children[5]["result"]["value"] == 10
    assert "of 20 done" in progress[0].data["message"]

    batch = http.get(f"{ai_stack.url}/api/batches/{parent['id']}", timeout=10).json()
    items = batch["children"]
    assert [c["index"] for c in items] == list(range(20))
    assert [c["state"] for c in items].count("completed") == 18
    assert items[11]["state"] == "failed" and items[11]["error"]["type"] == "PermanentError"
    assert items[7]["result"]["value"] == 14
    child = get_job(ai_stack.url, items[0]["id"])
    assert child["batch_id"] == parent["id"] and child["batch_index"] == 0
    assert ai_stack.redis().get("test:ai:executions:batch-20") == "20"


def test_results_can_be_read_while_the_batch_runs(ai_stack: Stack) -> None:
    inputs = [{"value": i, "counter": "batch-slow", "sleep": 0.4} for i in range(8)]
    parent = post_batch(ai_stack, {"task": "ai_echo", "inputs": inputs}).json()
    deadline = time.monotonic() + 20
    partial = None
    while time.monotonic() < deadline:
        batch = http.get(f"{ai_stack.url}/api/batches/{parent['id']}", timeout=10).json()
        states = [c["state"] for c in batch["children"]]
        if 0 < states.count("completed") < 8:
            partial = batch
            break
        time.sleep(0.05)
    assert partial is not None, "saw a batch part-way through"
    assert partial["state"] == "running"
    assert all(c["result"] for c in partial["children"] if c["state"] == "completed")
    assert wait_state(ai_stack.url, parent["id"], {"completed"})["batch"]["completed"] == 8


def test_cancelling_the_parent_cancels_the_children(ai_stack: Stack) -> None:
    # Four run at once (STEPSTREAM_MAX_JOBS=4): some are running, the rest still queued.
    inputs = [{"value": i, "counter": "batch-cancel", "sleep": 10} for i in range(8)]
    parent = post_batch(ai_stack, {"task": "ai_echo", "inputs": inputs}).json()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch = http.get(f"{ai_stack.url}/api/batches/{parent['id']}", timeout=10).json()
        if [c["state"] for c in batch["children"]].count("running") >= 2:
            break
        time.sleep(0.05)
    cancel = http.post(f"{ai_stack.url}/api/jobs/{parent['id']}/cancel", timeout=10)
    assert cancel.status_code == 202, cancel.text
    done = wait_state(ai_stack.url, parent["id"], {"completed", "failed", "cancelled"}, 15)
    assert done["batch"]["cancelled"] == 8 and done["batch"]["done"] == 8
    batch = http.get(f"{ai_stack.url}/api/batches/{parent['id']}", timeout=10).json()
    assert {c["state"] for c in batch["children"]} == {"cancelled"}
    again = http.post(f"{ai_stack.url}/api/jobs/{parent['id']}/cancel", timeout=10)
    assert again.status_code == 409


def test_a_batch_sent_again_with_its_idempotency_key_is_the_same_batch(ai_stack: Stack) -> None:
    """A client whose answer was lost sends the batch again: one batch, never two."""
    key = {"Idempotency-Key": f"nightly-{time.time_ns()}"}
    body = {"task": "ai_echo", "inputs": [{"value": 1}, {"value": 2}]}
    first = http.post(f"{ai_stack.url}/api/batches", json=body, headers=key, timeout=30)
    assert first.status_code == 202, first.text
    again = http.post(f"{ai_stack.url}/api/batches", json=body, headers=key, timeout=30)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == f"/api/batches/{first.json()['id']}"
    batch = http.get(f"{ai_stack.url}/api/batches/{first.json()['id']}", timeout=10).json()
    assert len(batch["children"]) == 2
    mine = http.get(f"{ai_stack.url}/api/jobs", params={"limit": 200}, timeout=10).json()["jobs"]
    assert sum(1 for j in mine if j.get("batch_id") == first.json()["id"]) == 2, "two batches"
    other = {"task": "ai_echo", "inputs": [{"value": 3}]}
    changed = http.post(f"{ai_stack.url}/api/batches", json=other, headers=key, timeout=30)
    assert changed.status_code == 409
    assert changed.json()["error"]["code"] == "idempotency_conflict"
    as_job = http.post(
        f"{ai_stack.url}/api/jobs", json={"task": "ai_echo", "input": {}}, headers=key, timeout=30
    )
    assert as_job.status_code == 409, "a batch's key answered a single job's submit"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"task": "ai_echo", "inputs": []}, "invalid_body"),
        ({"task": "ai_echo", "inputs": [{}] * 26}, "invalid_body"),
        ({"task": "ai_echo", "inputs": {"value": 1}}, "invalid_body"),
        ({"task": "ai_echo", "inputs": [{}], "extra": 1}, "invalid_body"),
        ({"task": "nope", "inputs": [{}]}, "unknown_task"),
        ({"task": "ai_echo", "inputs": [{}, {"value": "x"}, 3]}, "invalid_input"),
    ],
)
def test_bad_batches_are_refused(ai_stack: Stack, body: dict[str, object], code: str) -> None:
    response = post_batch(ai_stack, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    if code == "invalid_input":
        assert [d["index"] for d in error["details"]] == [1, 2]


def test_a_job_that_is_not_a_batch_is_not_found_as_one(ai_stack: Stack) -> None:
    job = http.post(
        f"{ai_stack.url}/api/jobs", json={"task": "ai_echo", "input": {}}, timeout=10
    ).json()
    response = http.get(f"{ai_stack.url}/api/batches/{job['id']}", timeout=10)
    assert response.status_code == 404


def job_records(stack: Stack) -> list[dict[str, str]]:
    r = stack.redis()
    keys = [k for k in r.scan_iter(f"{stack.prefix}job:{{*}}", count=1_000) if k.endswith("}")]
    return [r.hgetall(k) for k in keys]


@pytest.mark.slow  # kills web processes
def test_a_web_process_killed_while_creating_a_batch_leaves_all_of_it_or_none(
    own_valkey: Valkey, tmp_path: Path
) -> None:
    # No worker: what the web process stored stays as it was stored. A Valkey of its own: the
    # only transaction it sees is the batch's.
    s = Stack(
        own_valkey,
        "kill:",
        tmp_path,
        {
            "STEPSTREAM_TASK_MODULES": AI_TASKS,
            "STEPSTREAM_MAX_UNFINISHED_PER_OWNER": "100000",
            # A thousand children on a loaded machine can outlast the 5 s request deadline.
            "STEPSTREAM_REQUEST_DEADLINE_SECONDS": "30",
        },
    )
    body = {"task": "ai_echo", "inputs": [{"value": str(i)} for i in range(1_000)]}
    watcher = s.redis()
    cut = 0  # kills that landed while the batch's MULTI was open and before its EXEC
    try:
        for _ in range(8):
            web = s.add_web()
            parents_before = len(batch_parents(s))
            sender = threading.Thread(target=_post_ignoring_errors, args=(web.url, body))
            sender.start()
            # Kill the web process the moment Valkey holds the batch's MULTI open. Valkey is
            # frozen first, so the transaction cannot reach its EXEC before the kill lands.
            caught = False
            while sender.is_alive() and not caught:
                if any(int(c.get("multi", -1)) > 0 for c in watcher.client_list()):
                    with own_valkey.paused():
                        web.kill()
                    caught = True
            sender.join(timeout=30)
            assert not sender.is_alive()
            web.kill()
            if caught and len(batch_parents(s)) == parents_before:
                cut += 1
                break
        assert cut, "no kill landed inside the batch's transaction: nothing was tested"
        # And one batch that was let finish, so the checks below see a whole batch too.
        whole = http.post(f"{s.add_web().url}/api/batches", json=body, timeout=30)
        assert whole.status_code == 202, whole.text
        records = job_records(s)
        parents = batch_parents(s)
        children = [r for r in records if r.get("batch_id", "null") != "null"]
        r = s.redis()
        for parent in parents:
            parent_id = parent["id"].strip('"')
            mine = [c for c in children if c["batch_id"] == f'"{parent_id}"']
            assert len(mine) == 1_000, "a parent exists only with every one of its children"
            listed = r.lrange(f"{s.prefix}job:{{{parent_id}}}:children", 0, -1)
            assert sorted(listed) == sorted(c["id"].strip('"') for c in mine)
            assert None not in r.zmscore(f"{s.prefix}queue", listed), "each child is in the queue"
        assert len(children) == 1_000 * len(parents), "no child without its parent"
        assert whole.json()["id"] in [p["id"].strip('"') for p in parents]
    finally:
        s.stop()


def batch_parents(stack: Stack) -> list[dict[str, str]]:
    return [r for r in job_records(stack) if r["task"] == '"batch:ai_echo"']


def _post_ignoring_errors(base: str, body: dict[str, object]) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server was killed under it
        http.post(f"{base}/api/batches", json=body, timeout=20)


def test_a_child_that_ended_without_telling_its_batch_is_counted_when_offered_again(
    make_stack: StackFactory,
) -> None:
    """A worker killed between a child's terminal append and its report to the batch leaves a
    finished child the parent never showed (docs/reliability.md, "A worker dies between a batch
    child's end and its report to the batch"); arq still holds the child's job and offers it
    again. That offer must report the child, once."""
    s = make_stack(workers=0)
    response = post_batch(s, {"task": "counted", "inputs": [{}, {}]})
    assert response.status_code == 202, response.text
    parent_id = response.json()["id"]
    children = http.get(f"{s.url}/api/batches/{parent_id}", timeout=10).json()["children"]
    ended = children[0]["id"]

    async def end_as_a_killed_worker_did() -> None:
        redis = Redis.from_url(s.valkey.url, decode_responses=True)
        store = JobStore(redis, Settings(redis_url=s.valkey.url, prefix=s.prefix))
        try:
            result = {"steps": ["one", "two", "three", "four", "five"]}
            appended = await store.append(
                ended,
                new_event(ended, "completed", 1, result=result),
                {"state": "completed", "result": result, "finished_at": utcnow()},
            )
            assert appended.ok
        finally:
            await redis.aclose()

    asyncio.run(end_as_a_killed_worker_did())
    assert get_job(s.url, parent_id)["batch"]["done"] == 0  # the batch was never told
    s.add_worker()
    done = wait_state(s.url, parent_id, {"completed", "failed", "cancelled"}, timeout=30)
    assert done["state"] == "completed"
    assert done["batch"]["completed"] == 2 and done["batch"]["done"] == 2
    # Counted once: the parent's log reports each child once.
    status, events = read_stream(f"{s.url}/api/jobs/{parent_id}/events?after=0")
    assert status == 200
    reported = [e.data["child"]["id"] for e in events if e.type == "progress"]
    assert sorted(reported) == sorted(child["id"] for child in children)


@pytest.mark.slow  # its own Valkey and processes
def test_a_child_s_end_reaches_its_batch_after_valkey_refused_the_report(
    own_valkey: Valkey, tmp_path: Path
) -> None:
    """Both children of a batch end as Valkey restarts and their reports to the batch fail once:
    unless something reports them again, the parent stays ``running`` (docs/reliability.md, "A
    batch child's report fails"). Here Valkey refuses the report's reads (ACL ``-lrange``: a
    NOPERM that no client retries) as the batch's only child ends."""
    s = Stack(own_valkey, "bshow:", tmp_path)
    r = s.redis()
    try:
        s.add(webs=1, workers=1)
        response = post_batch(s, {"task": "gated", "inputs": [{"events": 1}]})
        assert response.status_code == 202, response.text
        parent_id = response.json()["id"]
        batch = http.get(f"{s.url}/api/batches/{parent_id}", timeout=10).json()
        (child,) = [c["id"] for c in batch["children"]]
        wait_state(s.url, child, {"running"}, timeout=20)
        r.execute_command("ACL", "SETUSER", "default", "-lrange")
        try:
            r.rpush(gate_key(child), 1)
            assert wait_state(s.url, child, {"completed", "failed"}, timeout=20)["state"] == (
                "completed"
            )
            wait_until(
                lambda: "could not show its children yet" in s.workers[0].log(),
                20,
                what="the worker's report to its batch to be refused",
            )
            assert get_job(s.url, parent_id)["state"] == "running"
        finally:
            r.execute_command("ACL", "SETUSER", "default", "+lrange")
        done = wait_state(s.url, parent_id, {"completed", "failed", "cancelled"}, timeout=30)
        assert done["state"] == "completed"
        assert done["batch"]["completed"] == 1 and done["batch"]["done"] == 1
    finally:
        r.execute_command("ACL", "SETUSER", "default", "+@all")
        s.stop()
