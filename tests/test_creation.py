"""Job creation (tasks/creation.py): a job is made whole or not at all, and an input is checked
against its task, refusing fields the task does not declare unless its model opts in."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import redis
from arq.constants import job_key_prefix

from stepstream.tasks.idempotency import CLAIM_IN_FLIGHT_SECONDS
from stepstream.tasks.keyspace import Keys
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.cli import run_cli
from tests.support.processes import ROOT, Valkey, stack_env
from tests.support.sse import read_stream
from tests.test_jobs import store_snapshot

AI_TASKS = "tests.support.ai_tasks"


# -- all or nothing ----------------------------------------------------------------------------


def job_ids(r: redis.Redis, keys: Keys) -> set[str]:
    head, tail = keys.job_parts
    return {
        key.removeprefix(head).removesuffix(tail)
        for key in r.scan_iter(f"{head}*{tail}", count=1_000)
        if key.endswith(tail) and not key.endswith(":events" + tail)
    }


def half_made(r: redis.Redis, keys: Keys) -> list[str]:
    """Each piece of a job whose other pieces are missing: a record without its log, its queue
    entry or its place among the owner's unfinished jobs, or any of those without a record."""
    ids = job_ids(r, keys)
    problems: list[str] = []
    for job_id in ids:
        first = r.xrange(keys.job_events(job_id), count=1)
        if not first or json.loads(first[0][1]["e"])["type"] != "queued":
            problems.append(f"{job_id}: a record without its queued event")
        if r.zscore(keys.queue, job_id) is None or not r.exists(job_key_prefix + job_id):
            problems.append(f"{job_id}: a record without its queue entry")
        if r.zscore(keys.owner_unfinished(None), job_id) is None:
            problems.append(f"{job_id}: a record not counted among its owner's unfinished jobs")
        if r.zscore(keys.jobs, job_id) is None:
            problems.append(f"{job_id}: a record missing from the job index")
    for name, members in (
        ("queue entry", r.zrange(keys.queue, 0, -1)),
        ("unfinished place", r.zrange(keys.owner_unfinished(None), 0, -1)),
        ("index entry", r.zrange(keys.jobs, 0, -1)),
    ):
        problems.extend(f"{m}: a {name} without a record" for m in members if m not in ids)
    for key in r.scan_iter(f"{keys.prefix}idem:*"):
        claimed = r.get(key)
        ttl = r.ttl(key)
        # A claim without its job lapses in seconds: the client's retry creates the job.
        orphan = claimed is not None and claimed.split(" ", 1)[0] not in ids
        if orphan and ttl > CLAIM_IN_FLIGHT_SECONDS:
            problems.append(f"{key}: kept for {ttl} s, without its job")
    return problems


