"""The worker process itself: what ends it and what must not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import Stack
from tests.support.api import submit, wait_state
from tests.support.processes import Valkey, wait_until

WARNING = "Redis error while starting a job"


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
