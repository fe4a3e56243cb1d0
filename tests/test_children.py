"""Jobs that start jobs: ctx.map / spawn / join, with real web and worker processes."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from typing import Any

import pytest

from stepstream import ChildEvent, ChildrenWait, Client, JobState
from stepstream.tasks.models import utcnow
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import get_job, submit, wait_state
from tests.support.cli import run_cli, run_cli_in_terminal
from tests.support.processes import wait_until
from tests.support.sse import Event, read_stream
from tests.support.tasks import executions_key, gate_key

TASKS = "tests.support.tasks,tests.support.ai_tasks,tests.support.fanout_tasks"
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
    # "Fan out" is step 1 of 2: its children take the parent from 0 to one half.
    assert [e["progress"] for e in ends] == [round(i / 100, 4) for i in range(1, 51)]
    assert ends[22]["message"] == "23 of 50 done"
    kinds = [("end" if "counts" in e.data else "start") for e in live if e.type == "child"]
    assert kinds.count("start") == 50
    # Shown live, as they happen: ends come between the starts, not all at the finish.
    assert kinds.index("end") < len(kinds) - 1 - kinds[::-1].index("start")
    progress = [e.data["progress"] for e in live if "progress" in e.data]
    assert progress == sorted(progress), "the parent's progress never goes back"
    kids = children_of(fan_stack, parent["id"])
    assert [k["parent_index"] for k in kids] == list(range(50))
    assert all(k["parent"] == parent["id"] for k in kids)


def jobs_with_parent(stack: Stack, parent_id: str) -> list[str]:
    """Every stored job whose record names ``parent_id`` as its parent (read from Redis, not
    from the parent's list of children)."""
    r = stack.redis()
    ids = r.zrange(f"{stack.prefix}jobs", 0, -1)
    return [i for i in ids if r.hget(f"{stack.prefix}job:{{{i}}}", "parent") == f'"{parent_id}"']


def full_log(stack: Stack, job_id: str) -> list[Event]:
    status, events = read_stream(f"{stack.url}/api/jobs/{job_id}/events?after=0", timeout=60)
    assert status == 200
    return events


def test_one_worker_with_one_slot_runs_a_parent_and_all_its_children(
    make_stack: StackFactory,
) -> None:
    # The parent's wait holds no slot: its 20 children run one by one on the only slot.
    s = make_stack(workers=1, STEPSTREAM_TASK_MODULES=TASKS, STEPSTREAM_MAX_JOBS="1")
    parent = submit(s.url, "fan_out", {"count": 20})
    done = wait_state(s.url, parent["id"], ENDED, timeout=60)
    assert done["state"] == "completed", done
    assert done["result"]["squares"] == [i * i for i in range(20)]
    spans = [(k["started_at"], k["finished_at"]) for k in children_of(s, parent["id"])]
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(sorted(spans)))


def test_a_read_of_the_waiting_parent_adds_its_running_children_s_progress(
    fan_stack: Stack,
) -> None:
    gate = f"half-{time.monotonic_ns()}"
    parent = submit(fan_stack.url, "fan_out", {"count": 4, "gate": gate})

    def four_half_way() -> bool:
        # Each child's own record says it is half way: its progress event is written, not
        # just its start (which a parent's "running" counts first).
        kids = children_of(fan_stack, parent["id"])
        return len(kids) == 4 and all(k["progress"] == 0.5 for k in kids)

    try:
        wait_until(four_half_way, timeout=30, what="four children half way")
        job = get_job(fan_stack.url, parent["id"])
        assert job["state"] == "waiting" and job["children"]["running"] == 4
        assert job["children"]["running_progress"] == 2.0
        # 0 of 4 ended, plus 4 halves: half of "Fan out", step 1 of 2.
        assert job["progress"] == 0.25
    finally:
        # Open the gate even on a failure: four children held there would keep the workers'
        # slots from the next tests on this stack.
        fan_stack.redis().rpush(gate_key(gate), *["go"] * 4)
    done = wait_state(fan_stack.url, parent["id"], ENDED, timeout=60)
    assert done["state"] == "completed"
    assert "running" not in done["children"]


