"""Cancel, retry by hand and idempotent submission."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from stepstream.server import create_app
from stepstream.tasks.settings import Settings
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import DOC, get_job, submit, wait_state
from tests.support.processes import ROOT, Valkey, wait_until
from tests.support.sse import read_stream
from tests.support.tasks import executions_key, gate_key


def test_cancel_a_queued_job_it_never_starts(make_stack: StackFactory) -> None:
    s = make_stack(webs=1, workers=0)
    job = submit(s.url, "analyze_document", {"text": DOC})
    response = http.post(f"{s.url}/api/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    s.add_worker()
    # A job queued after it runs to its end: the worker had its chance to (wrongly) start it.
    later = submit(s.url, "counted")
    assert wait_state(s.url, later["id"], {"completed", "failed"})["state"] == "completed"
    record = get_job(s.url, job["id"])
    assert record["state"] == "cancelled" and record["attempt"] == 0
    _, log = read_stream(f"{s.url}/api/jobs/{job['id']}/events?after=0")
    assert [e.type for e in log] == ["queued", "cancelled"]


def test_cancel_interrupts_a_running_step(stack: Stack) -> None:
    job = submit(stack.url, "counted", {"gate_at": "two"})
    r = stack.redis()
    wait_until(lambda: r.hget(executions_key(job["id"]), "two") == "1", 20)
    response = http.post(f"{stack.url}/api/jobs/{job['id']}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    # Step two waits 60 s on a gate nobody opens: cancelled at all, it was interrupted
    # mid-step. (docs/http-api.md's "within a second" is a latency; 10 s allows a loaded machine.)
    done = wait_state(stack.url, job["id"], {"cancelled", "completed", "failed"}, timeout=10)
    assert done["state"] == "cancelled"
    _, log = read_stream(f"{stack.url}/api/jobs/{job['id']}/events?after=0")
    assert log[-1].type == "cancelled"
    assert r.hget(executions_key(job["id"]), "three") is None, "work went on after cancel"
    again = http.post(f"{stack.url}/api/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"


def test_retry_by_hand_reuses_checkpoints(stack: Stack) -> None:
    job = submit(stack.url, "counted", {"permanent_failure": True, "fail_at": "four"})
    wait_state(stack.url, job["id"], {"failed"})
    assert http.post(f"{stack.url}/api/jobs/{job['id']}/retry").status_code == 202
    # It fails again at four (the input still says so), but one to three are not re-run.
    done = wait_state(stack.url, job["id"], {"failed"}, timeout=20)
    assert done["attempt"] == 2
    counts = stack.redis().hgetall(executions_key(job["id"]))
    assert counts == {"one": "1", "two": "1", "three": "1", "four": "2"}
    completed = http.post(f"{stack.url}/api/jobs/{submit(stack.url, 'counted')['id']}/retry")
    assert completed.status_code == 409


# What arq does as a run of the job's own queue entry ends: the run that failed the job, still
# ending when the retry came (its record says `failed` before arq has recorded the end).
END_OF_THE_FAILED_RUN = """
import asyncio, sys
from arq.connections import create_pool
from stepstream.tasks.worker import worker as make_worker

async def main() -> None:
    worker = make_worker()
    worker._pool = await create_pool(worker.redis_settings)
    await worker.finish_job(sys.argv[1], True, None, None, False, None, None)
    await worker._pool.aclose()

