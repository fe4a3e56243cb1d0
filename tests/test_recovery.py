"""Real faults: a worker killed mid-step, a worker stopped for a deploy, Valkey restarting."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from arq.constants import in_progress_key_prefix

from stepstream.tasks.keyspace import Keys
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import DOC, get_job, submit, wait_state
from tests.support.processes import Valkey, wait_until
from tests.support.sse import Event, read_stream
from tests.support.tasks import executions_key, gate_key

# Slow: kills workers, restarts and freezes Valkey, waits out leases.
pytestmark = pytest.mark.slow


def full_log(base: str, job_id: str) -> list[Event]:
    status, events = read_stream(f"{base}/api/jobs/{job_id}/events?after=0")
    assert status == 200
    return events


def assert_coherent(log: list[Event]) -> None:
    """Steps complete in order within each attempt; no step is completed for real twice."""
    real = [
        e.data["step"]["name"]
        for e in log
        if e.type == "step_completed" and not e.data.get("restored")
    ]
    assert len(real) == len(set(real)), f"a step completed twice: {real}"
    ids = [e.id for e in log]
    assert len(ids) == len(set(ids))
    assert [e.type for e in log].count("completed") == 1 and log[-1].type == "completed"


def test_a_killed_worker_s_job_is_taken_over_and_resumes_from_checkpoints(
    make_stack: StackFactory,
) -> None:
    s = make_stack(webs=1, workers=1)
    job = submit(s.url, "counted", {"gate_at": "four"})
    r = s.redis()
    wait_until(lambda: r.hget(executions_key(job["id"]), "four") == "1", 20, what="step four")
    s.workers[0].kill()  # SIGKILL mid-step: no cleanup, no hand-back
    killed_at = time.monotonic()
    s.add_worker()
    r.rpush(gate_key(job["id"]), "go")  # lets the new attempt through step four
    done = wait_state(s.url, job["id"], {"completed", "failed"}, timeout=30)
    took = time.monotonic() - killed_at
    assert done["state"] == "completed"
    # Time is the feature: the 8 s lease, against arq's "job timeout + 10 s" (minutes).
    assert took < 25, f"takeover took {took:.1f}s"
    assert r.hgetall(executions_key(job["id"])) == {
        "one": "1",
        "two": "1",
        "three": "1",
        "four": "2",
        "five": "1",
    }
    log = full_log(s.url, job["id"])
    starts = [e.data["attempt"] for e in log if e.type == "started"]
    assert starts == [1, 2]
    assert_coherent(log)
    restored = [e.data["step"]["name"] for e in log if e.data.get("restored")]
    assert restored == ["one", "two", "three"]


def test_a_killed_worker_s_demo_job_does_not_run_its_finished_steps_again(
    make_stack: StackFactory,
) -> None:
    """The flagship demo keeps the flagship promise: steps finished before a SIGKILL are
    restored from their checkpoints by the worker that takes over, not run again."""
    s = make_stack(webs=1, workers=1)
    job = submit(s.url, "analyze_document", {"text": DOC, "pace": 0.4})

    def finished() -> list[str]:
        steps = get_job(s.url, job["id"])["steps"]
        return [step["name"] for step in steps if step["state"] == "completed"]

    wait_until(lambda: len(finished()) >= 2, 20, what="steps 1 and 2 to complete")
    s.workers[0].kill()  # SIGKILL: no cleanup, no hand-back
    # The record as the dead worker left it: the kill landed after step 2, before step 3.
    left = get_job(s.url, job["id"])
    assert left["state"] == "running"
    states = [step["state"] for step in left["steps"]]
    assert states[:2] == ["completed", "completed"] and states[2] in ("pending", "running"), states
    s.add_worker()
    done = wait_state(s.url, job["id"], {"completed", "failed"}, timeout=40)
    assert done["state"] == "completed", done["error"]

    log = full_log(s.url, job["id"])
    assert [e.data["attempt"] for e in log if e.type == "started"] == [1, 2]
    second = [e for e in log if e.data.get("attempt") == 2]
    begun = [e.data["step"]["name"] for e in second if e.type == "step"]
    assert "Parsing document" not in begun and "Chunking document" not in begun, begun
    restored = [e.data for e in second if e.type == "step_completed" and e.data.get("restored")]
    assert [d["step"]["name"] for d in restored] == ["Parsing document", "Chunking document"]
    assert restored[0]["output"] == {"sentences": 5, "words": len(DOC.split())}
    # The body of step 1 logs once each time it runs: it ran once in the whole job.
    parsed = [e for e in log if e.type == "log" and e.data["message"].startswith("Parsed ")]
    assert [e.data["attempt"] for e in parsed] == [1]
    assert_coherent(log)
    stats = {"characters": len(DOC), "words": len(DOC.split()), "sentences": 5, "chunks": 1}
    assert done["result"]["stats"] == stats, "the restored steps' values fed the later ones"


# A worker that takes the job from the queue as arq does (the in-progress key set), then dies by
# SIGKILL before its run_job task has run a line: the instant bench.chaos found.
TAKE_AND_DIE = """
import asyncio, os, signal, sys
from arq.connections import create_pool
from stepstream.tasks.worker import worker as make_worker