def kill_at_each_point(valkey: Valkey, prefix: str, mode: str) -> tuple[list[int], str]:
    """Run ``tests.support.kill_points`` killed before its 1st, 2nd, ... command to Redis until
    a run ends by itself; check the store after each kill. Returns how many jobs each killed
    run left, and the last run's output."""
    keys = Keys(prefix)
    r = redis.Redis.from_url(valkey.url, decode_responses=True)
    env = stack_env(
        valkey.url,
        prefix,
        STEPSTREAM_TASK_MODULES=f"{AI_TASKS},tests.support.ai_recurring",
        STEPSTREAM_MAX_UNFINISHED_PER_OWNER="1000",
        STEPSTREAM_MODE="development",  # the app runs in the child, bound to no address
    )

    def run(point: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tests.support.kill_points", mode, str(point)],
            cwd=ROOT,
            env={**env, "KILL_POINTS_KEY": f"key-{point}"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    # Once unharmed first: the server learns the append script, so every later run sends the
    # same commands (the first also sends SCRIPT LOAD).
    warm = run(0)
    assert warm.returncode == 0, warm.stderr
    made: list[int] = []
    for point in range(1, 40):
        before = len(job_ids(r, keys))
        done = run(point)
        assert half_made(r, keys) == [], f"killed before command {point}"
        if done.returncode == 0:
            assert int(done.stdout.split()[-1]) == point - 1, "each command was a kill point"
            return made, done.stdout
        assert done.returncode == -signal.SIGKILL, done.stderr
        made.append(len(job_ids(r, keys)) - before)
    raise AssertionError("the creation never ran to its end")


@pytest.mark.slow  # kills, restarts or starts processes, or waits out retries
def test_a_scheduled_submit_killed_at_any_point_leaves_a_whole_job_or_none(
    valkey: Valkey,
) -> None:
    made, last = kill_at_each_point(valkey, "submitkill:", "submit")
    assert last.split()[:2] == ["done", "202"]
    # The kills landed on both sides of the one write: some before it (no job), and at least
    # one after it, before the answer (a whole job, scheduled and queued for its time).
    assert set(made) == {0, 1}, made
    assert made[-1] == 1 and made.index(1) == len(made) - made.count(1)


@pytest.mark.slow  # kills, restarts or starts processes, or waits out retries
def test_a_recurring_tick_killed_at_any_point_leaves_a_whole_job_or_none(
    valkey: Valkey,
) -> None:
    made, last = kill_at_each_point(valkey, "tickkill:", "tick")
    assert last.split()[:2] == ["done", "created"]
    assert set(made) == {0, 1}, made
    assert made[-1] == 1 and made.index(1) == len(made) - made.count(1)


# -- unknown input fields ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_stack(module_stacks: StackFactory) -> Stack:
    return module_stacks(STEPSTREAM_TASK_MODULES=f"{AI_TASKS},tests.support.open_tasks")


def test_a_misspelt_input_field_is_refused_naming_it_and_stores_nothing(
    open_stack: Stack,
) -> None:
    before = store_snapshot(open_stack)
    response = http.post(
        f"{open_stack.url}/api/jobs",
        json={"task": "ai_echo", "input": {"value": 2, "fial": True, "countr": "x"}},
        timeout=10,
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    expected = "the input does not fit task 'ai_echo': unknown field(s) countr, fial"
    assert error["message"] == expected
    unknown = {tuple(d["loc"]) for d in error["details"] if d["type"] == "extra_forbidden"}
    assert unknown == {("fial",), ("countr",)}
    assert store_snapshot(open_stack) == before


def test_a_batch_with_an_unknown_field_names_the_input_and_stores_nothing(
    open_stack: Stack,
) -> None:
    before = store_snapshot(open_stack)
    response = http.post(
        f"{open_stack.url}/api/batches",
        json={"task": "ai_echo", "inputs": [{"value": 1}, {"value": 2, "reveiw": True}]},
        timeout=10,
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert "unknown field(s) reveiw" in error["message"]
    assert error["details"] == [
        {
            "index": 1,
            "loc": ["reveiw"],
            "msg": "Extra inputs are not permitted",
            "type": "extra_forbidden",
        }
    ]
    assert store_snapshot(open_stack) == before


def test_a_task_whose_model_allows_extra_fields_receives_them(open_stack: Stack) -> None:
    response = http.post(
        f"{open_stack.url}/api/jobs",
        json={"task": "open_echo", "input": {"label": "x", "colour": "blue"}},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    status, events = read_stream(f"{open_stack.url}/api/jobs/{job_id}/events?after=0")
    assert status == 200 and events[-1].type == "completed", [e.type for e in events]
    assert events[-1].data["result"] == {"label": "x", "extra": {"colour": "blue"}}


def test_the_task_catalogue_says_which_inputs_take_extra_fields(open_stack: Stack) -> None:
    tasks = http.get(f"{open_stack.url}/api/tasks", timeout=10).json()["tasks"]
    schemas = {t["name"]: t["input_schema"] for t in tasks}
    assert schemas["ai_echo"]["additionalProperties"] is False
    assert schemas["open_echo"]["additionalProperties"] is True


def test_a_worker_refuses_to_start_with_a_recurring_input_its_task_does_not_take(
    valkey: Valkey,
) -> None:
    run = run_cli(
        "http://unused.invalid",
        "worker",
        "--tasks",
        f"{AI_TASKS},tests.support.misspelt_recurring",
        timeout=60,
    )
    assert run.returncode != 0
    assert "recurring job 'misspelt'" in run.stderr, run.stderr
    assert "countr" in run.stderr and "ai_echo" in run.stderr
    assert "Traceback" not in run.stderr
