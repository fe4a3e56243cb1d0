"""Jobs that start jobs: ctx.map / spawn / join, with real web and worker processes."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import get_job, submit, wait_state
from tests.support.processes import wait_until
from tests.support.sse import Event, read_stream

TASKS = "tests.support.tasks,tests.support.fanout_tasks"
ENDED = {"completed", "failed", "cancelled"}


@pytest.fixture(scope="module")
def fan_stack(module_stacks: StackFactory) -> Stack:
    return module_stacks(workers=2, STEPSTREAM_TASK_MODULES=TASKS, STEPSTREAM_MAX_JOBS="2")


def children_of(stack: Stack, parent_id: str, query: str = "") -> list[dict[str, Any]]:
    """``GET /api/jobs?parent=``, every page of it."""
    jobs: list[dict[str, Any]] = []
    cursor = ""
    while True:
        url = f"{stack.url}/api/jobs?parent={parent_id}&limit=20{query}{cursor}"
        response = http.get(url, timeout=10)
        assert response.status_code == 200, response.text
        jobs.extend(response.json()["jobs"])
        if response.json()["next_cursor"] is None:
            return jobs
        cursor = f"&cursor={response.json()['next_cursor']}"


def test_fifty_children_on_two_workers_roll_up_into_the_parent(fan_stack: Stack) -> None:
    parent = submit(fan_stack.url, "fan_out", {"count": 50, "pace": 0.01})
    live: list[Event] = []
    watcher = threading.Thread(
        target=lambda: live.extend(
            read_stream(f"{fan_stack.url}/api/jobs/{parent['id']}/events?after=0", timeout=60)[1]
        )
    )
    watcher.start()
    done = wait_state(fan_stack.url, parent["id"], ENDED, timeout=60)
    watcher.join(30)
    assert done["state"] == "completed", done
    assert done["result"]["squares"] == [i * i for i in range(50)]
    assert done["children"]["size"] == 50 and done["children"]["completed"] == 50
    ends = [e.data for e in live if e.data.get("type") == "child" and "counts" in e.data]
    assert [e["counts"]["done"] for e in ends] == list(range(1, 51))
    starts = [e.data for e in live if e.data.get("type") == "child" and "counts" not in e.data]
    assert len(starts) == 50
    kids = children_of(fan_stack, parent["id"])
    assert [k["parent_index"] for k in kids] == list(range(50))
    assert all(k["parent"] == parent["id"] for k in kids)