async def main() -> None:
    worker = make_worker()
    worker._pool = await create_pool(worker.redis_settings)  # as Worker.main does first
    await worker.start_jobs([sys.argv[1].encode()])
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_a_worker_killed_as_it_takes_a_job_holds_it_no_longer_than_the_lease(
    make_stack: StackFactory,
) -> None:
    s = make_stack(webs=1, workers=0)
    job = submit(s.url, "counted", {})
    died = subprocess.run(
        [sys.executable, "-c", TAKE_AND_DIE, job["id"]], env=s.env, timeout=30, check=False
    )
    assert died.returncode == -signal.SIGKILL
    r = s.redis()
    assert r.exists(in_progress_key_prefix + job["id"]), "the dead worker never took the job"
    assert get_job(s.url, job["id"])["state"] == "queued"
    s.add_worker()
    # Taken over once the 8 s lease lapses, not after arq's hour.
    done = wait_state(s.url, job["id"], {"completed", "failed"}, timeout=30)
    assert done["state"] == "completed"
    assert done["attempt"] == 1


def test_sigterm_hands_running_jobs_back_and_loses_none(make_stack: StackFactory) -> None:
    # A grace a loaded machine's quick job fits in (it needs well under a second alone): the
    # held job waits out all of it before it is handed back.
    s = make_stack(webs=1, workers=1, STEPSTREAM_SHUTDOWN_GRACE_SECONDS="5")
    quick = submit(s.url, "analyze_document", {"text": DOC, "pace": 0.05})
    held = submit(s.url, "counted", {"gate_at": "two"})
    r = s.redis()
    wait_until(lambda: r.hget(executions_key(held["id"]), "two") == "1", 20, what="step two")
    s.workers[0].signal(signal.SIGTERM)
    # The quick job finishes inside the grace period; the held one is handed back.
    assert wait_state(s.url, quick["id"], {"completed"}, timeout=20)["attempt"] == 1
    handed = wait_state(s.url, held["id"], {"retrying"}, timeout=20)
    assert handed["error"]["type"] == "WorkerShutdown"
    wait_until(lambda: not s.workers[0].alive, 20, what="the worker to exit")
    s.add_worker()
    r.rpush(gate_key(held["id"]), "go")
    done = wait_state(s.url, held["id"], {"completed", "failed"}, timeout=30)
    assert done["state"] == "completed"
    assert done["attempt"] == 2
    assert done["max_attempts"] == 4, "a deploy costs no attempt"
    log = full_log(s.url, held["id"])
    assert_coherent(log)
    assert r.hget(executions_key(held["id"]), "one") == "1"


def test_a_valkey_restart_during_a_job_loses_nothing(own_valkey: Valkey, tmp_path: Path) -> None:
    s = Stack(own_valkey, "vk:", tmp_path)
    try:
        s.add_web()
        s.add_worker()
        job = submit(s.url, "analyze_document", {"text": DOC, "pace": 0.15})
        wait_until(lambda: (get_job(s.url, job["id"])["step"] or {}).get("index", 0) >= 2, 20)
        own_valkey.restart(down_for=0.5)
        done = wait_state(s.url, job["id"], {"completed", "failed"}, timeout=60)
        assert done["state"] == "completed", done["error"]
        log = full_log(s.url, job["id"])
        assert_coherent(log)
        steps = [e.data["step"]["index"] for e in log if e.type == "step"]
        assert steps == list(range(1, 8)), "every step once, in order: no gap in the log"
        # The finished result survives another restart (append-only file on).
        own_valkey.restart()
        wait_until(lambda: get_job(s.url, job["id"])["state"] == "completed", 20)
        assert get_job(s.url, job["id"])["result"] == done["result"]
    finally:
        s.stop()


