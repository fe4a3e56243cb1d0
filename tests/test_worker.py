"""The worker process itself: what ends it and what must not."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stepstream.tasks.worker import BOOKKEEPING_ERROR
from tests.conftest import Stack, StackFactory
from tests.support.api import submit, wait_state
from tests.support.processes import Valkey, wait_until
from tests.support.sse import read_stream
from tests.support.tasks import COUNTED_STEPS, executions_key

WARNING = "Redis error while starting a job"
POLL_WARNING = "Redis error while polling the queue"


@pytest.mark.slow  # a web process and a worker of its own
def test_a_redis_error_inside_arqs_watch_does_not_end_the_worker(
    own_valkey: Valkey, tmp_path: Path
) -> None:
    """arq WATCHes a job's in-progress key before taking it; an error there (in production, a
    connection lost while watching: python-arq/arq#498) used to escape and end the worker.
    Denying ZSCORE, which arq sends inside that WATCH, makes the error happen on every poll."""
    stack = Stack(own_valkey, "watch:", tmp_path)
    redis = stack.redis()
    try:
        stack.add_web()
        worker = stack.add_worker()
        redis.execute_command("ACL", "SETUSER", "default", "-zscore")
        job = submit(stack.url, "counted", {})
        wait_until(
            lambda: WARNING in worker.log() or not worker.alive,
            timeout=20,
            what="the worker to hit the error inside WATCH",
        )
        assert worker.alive, worker.log()
        assert redis.hget(f"watch:job:{{{job['id']}}}", "state") == '"queued"'  # stored as JSON
        redis.execute_command("ACL", "SETUSER", "default", "+zscore")
        # The slot taken before the error was given back: the job runs on the same worker.
        done = wait_state(stack.url, job["id"], {"completed", "failed"}, timeout=30)
        assert done["state"] == "completed"
        assert worker.alive
    finally:
        redis.execute_command("ACL", "SETUSER", "default", "+@all")
        stack.stop()
        redis.close()


@pytest.mark.slow  # a web process and a worker of its own
def test_a_redis_error_recording_a_job_s_end_does_not_end_the_worker(
    own_valkey: Valkey, tmp_path: Path
) -> None:
    """After a job's function returns, arq records its end in a transaction of its own
    (``finish_job``); an error there (in the chaos soak: a new connection closed by a restarting
    Valkey during its handshake, which no client retries) used to end the worker. Every key but
    arq's abort set stays open, so that transaction, which removes the job from the abort set,
    fails at each try while everything else works."""
    stack = Stack(own_valkey, "finish:", tmp_path, {"STEPSTREAM_LEASE_SECONDS": "2"})
    redis = stack.redis()
    queue = "finish:queue"
    try:
        stack.add_web()
        worker = stack.add_worker()
        open_keys = ["~finish:*", "~test:*", "~arq:job:*", "~arq:in-progress:*", "~arq:retry:*"]
        redis.execute_command("ACL", "SETUSER", "default", "resetkeys", *open_keys)
        job = submit(stack.url, "counted", {})
        wait_until(
            lambda: BOOKKEEPING_ERROR in worker.log() or not worker.alive,
            timeout=30,
            what="the worker to fail recording the job's end",
        )
        assert worker.alive, worker.log()
        assert wait_state(stack.url, job["id"], {"completed", "failed"})["state"] == "completed"
        assert redis.zscore(queue, job["id"]) is not None  # arq's end not recorded: offered again
        redis.execute_command("ACL", "SETUSER", "default", "allkeys")
        wait_until(lambda: redis.zcard(queue) == 0, timeout=30, what="arq to record the end")
        # Offered again, the finished job was only shown: each step ran once, one `completed`.
        assert redis.hgetall(executions_key(job["id"])) == dict.fromkeys(COUNTED_STEPS, "1")
        status, events = read_stream(f"{stack.url}/api/jobs/{job['id']}/events?after=0")
        assert status == 200 and [e.type for e in events].count("completed") == 1
        # The same worker goes on taking jobs.
        after = submit(stack.url, "counted", {})
        assert wait_state(stack.url, after["id"], {"completed", "failed"})["state"] == "completed"
        assert worker.alive and len(stack.workers) == 1
    finally:
        redis.execute_command("ACL", "SETUSER", "default", "allkeys")
        stack.stop()
        redis.close()


@pytest.mark.slow  # a web process and a worker of its own
def test_a_redis_error_reading_the_queue_does_not_end_the_worker(
    own_valkey: Valkey, tmp_path: Path
) -> None:
    """Each poll reads the queue (ZRANGEBYSCORE); arq raised an error there out of its loop and
    the worker ended. Denying the command makes every poll fail; the worker must log it, stay
    up, and take the next job once the queue can be read again."""
    stack = Stack(own_valkey, "poll:", tmp_path)
    redis = stack.redis()
    try:
        stack.add_web()
        worker = stack.add_worker()
        redis.execute_command("ACL", "SETUSER", "default", "-zrangebyscore")
        wait_until(
            lambda: POLL_WARNING in worker.log() or not worker.alive,
            timeout=20,
            what="the worker to fail reading the queue",
        )
        assert worker.alive, worker.log()
        redis.execute_command("ACL", "SETUSER", "default", "+zrangebyscore")
        job = submit(stack.url, "counted", {})
        done = wait_state(stack.url, job["id"], {"completed", "failed"}, timeout=30)
        assert done["state"] == "completed"
        assert worker.alive and len(stack.workers) == 1
    finally:
        redis.execute_command("ACL", "SETUSER", "default", "+@all")
        stack.stop()
        redis.close()


BUILD_SETTINGS = """
import logging, sys
import stepstream.tasks.worker as worker
from stepstream.tasks import registry
from stepstream.tasks.settings import Settings

assert not registry.default_registry.tasks(), "importing the worker module imported task modules"
assert not logging.getLogger().handlers, "importing the worker module set up logging"
built = worker.worker_settings(Settings(demo_tasks=True, prefix="built:"))
assert built.queue_name == "built:queue", built.queue_name
assert registry.default_registry.get_task("analyze_document") is not None
assert worker.WorkerSettings.functions[0].name == "stepstream.run_job"
print("ok")
"""


def test_the_worker_settings_are_built_by_a_function_not_at_import() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BUILD_SETTINGS], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.slow  # a web process and a worker of its own
def test_ctrl_c_twice_at_a_workers_terminal_hands_its_running_job_back_at_once(
    make_stack: StackFactory,
) -> None:
    """`stepstream worker` in a terminal: the first Ctrl-C says what it waits for, the second
    hands the job back without waiting out the grace period."""
    s = make_stack(webs=1, workers=1, STEPSTREAM_SHUTDOWN_GRACE_SECONDS="600")
    worker = s.workers[0]
    job = submit(s.url, "gated", {"events": 1})  # runs until its gate opens, which it never does
    wait_state(s.url, job["id"], {"running"}, timeout=30)
    worker.signal(signal.SIGINT)
    said = "waiting up to 600 s for 1 running job(s)"
    wait_until(lambda: said in worker.log(), 20, what="the worker to say what it waits for")
    assert "Ctrl-C again" in worker.log() and worker.alive
    worker.signal(signal.SIGINT)
    assert worker.proc is not None and worker.proc.wait(timeout=30) == 0, worker.log()
    record = wait_state(s.url, job["id"], {"retrying"}, timeout=10)
    assert record["error"]["type"] == "WorkerShutdown"