def test_the_python_client_reads_a_waiting_parent_and_lists_its_children(
    fan_stack: Stack,
) -> None:
    gate = f"client-{time.monotonic_ns()}"
    with Client(fan_stack.url) as client:
        parent = client.submit("fan_out", {"count": 3, "gate": gate})
        try:
            wait_until(
                lambda: client.get(parent.id).state == JobState.waiting,
                timeout=30,
                what="waiting",
            )
            waiting = client.get(parent.id)
            assert isinstance(waiting.waiting_for, ChildrenWait)
            assert waiting.waiting_for.children["size"] == 3
            kids = list(client.iter_jobs(parent=parent.id, page_size=2))
            assert [k.parent_index for k in kids] == [0, 1, 2]
            assert {k.parent for k in kids} == {parent.id} and {k.depth for k in kids} == {1}
        finally:
            fan_stack.redis().rpush(gate_key(gate), *["go"] * 3)
        events = [e for e in client.events(parent.id, after="0") if isinstance(e, ChildEvent)]
        ends = [e for e in events if e.counts is not None]
        assert [e.counts["done"] for e in ends if e.counts] == [1, 2, 3]
        assert client.get(parent.id).children == {
            "size": 3,
            "done": 3,
            "completed": 3,
            "failed": 0,
            "cancelled": 0,
        }


def test_spawn_and_join_return_results_in_order(fan_stack: Stack) -> None:
    parent = submit(fan_stack.url, "spawn_join", {"values": [3, 1, 2]})
    done = wait_state(fan_stack.url, parent["id"], ENDED, timeout=60)
    assert done["state"] == "completed", done
    assert done["result"]["squares"] == [9, 1, 4]
    assert len(jobs_with_parent(fan_stack, parent["id"])) == 3


def test_a_tree_two_deep_completes_with_every_leaf(fan_stack: Stack) -> None:
    parent = submit(fan_stack.url, "fan_out", {"depth": 2})
    done = wait_state(fan_stack.url, parent["id"], ENDED, timeout=60)
    assert done["state"] == "completed", done
    assert done["result"]["squares"] == [0, 1, 0, 1]
    kids = children_of(fan_stack, parent["id"])
    assert [k["depth"] for k in kids] == [1, 1]
    assert all(len(children_of(fan_stack, k["id"])) == 2 for k in kids)


def test_collect_puts_markers_where_children_failed(fan_stack: Stack) -> None:
    # Child 2 fails retryably on both its attempts: it exhausts its retries, then counts.
    body = {"count": 6, "fail": [1, 4], "transient": [2], "on_failure": "collect"}
    parent = submit(fan_stack.url, "fan_out", body)
    done = wait_state(fan_stack.url, parent["id"], ENDED, timeout=60)
    assert done["state"] == "completed", done
    assert done["result"] == {"squares": [0, None, None, 9, None, 25], "failed": [1, 2, 4]}
    assert done["children"]["failed"] == 3 and done["children"]["completed"] == 3
    retried = next(k for k in children_of(fan_stack, parent["id"]) if k["parent_index"] == 2)
    assert retried["state"] == "failed" and retried["attempt"] == 2


@pytest.mark.parametrize(("failures", "state"), [([4], "completed"), ([1, 4], "failed")])
def test_max_failures_tolerates_that_many(
    fan_stack: Stack, failures: list[int], state: str
) -> None:
    body = {"count": 6, "fail": failures, "max_failures": 1}
    parent = submit(fan_stack.url, "fan_out", body)
    done = wait_state(fan_stack.url, parent["id"], ENDED, timeout=60)
    assert done["state"] == state, done
    if state == "failed":
        assert done["error"]["type"] == "ChildrenFailed"