asyncio.run(main())
"""


def test_a_retry_while_the_failed_run_is_still_ending_runs(make_stack: StackFactory) -> None:
    """A retry by hand can come between the failing run's `failed` and arq's end of that run,
    which deletes its id's queue entry. The retry's entry used to be that entry: the job stayed
    `queued` for good (seen in a flake-rate run). Here the end comes after the retry, every
    time."""
    s = make_stack(webs=1, workers=1)
    job = submit(s.url, "counted", {"permanent_failure": True, "fail_at": "two"})
    wait_state(s.url, job["id"], {"failed"})
    s.workers[0].stop()
    assert http.post(f"{s.url}/api/jobs/{job['id']}/retry").status_code == 202
    ended = subprocess.run(
        [sys.executable, "-c", END_OF_THE_FAILED_RUN, job["id"]],
        cwd=ROOT,
        env=s.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ended.returncode == 0, ended.stderr
    s.add_worker()
    done = wait_state(s.url, job["id"], {"failed"}, timeout=30)
    assert done["attempt"] == 2  # it ran again (and failed at two again, as its input says)


def test_retry_a_cancelled_job_runs_it_to_completion(stack: Stack) -> None:
    job = submit(stack.url, "counted", {"gate_at": "one"})
    r = stack.redis()
    wait_until(lambda: r.hget(executions_key(job["id"]), "one") == "1", 20)
    http.post(f"{stack.url}/api/jobs/{job['id']}/cancel")
    wait_state(stack.url, job["id"], {"cancelled"})
    r.rpush(gate_key(job["id"]), "go")
    assert http.post(f"{stack.url}/api/jobs/{job['id']}/retry").status_code == 202
    done = wait_state(stack.url, job["id"], {"completed", "failed"}, timeout=20)
    assert done["state"] == "completed" and done["attempt"] == 2


def test_an_idempotency_key_returns_the_same_job(stack: Stack) -> None:
    body = {"task": "analyze_document", "input": {"text": DOC}}
    headers = {"Idempotency-Key": f"order-{time.time_ns()}"}
    first = http.post(f"{stack.url}/api/jobs", json=body, headers=headers)
    second = http.post(f"{stack.url}/api/jobs", json=body, headers=headers)
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    other = http.post(
        f"{stack.url}/api/jobs",
        json={"task": "analyze_document", "input": {"text": "Something else."}},
        headers=headers,
    )
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
    bad = http.post(f"{stack.url}/api/jobs", json=body, headers={"Idempotency-Key": "a b"})
    assert bad.status_code == 400


def test_concurrent_identical_requests_create_one_job(make_stack: StackFactory) -> None:
    s = make_stack(webs=2, workers=1)
    body = {"task": "analyze_document", "input": {"text": DOC}}
    headers = {"Idempotency-Key": "same-click-twice"}

    def post(i: int) -> httpx.Response:
        return http.post(f"{s.webs[i % 2].url}/api/jobs", json=body, headers=headers)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, range(16)))
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert sorted(r.status_code for r in responses) == [200] * 15 + [202]
    listed = http.get(f"{s.url}/api/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == list(ids)


async def _cut_off_after_the_create_was_sent(url: str) -> tuple[set[str], httpx.Response]:
    """A keyed submit cut off (as the response deadline cuts one off) right after its create
    script went to Valkey, then the client's retry with the same key."""
    settings = Settings(redis_url=url, prefix="cutoff:", mode="development")
    app = create_app(settings)
    original = AbstractConnection.send_packed_command
    cut = asyncio.Event()

    async def send_then_cut(self: AbstractConnection, command: Any, *a: Any, **kw: Any) -> None:
        await original(self, command, *a, **kw)
        packed = b"".join(command) if isinstance(command, list) else bytes(command)
        if b"EVALSHA" in packed and b"cutoff:idem:" in packed and not cut.is_set():
            cut.set()
            # The create is on its way; the request is cut off awaiting its answer, and redis-py
            # drops a connection whose reply it never read.
            await self.disconnect()
            raise asyncio.CancelledError

    body = {"task": "analyze_document", "input": {"text": DOC}}
    headers = {"Idempotency-Key": f"cut-{time.time_ns()}"}
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            warm = await client.post("/api/jobs", json=body)  # the store's script is loaded
            assert warm.status_code == 202, warm.text
            AbstractConnection.send_packed_command = send_then_cut  # type: ignore[method-assign]
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await client.post("/api/jobs", json=body, headers=headers)
            finally:
                AbstractConnection.send_packed_command = original  # type: ignore[method-assign]
            assert cut.is_set(), "no create was cut off: the test tested nothing"
            retry = await client.post("/api/jobs", json=body, headers=headers)
    redis = Redis.from_url(url, decode_responses=True)
    try:
        jobs = set(await redis.zrange("cutoff:jobs", 0, -1))
    finally:
        await redis.aclose()
    return jobs, retry


def test_a_submit_cut_off_after_its_create_was_sent_is_not_made_twice(valkey: Valkey) -> None:
    jobs, retry = asyncio.run(asyncio.wait_for(_cut_off_after_the_create_was_sent(valkey.url), 60))
    assert len(jobs) == 2, f"the retry made a second job: {jobs}"  # the warm-up's and the cut one
    assert retry.status_code == 200 and retry.json()["id"] in jobs, retry.text
