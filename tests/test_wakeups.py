"""An idle worker waits for a wake-up instead of polling the queue every few milliseconds, and
still starts a queued job at once: when it is submitted, when a job slot comes free, and after
Valkey restarts.

The wake-up tests set the timed poll to ten minutes, so a job that starts within seconds was
started by a wake-up: without one it would wait out the test's timeout.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from stepstream.tasks.keyspace import Keys
from tests.conftest import Stack, StackFactory
from tests.support.api import submit, wait_state
from tests.support.processes import Valkey, wait_until
from tests.support.tasks import gate_key

# Slow: each test runs worker processes.
pytestmark = pytest.mark.slow

NO_TIMED_POLL = {"STEPSTREAM_POLL_DELAY_SECONDS": "600"}


def listening(r: redis.Redis, stack: Stack) -> bool:
    channel = Keys(stack.prefix).queue_wakeups
    ((_, subscribers),) = r.pubsub_numsub(channel)
    return bool(subscribers == len(stack.workers))


def test_a_job_starts_when_submitted_and_when_a_slot_comes_free(make_stack: StackFactory) -> None:
    stack = make_stack(STEPSTREAM_MAX_JOBS="1", **NO_TIMED_POLL)
    r = stack.redis()
    wait_until(lambda: listening(r, stack), timeout=20, what="the worker to listen for wake-ups")

    holder = submit(stack.url, "gated", {"events": 1})
    wait_state(stack.url, holder["id"], {"running"}, timeout=10)
    # The worker's only slot is taken: the next job waits in the queue.
    waiting = submit(stack.url, "counted", {})
    assert wait_state(stack.url, waiting["id"], {"queued"}, timeout=5)["state"] == "queued"

    r.rpush(gate_key(holder["id"]), 1)
    assert wait_state(stack.url, holder["id"], {"completed"}, timeout=10)["state"] == "completed"
    # The slot that came free wakes the worker for the job left in the queue.
    done = wait_state(stack.url, waiting["id"], {"completed", "failed"}, timeout=10)
    assert done["state"] == "completed"


def test_wakeups_come_back_after_valkey_restarts(own_valkey: Valkey, tmp_path: Path) -> None:
    stack = Stack(own_valkey, "wake:", tmp_path, dict(NO_TIMED_POLL))
    try:
        stack.add(webs=1, workers=1)
        r = stack.redis()
        wait_until(lambda: listening(r, stack), timeout=20, what="the worker to listen")
        own_valkey.restart(down_for=0.5)
        r = stack.redis()

        def listening_again() -> bool:
            try:
                return listening(r, stack)
            except redis.ConnectionError:
                return False

        wait_until(listening_again, timeout=30, what="the worker to listen again after a restart")
        # The worker polls once it is back: a job running shows that poll is behind it, and
        # keeps its slot taken, so no slot coming free wakes the worker for the next job.
        holder = submit(stack.url, "gated", {"events": 1})
        wait_state(stack.url, holder["id"], {"running"}, timeout=15)
        job = submit(stack.url, "counted", {})
        done = wait_state(stack.url, job["id"], {"completed", "failed"}, timeout=15)
        assert done["state"] == "completed"
        r.rpush(gate_key(holder["id"]), 1)
        ended = wait_state(stack.url, holder["id"], {"completed"}, timeout=10)
        assert ended["state"] == "completed"
    finally:
        stack.stop()


def test_an_idle_worker_polls_the_queue_a_few_times_a_second(
    own_valkey: Valkey, tmp_path: Path
) -> None:
    """With the default poll delay (0.5 s). Polling every 10 ms, as before wake-ups, an idle
    worker sent Valkey a hundred queue reads a second."""
    stack = Stack(own_valkey, "idle:", tmp_path)
    try:
        stack.add(webs=0, workers=1)
        r = stack.redis()
        wait_until(lambda: listening(r, stack), timeout=20, what="the worker to listen")
        r.config_resetstat()
        started = time.monotonic()
        time.sleep(3)
        reads = r.info("commandstats").get("cmdstat_zrangebyscore", {}).get("calls", 0)
        seconds = time.monotonic() - started
        assert 1 <= reads <= 4 * seconds, f"{reads} queue reads in {seconds:.1f} s"
    finally:
        stack.stop()
