"""Every state transition is counted where it is written: each path drives each transition,
and every counter ends equal to the transitions in the jobs' logs."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

from redis.asyncio import Redis

from stepstream.tasks import transitions
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import JobRecord, JobState, utcnow
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore, new_event
from tests.conftest import StackFactory
from tests.support import http
from tests.support.api import get_job, submit, wait_state
from tests.support.processes import Valkey, wait_until
from tests.test_inputs import YES, answer, waiting
from tests.test_metrics import scrape, stats, value

MODULES = "tests.support.tasks,tests.support.ai_tasks,tests.support.ai_recurring"
ENDED = {"completed", "failed", "cancelled"}


def logged_transitions(redis: Any, prefix: str) -> dict[str, Counter[str]]:
    """Counter name → task → transitions, read from every job's log in the stack's Redis."""
    keys = Keys(prefix)
    out: dict[str, Counter[str]] = {name: Counter() for name in transitions.COUNTERS}
    for job_id in redis.zrange(keys.jobs, 0, -1):
        task = json.loads(redis.hget(keys.job(job_id), "task"))
        types = [json.loads(f["e"])["type"] for _, f in redis.xrange(keys.job_events(job_id))]
        assert types[0] == "queued", (job_id, types)
        out["submitted"][task] += 1
        for name, event in transitions.EVENT_TYPES.items():
            if name != "submitted":
                out[name][task] += types.count(event)
    return out


def test_every_transition_on_every_path_is_counted_once(make_stack: StackFactory) -> None:
    s = make_stack(
        webs=1,
        workers=1,
        STEPSTREAM_TASK_MODULES=MODULES,
        STEPSTREAM_MAX_JOBS="4",
        STEPSTREAM_WORKER_HEARTBEAT_SECONDS="0.5",
    )
    url = s.url
    redis = s.redis()

    # API and worker: submitted, started, completed; a retry; a failure.
    ok = submit(url, "counted")
    flaky = submit(url, "counted", {"transient_failures": 1})
    bad = submit(url, "counted", {"permanent_failure": True})
    # API: cancel one that has not started (scheduled for later), and one that runs.
    later = http.post(
        f"{url}/api/jobs", json={"task": "counted", "input": {}, "delay": 600}, timeout=10
    )
    assert later.status_code == 202, later.text
    cancel = http.post(f"{url}/api/jobs/{later.json()['id']}/cancel", timeout=10)
    assert cancel.status_code == 200 and cancel.json()["state"] == "cancelled", cancel.text
    held = submit(url, "counted", {"gate_at": "one"})
    wait_state(url, held["id"], {"running"})
    stop = http.post(f"{url}/api/jobs/{held['id']}/cancel", timeout=10)
    assert stop.status_code == 202, stop.text
    # Human input: waiting, then an answer runs it again to the end.
    asks = submit(url, "asks")
    waiting(url, asks["id"])
    assert answer(url, asks["id"], "decision", YES).status_code == 202

    for job, state in [
        (ok, "completed"),
        (flaky, "completed"),
        (bad, "failed"),
        (held, "cancelled"),
        (asks, "completed"),
    ]:
        assert wait_state(url, job["id"], ENDED, timeout=60)["state"] == state, job

    # Batch: children complete and fail; in a second batch they are cancelled, running and
    # queued (four run at once), by the batch's cancel route. Both parents complete.
    def post_batch(inputs: list[dict[str, Any]]) -> str:
        body = {"task": "ai_echo", "inputs": inputs}
        response = http.post(f"{url}/api/batches", json=body, timeout=10)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def children(parent_id: str) -> list[str]:
        body = http.get(f"{url}/api/batches/{parent_id}", timeout=10).json()
        return [c["state"] for c in body["children"]]

    ran = post_batch([{"value": 0}, {"value": 1, "fail": True}])
    stopped = post_batch([{"value": i, "sleep": 20} for i in range(6)])
    wait_until(
        lambda: Counter(children(stopped)) == {"running": 4, "queued": 2},
        timeout=30,
        what="four children running and two queued",
    )
    cancelled = http.post(f"{url}/api/batches/{stopped}/cancel", timeout=10)
    assert cancelled.status_code == 202, cancelled.text
    for parent_id in (ran, stopped):
        assert wait_state(url, parent_id, ENDED, timeout=60)["state"] == "completed"
    assert children(ran) == ["completed", "failed"]
    assert children(stopped) == ["cancelled"] * 6
    assert get_job(url, stopped)["batch"] == {
        "size": 6,
        "done": 6,
        "completed": 0,
        "failed": 0,
        "cancelled": 6,
    }

    # Recurring: the worker's tick submits `ai_echo` jobs every 2 seconds.
    def ticks() -> list[dict[str, Any]]:
        listed = http.get(f"{url}/api/jobs?task=ai_echo&limit=100", timeout=10).json()["jobs"]
        return [j for j in listed if j["batch_id"] is None]

    wait_until(lambda: len(ticks()) >= 1, timeout=30, what="a recurring tick's job")
    # Nothing moves once the worker (the ticks' source) has stopped.
    s.workers[0].stop()

    logged = logged_transitions(redis, s.prefix)
    m = scrape(url)
    for name in transitions.COUNTERS:
        counted = {
            task: value(m, f"stepstream_jobs_{name}_total", task=task)
            for task in set(logged[name]) | {"counted", "asks", "ai_echo", "batch:ai_echo"}
        }
        assert counted == {task: float(logged[name][task]) for task in counted}, name
    day = stats(url)["tasks"]
    for task in ("counted", "asks", "ai_echo", "batch:ai_echo"):
        for name in ("completed", "failed", "cancelled"):
            assert day[task]["counts"][name] == logged[name][task], (task, name)
        assert day[task]["retried"] == logged["retried"][task], task

    # Each path made its transitions (so the equalities above compared something).
    assert logged["submitted"]["ai_echo"] >= 8 + 1  # the children and a tick
    assert logged["submitted"]["batch:ai_echo"] == logged["started"]["batch:ai_echo"] == 2
    assert logged["completed"]["batch:ai_echo"] == 2
    assert logged["retried"]["counted"] == 1
    assert logged["failed"]["counted"] == 1 and logged["failed"]["ai_echo"] == 1
    assert logged["cancelled"]["counted"] == 2 and logged["cancelled"]["ai_echo"] == 6
    assert logged["waiting"]["asks"] == 1 and logged["started"]["asks"] == 2
    assert logged["completed"]["counted"] == 2 and logged["completed"]["asks"] == 1
    # The duration histogram still follows the worker's ends.
    count = "stepstream_job_duration_seconds_count"
    assert value(m, count, task="counted", outcome="completed") == 2
    assert value(m, count, task="counted", outcome="failed") == 1


async def _resent_appends_count_once(url: str) -> None:
    redis = Redis.from_url(url, decode_responses=True)
    store = JobStore(redis, Settings(redis_url=url, prefix="count-test:"))
    try:
        parent = JobRecord(
            id="p1",
            task="batch:t",
            state=JobState.running,
            input={},
            max_attempts=1,
            created_at=utcnow(),
            batch={"size": 1, "done": 0, "completed": 0, "failed": 0, "cancelled": 0},
        )
        assert (await store.create(parent, new_event("p1", "queued", 0))).ok
        child = JobRecord(
            id="c1",
            task="t",
            state=JobState.queued,
            input={},
            max_attempts=1,
            created_at=utcnow(),
            batch_id="p1",
            batch_index=0,
        )
        # Exactly what redis-py sends again after a reply lost with its connection.
        keys, args = store.lay_out(store.create_call(child, new_event("c1", "queued", 0)))
        await store._append(keys=keys, args=args)
        await store._append(keys=keys, args=args)
        end = new_event("c1", "completed", 1, result={})
        keys, args = store.lay_out(
            store.script_call(
                "c1",
                [end],
                {"state": "completed", "result": {}},
                None,
                "update",
                (),
                [],
                batch="p1",
            )
        )
        await store._append(keys=keys, args=args)
        await store._append(keys=keys, args=args)
        # A refused compare-and-set counts nothing.
        refused = await store.append("c1", end, {"state": "failed"}, expect=(JobState.running,))
        assert refused.refused == '"completed"'

        assert await redis.hgetall(store.keys.transitions("submitted")) == {
            "t": "1",
            "batch:t": "1",
        }
        assert await redis.hgetall(store.keys.transitions("started")) == {"batch:t": "1"}
        assert await redis.hgetall(store.keys.transitions("completed")) == {"t": "1"}
        assert await redis.hgetall(store.keys.transitions("failed")) == {}
        window = store.keys.transitions_window("completed", transitions.window_start(time.time()))
        assert await redis.hgetall(window) == {"t": "1"}
        assert 0 < await redis.ttl(window) <= transitions.WINDOW_TTL
        # The child's end is counted into its batch once, by the append that wrote it.
        counts = await redis.hgetall(store.keys.batch_counts("p1"))
        assert counts == {"c1": "completed", "#done": "1", "#completed": "1"}
        assert await redis.lrange(store.keys.batch_ended("p1"), 0, -1) == ["c1 completed "]
    finally:
        await redis.aclose()


def test_a_resent_append_counts_its_transition_once(valkey: Valkey) -> None:
    asyncio.run(asyncio.wait_for(_resent_appends_count_once(valkey.url), 30))


def test_each_write_names_the_transitions_it_counts() -> None:
    made = transitions.made
    assert made("create", "queued") == made("create", "scheduled") == ("submitted",)
    assert made("create", "completed") == ("submitted", "completed")  # a cached result
    assert made("create", "running") == ("submitted", "started")  # a batch's parent
    assert made("update+cancel", "running") == ("started",)
    assert made("update", "retrying") == ("retried",)
    assert made("update+cancel", "waiting") == ("waiting",)
    assert made("update", "cancelled") == ("cancelled",)
    # Back to queued (a manual retry, an answer) is no submission; no state, no transition.
    assert made("update", "queued") == made("update", None) == ()
    assert set(transitions.BY_STATE) == set(JobState)
    assert set(transitions.EVENT_TYPES) == set(transitions.COUNTERS)