def test_the_first_failure_fails_the_parent_and_cancels_the_others(
    make_stack: StackFactory,
) -> None:
    # Child 0 fails; every other child waits on a gate nobody opens: only the cancel can end
    # them. Room for all of them at once, so none waits for a slot the gated ones hold.
    s = make_stack(workers=1, STEPSTREAM_TASK_MODULES=TASKS, STEPSTREAM_MAX_JOBS="8")
    gate = f"never-{time.monotonic_ns()}"
    parent = submit(s.url, "fan_out", {"count": 6, "fail": [0], "gate": gate})
    done = wait_state(s.url, parent["id"], ENDED, timeout=60)
    assert done["state"] == "failed", done
    assert done["error"]["type"] == "ChildrenFailed"
    assert "index 0" in done["error"]["message"]

    def all_ended() -> bool:
        return all(k["state"] in ENDED for k in children_of(s, parent["id"]))

    wait_until(all_ended, timeout=30, what="every child ended")
    kids = children_of(s, parent["id"])
    assert [k["state"] for k in kids] == ["failed"] + ["cancelled"] * 5


def test_a_failed_tree_runs_again_once_its_failed_children_are_retried(fan_stack: Stack) -> None:
    parent = submit(fan_stack.url, "fan_out", {"count": 4, "fail_first": [1]})
    assert wait_state(fan_stack.url, parent["id"], ENDED)["state"] == "failed"

    def all_ended() -> bool:
        return all(k["state"] in ENDED for k in children_of(fan_stack, parent["id"]))

    wait_until(all_ended, timeout=30, what="every child ended")
    again = [k for k in children_of(fan_stack, parent["id"]) if k["state"] != "completed"]
    assert 1 in [k["parent_index"] for k in again]
    for kid in again:
        response = http.post(f"{fan_stack.url}/api/jobs/{kid['id']}/retry", timeout=10)
        assert response.status_code == 202, response.text
        assert wait_state(fan_stack.url, kid["id"], ENDED)["state"] == "completed"
    response = http.post(f"{fan_stack.url}/api/jobs/{parent['id']}/retry", timeout=10)
    assert response.status_code == 202, response.text
    done = wait_state(fan_stack.url, parent["id"], ENDED)
    assert done["state"] == "completed", done
    assert done["result"]["squares"] == [0, 1, 4, 9]
    assert done["children"]["completed"] == 4 and done["children"]["failed"] == 0
    assert len(children_of(fan_stack, parent["id"])) == 4


def test_concurrency_caps_the_children_running_at_once(fan_stack: Stack) -> None:
    parent = submit(fan_stack.url, "fan_out", {"count": 8, "pace": 0.05, "concurrency": 2})
    done = wait_state(fan_stack.url, parent["id"], ENDED, timeout=60)
    assert done["state"] == "completed", done
    assert done["result"]["squares"] == [i * i for i in range(8)]
    spans = [(k["started_at"], k["finished_at"]) for k in children_of(fan_stack, parent["id"])]
    most = max(sum(a <= at < b for a, b in spans) for at, _ in spans)
    assert most == 2  # four slots on the two workers: the cap is the map's