def test_a_job_whose_end_the_worker_could_not_write_is_not_dropped(
    own_valkey: Valkey, tmp_path: Path
) -> None:
    """arq drops an entry whose function raised. When the worker cannot write a job's end (here
    Valkey refuses its scripts for a moment: NOPERM, an error no client retries), the job must
    not be left ``running`` for ever with nothing to run it: it is offered again, and its end
    is written once Valkey takes writes again."""
    s = Stack(own_valkey, "nr:", tmp_path)
    r = s.redis()
    try:
        s.add_web()
        s.add_worker()
        job = submit(s.url, "counted", {"gate_at": "three"})
        wait_until(lambda: r.hget(executions_key(job["id"]), "three") == "1", 20, what="step 3")
        r.execute_command("ACL", "SETUSER", "default", "-evalsha")
        try:
            # What the web writes to cancel a running job (its own write is a script too).
            r.set(Keys("nr:").job_cancel(job["id"]), "1")
            wait_until(
                lambda: "NoPermissionError" in s.workers[0].log(),
                20,
                what="the worker's cancel to be refused by Valkey",
            )
        finally:
            r.execute_command("ACL", "SETUSER", "default", "+evalsha")
        done = wait_state(s.url, job["id"], {"cancelled", "completed", "failed"}, timeout=40)
        assert done["state"] == "cancelled"
        types = [e.type for e in full_log(s.url, job["id"])]
        assert types.count("cancelled") == 1 and types[-1] == "cancelled"
        assert r.hget(executions_key(job["id"]), "three") == "1"
    finally:
        r.execute_command("ACL", "SETUSER", "default", "+evalsha")
        s.stop()


def test_a_submit_while_valkey_is_frozen_answers_503_in_seconds_and_loses_nothing(
    own_valkey: Valkey, tmp_path: Path
) -> None:
    """A frozen Valkey (SIGSTOP: a stalled host or a partition) accepts connections and never
    answers; a submit must still answer, in seconds, with 503 and Retry-After."""
    stack = Stack(own_valkey, "frozen:", tmp_path, {"STEPSTREAM_REQUEST_DEADLINE_SECONDS": "3"})
    try:
        stack.add_web()
        stack.add_worker()
        body = {"task": "counted", "input": {}}
        with own_valkey.paused():
            began = time.monotonic()
            frozen = http.post(f"{stack.url}/api/jobs", json=body, timeout=15)
            took = time.monotonic() - began
            listing = http.get(f"{stack.url}/api/jobs", timeout=15)
        assert frozen.status_code == 503, frozen.text
        assert frozen.headers["retry-after"] == "2"
        assert frozen.json()["error"]["code"] == "unavailable"
        assert took < 8, f"the submit took {took:.1f}s to answer"  # 3 s deadline, generously
        assert listing.status_code == 503
        # Thawed, the same web process serves again at once.
        job = submit(stack.url, "counted")
        assert wait_state(stack.url, job["id"], {"completed"})["state"] == "completed"
    finally:
        stack.stop()


def test_a_keyed_submit_cut_off_by_a_frozen_valkey_ends_in_exactly_one_job(
    own_valkey: Valkey, tmp_path: Path
) -> None:
    """The claim of an Idempotency-Key is written, then no job: here because Valkey froze
    and the request was answered 503 before the claim's reply came (a web process killed
    between the claim and the create leaves the same). The claim used to block the key for a
    day (409 "still in flight" on every retry); the client's retries must end in one job."""
    stack = Stack(own_valkey, "keyed:", tmp_path, {"STEPSTREAM_REQUEST_DEADLINE_SECONDS": "2"})
    redis = stack.redis()
    try:
        stack.add_web()
        stack.add_worker()
        keyed = {"Idempotency-Key": "order-42"}
        body = {"task": "counted", "input": {}}
        # Connections in the web process's pool first: a new one's handshake would wait on the
        # frozen Valkey, and the claim would never be sent (seen on a loaded machine).
        with ThreadPoolExecutor(8) as pool:
            listed = list(pool.map(lambda _: http.get(f"{stack.url}/api/jobs"), range(8)))
        assert all(answer.status_code == 200 for answer in listed)
        with own_valkey.paused():
            cut_off = http.post(f"{stack.url}/api/jobs", json=body, headers=keyed, timeout=15)
        assert cut_off.status_code == 503, cut_off.text
        # Thawed, Valkey runs the claim that request had sent: a claim without a job.
        wait_until(
            lambda: bool(redis.keys("keyed:idem:*")),
            timeout=5,
            what="the orphaned claim (without it this test proves nothing)",
        )
        assert not redis.keys("keyed:job:*")

        answers = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # as a client retrying with the same key would
            answer = http.post(f"{stack.url}/api/jobs", json=body, headers=keyed, timeout=15)
            answers.append(answer.status_code)
            if answer.status_code in (200, 202):
                break
            assert answer.status_code in (409, 503), answer.text
            time.sleep(float(answer.headers.get("retry-after", "1")))
        assert answers[-1] == 202, answers
        job_id = answer.json()["id"]
        again = http.post(f"{stack.url}/api/jobs", json=body, headers=keyed, timeout=15)
        assert again.status_code == 200 and again.json()["id"] == job_id
        listed = http.get(f"{stack.url}/api/jobs?task=counted", timeout=10).json()["jobs"]
        assert [job["id"] for job in listed] == [job_id]
        # The claim now lives as long as the job's key should: the full TTL, set with the job.
        (claim,) = redis.keys("keyed:idem:*")
        assert redis.ttl(claim) > 3600
    finally:
        stack.stop()
        redis.close()