def test_cancelling_the_parent_half_way_cancels_every_unfinished_child(
    make_stack: StackFactory,
) -> None:
    s = make_stack(workers=1, STEPSTREAM_TASK_MODULES=TASKS, STEPSTREAM_MAX_JOBS="2")
    parent = submit(s.url, "fan_out", {"count": 20, "pace": 0.1})

    def half_way() -> bool:
        return (get_job(s.url, parent["id"]).get("children") or {}).get("done", 0) >= 5

    wait_until(half_way, timeout=60, what="five children ended")
    response = http.post(f"{s.url}/api/jobs/{parent['id']}/cancel", timeout=10)
    assert response.status_code in (200, 202), response.text
    # Every child not started was cancelled before the answer (a running one is stopped).
    cancel_at = utcnow()
    assert wait_state(s.url, parent["id"], ENDED)["state"] == "cancelled"

    def all_ended() -> bool:
        return all(k["state"] in ENDED for k in children_of(s, parent["id"]))

    wait_until(all_ended, timeout=30, what="every child ended")
    kids = children_of(s, parent["id"])
    assert len(kids) == 20
    completed = [k for k in kids if k["state"] == "completed"]
    assert 5 <= len(completed) < 20
    assert all(k["state"] == "cancelled" for k in kids if k["state"] != "completed")
    # No child started after the cancel.
    started = [k["started_at"] for k in kids if k["started_at"] is not None]
    assert all(at < cancel_at for at in started), (cancel_at, sorted(started))


def test_cancel_goes_down_a_tree_two_deep(make_stack: StackFactory) -> None:
    s = make_stack(workers=1, STEPSTREAM_TASK_MODULES=TASKS, STEPSTREAM_MAX_JOBS="8")
    gate = f"tree-{time.monotonic_ns()}"
    root = submit(s.url, "fan_out", {"depth": 2, "gate": gate})

    def leaves_running() -> bool:
        middle = children_of(s, root["id"])
        leaves = [leaf for m in middle for leaf in children_of(s, m["id"])]
        return len(leaves) == 4 and all(leaf["state"] == "running" for leaf in leaves)

    wait_until(leaves_running, timeout=30, what="the four grandchildren running")
    response = http.post(f"{s.url}/api/jobs/{root['id']}/cancel", timeout=10)
    assert response.status_code == 200, response.text  # waiting: cancelled at once
    middle = children_of(s, root["id"])
    tree = [root["id"], *(m["id"] for m in middle)]

    def all_cancelled() -> bool:
        jobs = [get_job(s.url, i) for i in tree]
        jobs += [leaf for m in middle for leaf in children_of(s, m["id"])]
        return all(job["state"] == "cancelled" for job in jobs)

    wait_until(all_cancelled, timeout=30, what="every job of the tree cancelled")


def test_width_and_depth_limits_refuse_a_fan_out_before_any_child(
    make_stack: StackFactory,
) -> None:
    s = make_stack(
        workers=1,
        STEPSTREAM_TASK_MODULES=TASKS,
        STEPSTREAM_MAX_CHILDREN_PER_CALL="5",
        STEPSTREAM_MAX_JOB_DEPTH="1",
    )
    wide = submit(s.url, "fan_out", {"count": 6})
    done = wait_state(s.url, wide["id"], ENDED)
    assert done["state"] == "failed" and done["error"]["type"] == "ChildrenRefused"
    assert "6 children in one call; the most is 5" in done["error"]["message"]
    assert children_of(s, wide["id"]) == []
    # Depth 1 may not start children: the middle of a two-deep tree is refused, which fails
    # the root (on_failure="fail").
    deep = submit(s.url, "fan_out", {"depth": 2})
    done = wait_state(s.url, deep["id"], ENDED)
    assert done["state"] == "failed" and done["error"]["type"] == "ChildrenFailed"
    middle = children_of(s, deep["id"])
    assert middle[0]["error"]["type"] == "ChildrenRefused"
    assert "depth 1 cannot start children" in middle[0]["error"]["message"]
    assert all(children_of(s, m["id"]) == [] for m in middle)
    bad = http.get(f"{s.url}/api/jobs?parent=not%20an%20id", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_parent"


def test_a_map_past_the_owner_s_room_is_refused_and_stores_nothing(
    make_stack: StackFactory,
) -> None:
    s = make_stack(
        workers=1, STEPSTREAM_TASK_MODULES=TASKS, STEPSTREAM_MAX_UNFINISHED_PER_OWNER="10"
    )
    r = s.redis()
    before = set(r.keys(f"{s.prefix}*"))
    parent = submit(s.url, "fan_out", {"count": 10})  # 10 more than the parent's own place
    done = wait_state(s.url, parent["id"], ENDED)
    assert done["state"] == "failed"
    assert done["error"]["type"] == "ChildrenRefused"
    assert "unfinished-jobs limit" in done["error"]["message"]
    assert "nothing was started" in done["error"]["message"]
    # The parent's own keys, and counters every job moves: nothing of any child.
    new = set(r.keys(f"{s.prefix}*")) - before
    own = {f"{s.prefix}job:{{{parent['id']}}}", f"{s.prefix}job:{{{parent['id']}}}:events"}
    assert not {k for k in new - own if "{" in k}, new - own
    assert r.zrange(f"{s.prefix}jobs", 0, -1) == [parent["id"]]
    assert jobs_with_parent(s, parent["id"]) == []
    assert r.zcard(f"{s.prefix}unfinished:-") == 0
    # With room for them, the same map runs.
    smaller = submit(s.url, "fan_out", {"count": 9})
    assert wait_state(s.url, smaller["id"], ENDED)["state"] == "completed"


@pytest.mark.parametrize("kill", ["before_create", "after_create"])
def test_a_parent_killed_while_creating_its_children_has_each_of_them_once(
    make_stack: StackFactory, kill: str
) -> None:
    s = make_stack(
        workers=2,
        STEPSTREAM_TASK_MODULES=TASKS,
        STEPSTREAM_MAX_JOBS="2",
        STEPSTREAM_LEASE_SECONDS="2",
    )
    parent = submit(s.url, "fan_out", {"count": 50, "kill": kill})

    def a_worker_died() -> bool:
        return any(w.proc is not None and w.proc.poll() is not None for w in s.workers)

    wait_until(a_worker_died, timeout=30, what="the parent's worker killed itself")
    s.add_worker()
    done = wait_state(s.url, parent["id"], ENDED, timeout=90)
    assert done["state"] == "completed", done
    assert done["result"]["squares"] == [i * i for i in range(50)]
    assert len(jobs_with_parent(s, parent["id"])) == 50
    assert s.redis().hget(executions_key(parent["id"]), "run") != "1", "never taken over"
    # Each child ran once: none was created (and run) twice.
    kids = children_of(s, parent["id"])
    assert [s.redis().hget(executions_key(k["id"]), "work") for k in kids] == ["1"] * 50
    log = full_log(s, parent["id"])
    assert [e.type for e in log].count("completed") == 1


def test_a_parent_whose_workers_die_while_it_waits_completes_once(
    make_stack: StackFactory,
) -> None:
    s = make_stack(
        workers=2,
        STEPSTREAM_TASK_MODULES=TASKS,
        STEPSTREAM_MAX_JOBS="2",
        STEPSTREAM_LEASE_SECONDS="2",
    )
    gate = f"wait-{time.monotonic_ns()}"
    parent = submit(s.url, "fan_out", {"count": 50, "gate": gate})
    r = s.redis()

    def leaves_blocked() -> bool:
        job = get_job(s.url, parent["id"])
        running = [k for k in children_of(s, parent["id"]) if k["state"] == "running"]
        return job["state"] == "waiting" and len(running) == 4

    wait_until(leaves_blocked, timeout=30, what="the parent waiting, 4 children running")
    for worker in s.workers:
        worker.kill()  # the running children's workers, and the one that ran the parent
    s.add(webs=0, workers=2)
    r.rpush(gate_key(gate), *["go"] * 54)  # every leaf, and those that run twice
    done = wait_state(s.url, parent["id"], ENDED, timeout=120)
    assert done["state"] == "completed", done
    assert done["result"]["squares"] == [i * i for i in range(50)]
    assert len(jobs_with_parent(s, parent["id"])) == 50
    log = full_log(s, parent["id"])
    assert [e.type for e in log].count("completed") == 1
    # The killed children were taken over: run twice, each completed once.
    kids = children_of(s, parent["id"])
    assert sum(k["attempt"] == 2 for k in kids) == 4


def test_the_children_s_spending_is_summed_on_the_parent(fan_stack: Stack) -> None:
    texts = ["One sentence here.", "Two words.", "Three short words here, then more."]
    body = {"task": "fan_spending", "input": {"texts": texts}, "budget": 3.0}
    response = http.post(f"{fan_stack.url}/api/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    parent = response.json()
    done = wait_state(fan_stack.url, parent["id"], ENDED, timeout=60)
    assert done["state"] == "completed", done
    kids = children_of(fan_stack, parent["id"])
    assert len(kids) == 3 and all(k["cost"] > 0 for k in kids)
    # The parent's budget caps the tree: each child gets an equal share of it.
    assert [k["budget"] for k in kids] == [1.0, 1.0, 1.0]
    assert done["children"]["cost"] == pytest.approx(sum(k["cost"] for k in kids))
    assert done["children"]["usage"] == {
        "calls": 6,
        "input_tokens": sum(k["usage"]["input_tokens"] for k in kids),
        "output_tokens": sum(k["usage"]["output_tokens"] for k in kids),
    }


def test_the_demo_corpus_analysis_maps_documents_and_merges_them(fan_stack: Stack) -> None:
    documents = [
        "Revenue grew in the third quarter. Churn fell.",
        "The migration finished early. Costs dropped.",
        "Hiring slowed as planned. Retention improved.",
    ]
    parent = submit(fan_stack.url, "analyze_corpus", {"documents": documents})
    done = wait_state(fan_stack.url, parent["id"], ENDED, timeout=60)
    assert done["state"] == "completed", done
    report = done["result"]
    assert report["documents"] == 3
    # Two sentences each, fewer than a summary's three: each summary is its whole document.
    assert report["per_document"] == documents
    assert report["summary"].startswith("Merge these document summaries")
    kids = children_of(fan_stack, parent["id"])
    assert [k["task"] for k in kids] == ["analyze_document"] * 3
    assert [k["input"]["text"] for k in kids] == documents
    assert done["usage"]["calls"] == 1  # the merge: one LLM call of the parent's own


def test_the_cli_lists_a_parent_s_children_and_draws_its_rolled_up_bar(fan_stack: Stack) -> None:
    body = json.dumps({"count": 10, "pace": 0.02, "concurrency": 2})
    code, screen = run_cli_in_terminal(fan_stack.url, "submit", "fan_out", "-i", body, "--watch")
    assert code == 0, screen
    redraws = screen.split("\r\x1b[K")
    # The parent's bar rises with its children's ends: "Fan out" is step 1 of 2, so k children
    # done is k * 5 % of the job. The renderer coalesces redraws (20 a second at most), so which
    # values show depends on timing: at least one between none and all, each at its fraction.
    shown = [
        (int(m[2]), int(m[1]))
        for line in redraws
        if (m := re.search(r"(\d+)%  Step 1 of 2 · Fan out — (\d+) of 10 done", line))
    ]
    assert any(0 < done < 10 for done, _ in shown), screen
    assert all(percent == done * 5 for done, percent in shown), shown
    # The fan-out's step ends once every child has, then the merge runs (finished steps are
    # printed as lines of their own, never coalesced).
    assert screen.index("✓ Step 1 of 2 · Fan out") < screen.index("✓ Step 2 of 2 · Merge"), screen
    parent_id = re.findall(r"job ([A-Za-z0-9_-]{20})", screen)[0]
    listed = run_cli(fan_stack.url, "jobs", "--parent", parent_id, "--json")
    assert listed.returncode == 0, listed.stderr
    kids = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [k["parent_index"] for k in kids] == list(range(10))
    assert {k["parent"] for k in kids} == {parent_id}
