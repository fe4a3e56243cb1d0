"""Human input with real processes: a waiting job holds no worker, the answer resumes it on any
worker from its checkpoints, and every refused answer changes nothing stored."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from stepstream import (
    AsyncClient,
    Client,
    Conflict,
    InputEvent,
    InvalidInput,
    JobState,
    WaitingEvent,
)
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import get_job, submit, wait_state
from tests.support.cli import run_cli
from tests.support.processes import ROOT, Valkey, wait_until
from tests.support.sse import Event, read_stream
from tests.support.tasks import Decision, executions_key
from tests.test_auth import ALICE, BOB, PRODUCTION
from tests.test_jobs import store_snapshot

YES = {"approved": True, "note": "fine", "level": 2}


def answer(base: str, job_id: str, name: str, value: Any, **kw: Any) -> httpx.Response:
    return http.post(
        f"{base}/api/jobs/{job_id}/input", json={"name": name, "value": value}, timeout=10, **kw
    )


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def waiting(base: str, job_id: str, timeout: float = 30, **kw: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"{base}/api/jobs/{job_id}", timeout=10, **kw).json()
        if job["state"] == "waiting":
            return dict(job)
        assert job["state"] in ("queued", "running"), job
        assert time.monotonic() < deadline, f"job {job_id} is {job['state']}, not waiting"
        time.sleep(0.05)


def settled_waiting(s: Stack, job_id: str, **kw: Any) -> dict[str, Any]:
    """Waiting, and the run that suspended gone from arq's queue: arq removes its entry a moment
    after the ``waiting`` append, which a keyspace snapshot taken in between would see."""
    job = waiting(s.url, job_id, **kw)
    wait_until(lambda: s.redis().zscore(f"{s.prefix}queue", job_id) is None, timeout=30)
    return job


def full_log(base: str, job_id: str) -> list[Event]:
    status, events = read_stream(f"{base}/api/jobs/{job_id}/events?after=0")
    assert status == 200
    return events


def executions(s: Stack, job_id: str) -> dict[str, str]:
    return dict(s.redis().hgetall(executions_key(job_id)))


def test_waiting_jobs_hold_no_worker_slot(make_stack: StackFactory) -> None:
    """One worker that runs one job at a time: three jobs waiting for input do not keep a
    fourth from running. Were a wait to hold its slot, the second job would never start."""
    s = make_stack(webs=1, workers=1, STEPSTREAM_MAX_JOBS="1")
    asking = [submit(s.url, "asks", {}) for _ in range(3)]
    for job in asking:
        record = waiting(s.url, job["id"])
        request = record["waiting_for"]
        assert request["name"] == "decision" and request["prompt"] == "Go on?"
        assert request["schema"]["required"] == ["approved"]
        assert request["timeout_at"] is None
    other = submit(s.url, "counted", {})
    assert wait_state(s.url, other["id"], {"completed", "failed"})["state"] == "completed"
    assert all(get_job(s.url, j["id"])["state"] == "waiting" for j in asking)
    for job in asking:
        assert answer(s.url, job["id"], "decision", YES).status_code == 202
    for job in asking:
        done = wait_state(s.url, job["id"], {"completed", "failed"})
        assert done["state"] == "completed", done["error"]
        assert done["result"]["decision"] == YES


@pytest.mark.slow  # kills, restarts or starts processes, or waits out retries
def test_an_answer_after_restarts_resumes_from_checkpoints(
    own_valkey: Valkey, tmp_path: Path
) -> None:
    """The wait survives a worker, a web process and Valkey restarting; the answer resumes the
    job on the new worker, which restores the step done before the wait instead of redoing it."""
    s = Stack(own_valkey, "resume:", tmp_path)
    try:
        s.add_web()
        s.add_worker()
        job = submit(s.url, "asks", {})
        record = waiting(s.url, job["id"])
        assert record["attempt"] == 0, "a wait costs no attempt"
        s.stop()
        s.webs.clear()
        s.workers.clear()
        own_valkey.restart()
        s.add_web()
        s.add_worker()
        assert get_job(s.url, job["id"])["state"] == "waiting"
        response = answer(s.url, job["id"], "decision", YES)
        assert response.status_code == 202, response.text
        assert response.json()["state"] == "queued"
        done = wait_state(s.url, job["id"], {"completed", "failed"})
        assert done["state"] == "completed", done["error"]
        assert done["result"] == {"before": "checked", "decision": YES}
        assert done["attempt"] == 1 and done["waiting_for"] is None
        given = done["answers"]["decision"]
        assert given["value"] == YES and given["by"] == "anonymous" and given["at"]
        # The step before the wait ran once; the code around the steps ran twice.
        assert executions(s, job["id"]) == {"runs": "2", "before": "1", "after": "1"}
        log = full_log(s.url, job["id"])
        types = [e.type for e in log]
        assert types.count("waiting") == 1 and types.count("input") == 1
        assert types.index("waiting") < types.index("input") < len(types) - 1
        wait_event = log[types.index("waiting")].data
        assert wait_event["name"] == "decision" and wait_event["schema"]["type"] == "object"
        input_event = log[types.index("input")].data
        assert input_event["value"] == YES and input_event["by"] == "anonymous"
        after = log[types.index("input") :]
        restored = [e.data["step"]["name"] for e in after if e.data.get("restored")]
        assert restored == ["before"]
    finally:
        s.stop()


def test_the_run_after_an_answer_keeps_its_lease(make_stack: StackFactory) -> None:
    """The run an answer queues is an arq job of its own id; its worker renews that job's lease.
    With a 1 s lease and a 3 s step, a lease left to lapse would hand the job to the second
    worker while the first still runs it, and the step would run twice."""
    s = make_stack(webs=1, workers=2, STEPSTREAM_LEASE_SECONDS="1")
    job = submit(s.url, "asks", {"hold_after": 3})
    waiting(s.url, job["id"])
    assert answer(s.url, job["id"], "decision", YES).status_code == 202
    done = wait_state(s.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    assert executions(s, job["id"]) == {"runs": "2", "before": "1", "after": "1"}
    starts = [e for e in full_log(s.url, job["id"]) if e.type == "started"]
    assert len(starts) == 2


BAD_VALUES = [
    pytest.param({"name": "decision", "value": {"approved": "yes"}}, ["approved"], id="type"),
    pytest.param({"name": "decision", "value": {"note": "x"}}, ["approved"], id="missing"),
    pytest.param(
        {"name": "decision", "value": {"approved": True, "level": 9}}, ["level"], id="range"
    ),
    pytest.param({"name": "decision", "value": "yes"}, [], id="not-an-object"),
]


@pytest.mark.parametrize(("body", "fields"), BAD_VALUES)
def test_a_bad_value_is_422_naming_the_fields_and_changes_nothing(
    make_stack_module: Stack, body: dict[str, Any], fields: list[str]
) -> None:
    s = make_stack_module
    job = submit(s.url, "asks", {})
    settled_waiting(s, job["id"])
    before = store_snapshot(s)
    response = http.post(f"{s.url}/api/jobs/{job['id']}/input", json=body, timeout=10)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_value" and "decision" in error["message"]
    assert [d["loc"] for d in error["details"]] == [fields]
    assert store_snapshot(s) == before
    assert get_job(s.url, job["id"])["state"] == "waiting"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param({"name": "decision"}, "invalid_body", id="no-value"),
        pytest.param({"value": YES}, "invalid_body", id="no-name"),
        pytest.param({"name": "decision", "value": YES, "x": 1}, "invalid_body", id="stray"),
        pytest.param({"name": "decision", "value": {"note": "x" * 200_001}}, "string_too_long"),
    ],
)
def test_a_malformed_answer_is_422_and_changes_nothing(
    make_stack_module: Stack, body: dict[str, Any], code: str
) -> None:
    s = make_stack_module
    job = submit(s.url, "asks", {})
    settled_waiting(s, job["id"])
    before = store_snapshot(s)
    response = http.post(f"{s.url}/api/jobs/{job['id']}/input", json=body, timeout=10)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    assert store_snapshot(s) == before


def test_a_number_no_json_answer_could_carry_is_422(make_stack_module: Stack) -> None:
    s = make_stack_module
    job = submit(s.url, "asks", {})
    settled_waiting(s, job["id"])
    before = store_snapshot(s)
    response = http.post(
        f"{s.url}/api/jobs/{job['id']}/input",
        content=b'{"name": "decision", "value": {"approved": true, "extra": 1e400}}',
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_value"
    assert store_snapshot(s) == before


def test_an_answer_with_a_field_the_schema_does_not_declare_is_422(
    make_stack_module: Stack,
) -> None:
    """Input schemas are closed, as submits are: an extra field is not stored, logged or
    broadcast, whoever sends it."""
    s = make_stack_module
    job = submit(s.url, "asks", {})
    record = settled_waiting(s, job["id"])
    assert record["waiting_for"]["schema"]["additionalProperties"] is False
    before = store_snapshot(s)
    injected = {"approved": True, "injected": {"payload": "x" * 1000}}
    response = answer(s.url, job["id"], "decision", injected)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_value"
    assert "injected" in error["details"][0]["msg"], error
    assert store_snapshot(s) == before
    assert answer(s.url, job["id"], "decision", YES).status_code == 202


def test_an_answer_over_the_size_limit_is_413_and_changes_nothing(
    make_stack_module: Stack,
) -> None:
    s = make_stack_module
    job = submit(s.url, "asks", {})
    settled_waiting(s, job["id"])
    before = store_snapshot(s)
    # Fits the schema and every other limit; only its size is refused.
    big = answer(s.url, job["id"], "decision", {"approved": True, "note": "x" * 70_000})
    assert big.status_code == 413, big.text
    error = big.json()["error"]
    assert error["code"] == "answer_too_large"
    assert error["details"] == {"limit": 65536, "setting": "STEPSTREAM_MAX_ANSWER_BYTES"}
    # Not sent as JSON: 415, whatever the body holds.
    as_text = http.post(
        f"{s.url}/api/jobs/{job['id']}/input",
        content=json.dumps({"name": "decision", "value": YES}),
        headers={"Content-Type": "text/plain"},
        timeout=10,
    )
    assert as_text.status_code == 415, as_text.text
    assert as_text.json()["error"]["code"] == "unsupported_media_type"
    assert store_snapshot(s) == before
    assert get_job(s.url, job["id"])["state"] == "waiting"


def test_a_second_answer_is_409_and_the_first_is_kept(make_stack_module: Stack) -> None:
    s = make_stack_module
    job = submit(s.url, "asks", {})
    settled_waiting(s, job["id"])
    before = store_snapshot(s)
    wrong = answer(s.url, job["id"], "other", YES)
    assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "wrong_input"
    assert wrong.json()["error"]["details"] == {"waiting_for": "decision"}
    assert store_snapshot(s) == before
    assert answer(s.url, job["id"], "decision", YES).status_code == 202
    second = answer(s.url, job["id"], "decision", {"approved": False})
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "already_answered"
    done = wait_state(s.url, job["id"], {"completed", "failed"})
    assert done["result"]["decision"] == YES
    assert done["answers"]["decision"]["value"] == YES
    late = answer(s.url, job["id"], "decision", {"approved": False})
    assert late.status_code == 409 and late.json()["error"]["code"] == "already_answered"


def test_a_job_that_is_not_waiting_refuses_an_answer(make_stack_module: Stack) -> None:
    s = make_stack_module
    job = submit(s.url, "counted", {})
    wait_state(s.url, job["id"], {"completed"})
    response = answer(s.url, job["id"], "decision", YES)
    assert response.status_code == 409
    assert response.json()["error"] == {
        "code": "not_waiting",
        "message": "the job is completed, not waiting for input",
        "details": {"state": "completed"},
    }


def test_an_unanswered_wait_times_out_as_failed_or_with_its_default(
    make_stack_module: Stack,
) -> None:
    s = make_stack_module
    plain = submit(s.url, "asks", {"timeout": 1})
    fallback = submit(s.url, "asks", {"timeout": 1, "default": {"approved": True, "note": "d"}})
    record = waiting(s.url, plain["id"])
    assert record["waiting_for"]["timeout_at"] and record["waiting_for"]["default"] is None
    assert waiting(s.url, fallback["id"])["waiting_for"]["default"]["note"] == "d"
    failed = wait_state(s.url, plain["id"], {"failed", "completed"}, timeout=20)
    assert failed["state"] == "failed"
    assert failed["error"]["type"] == "InputTimeout"
    assert "decision" in failed["error"]["message"]
    assert failed["waiting_for"] is None
    done = wait_state(s.url, fallback["id"], {"failed", "completed"}, timeout=20)
    assert done["state"] == "completed", done["error"]
    assert done["result"]["decision"]["note"] == "d"
    assert done["answers"]["decision"]["by"] == "default"
    assert executions(s, fallback["id"])["before"] == "1"


def test_cancel_while_waiting(make_stack_module: Stack) -> None:
    s = make_stack_module
    # A timeout the cancel comes well before, even on a loaded machine.
    job = submit(s.url, "asks", {"timeout": 5})
    waiting(s.url, job["id"])
    response = http.post(f"{s.url}/api/jobs/{job['id']}/cancel", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    assert response.json()["waiting_for"] is None
    refused = answer(s.url, job["id"], "decision", YES)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_waiting"
    time.sleep(6)  # past the timeout: its entry finds the job cancelled and leaves it so
    record = get_job(s.url, job["id"])
    assert record["state"] == "cancelled" and record["error"] is None
    log = full_log(s.url, job["id"])
    assert log[-1].type == "cancelled"
    assert log[-1].data["reason"] == "cancelled while waiting for input"


@pytest.fixture(scope="module")
def prod(module_stacks: StackFactory) -> Stack:
    return module_stacks(webs=1, workers=1, **PRODUCTION)


def test_only_the_owner_or_an_answering_token_may_answer(prod: Stack) -> None:
    s = prod
    submitted = http.post(
        f"{s.url}/api/jobs", json={"task": "asks", "input": {}, "subject": "u-7"}, headers=ALICE
    )
    job = submitted.json()
    settled_waiting(s, job["id"], headers=ALICE)
    before = store_snapshot(s)
    # The stream token of the submit answer reads, never answers.
    reader = answer(s.url, job["id"], "decision", YES, headers=bearer(job["stream_token"]))
    assert reader.status_code == 403 and reader.json()["error"]["code"] == "forbidden"
    read_only = http.post(f"{s.url}/api/jobs/{job['id']}/token", headers=ALICE).json()
    assert read_only["may_answer"] is False
    assert (
        answer(s.url, job["id"], "decision", YES, headers=bearer(read_only["token"])).status_code
        == 403
    )
    firehose = http.post(f"{s.url}/api/events/token", headers=ALICE).json()["token"]
    assert answer(s.url, job["id"], "decision", YES, headers=bearer(firehose)).status_code == 403
    assert answer(s.url, job["id"], "decision", YES, headers=BOB).status_code == 404
    anonymous = answer(s.url, job["id"], "decision", YES)
    assert anonymous.status_code == 401 and "may_answer" in anonymous.json()["error"]["message"]
    assert store_snapshot(s) == before
    minted = http.post(
        f"{s.url}/api/jobs/{job['id']}/token", json={"may_answer": True}, headers=ALICE
    ).json()
    assert minted["may_answer"] is True
    other = http.post(f"{s.url}/api/jobs", json={"task": "asks", "input": {}}, headers=ALICE).json()
    settled_waiting(s, other["id"], headers=ALICE)
    before = store_snapshot(s)
    # Scoped to one job: it answers that job only.
    assert (
        answer(s.url, other["id"], "decision", YES, headers=bearer(minted["token"])).status_code
        == 404
    )
    # Never in the query string, where an answer would be a CORS simple request.
    in_query = answer(s.url, job["id"], "decision", YES, params={"token": minted["token"]})
    assert in_query.status_code == 401, in_query.text
    assert "Authorization" in in_query.json()["error"]["message"]
    assert store_snapshot(s) == before
    given = answer(s.url, job["id"], "decision", YES, headers=bearer(minted["token"]))
    assert given.status_code == 202, given.text
    assert given.json()["answers"]["decision"]["by"] == "subject:u-7"
    by_key = answer(s.url, other["id"], "decision", YES, headers=ALICE)
    assert by_key.status_code == 202 and by_key.json()["answers"]["decision"]["by"] == "owner:alice"


QUOTE = {
    "client": "Acme",
    "roles": [{"role": "ml_engineer", "level": "senior", "count": 2}],
    "weeks": 4,
    "review": True,
}


def test_the_demo_quote_waits_for_approval_before_its_breakdown(
    make_stack_module: Stack,
) -> None:
    """generate_quote with review: the costs are computed, then a person approves (the job
    completes, its costs restored, not recomputed) or rejects it (cancelled, the note as the
    reason). Driven through the Python client."""
    s = make_stack_module
    with Client(s.url) as client:
        approved = client.submit("generate_quote", QUOTE)
        rejected = client.submit("generate_quote", QUOTE)
        for job in (approved, rejected):
            waiting(s.url, job.id)
        record = client.get(approved.id)
        assert record.state is JobState.waiting
        assert record.waiting_for is not None and record.waiting_for.name == "approval"
        assert set(record.waiting_for.schema_["properties"]) == {"approved", "note"}
        assert "Acme" in (record.waiting_for.prompt or "")
        states = [step.state for step in record.steps]
        assert states == ["completed"] * 5 + ["pending"], states
        with pytest.raises(InvalidInput) as bad:
            client.answer(approved.id, "approval", {"note": "?"})
        assert [e.loc for e in bad.value.field_errors] == [("approved",)]
        client.answer(approved.id, "approval", {"approved": True, "note": "ok"})
        client.answer(rejected.id, "approval", {"approved": False, "note": "Too expensive"})
        with pytest.raises(Conflict):
            client.answer(rejected.id, "approval", {"approved": True})
        done = client.wait(approved.id, timeout=30)
        ended = client.wait(rejected.id, timeout=30)
    assert done.state is JobState.completed and done.result["total"] > 0
    assert done.answers["approval"].value == {"approved": True, "note": "ok"}
    log = full_log(s.url, approved.id)
    run_again = log[[e.type for e in log].index("input") :]
    assert [e.data["step"]["name"] for e in run_again if e.type == "step"] == [
        "Formatting breakdown"
    ], "the steps before the wait were restored, not run again"
    assert ended.state is JobState.cancelled
    assert full_log(s.url, rejected.id)[-1].data["reason"] == "Too expensive"


def test_the_cli_answers_a_waiting_job(make_stack_module: Stack) -> None:
    s = make_stack_module
    job = submit(s.url, "asks", {})
    waiting(s.url, job["id"])
    refused = run_cli(s.url, "answer", job["id"], "decision", "--value", '{"approved": 1}')
    assert refused.returncode == 4, refused.stderr
    assert "approved" in refused.stderr
    given = run_cli(s.url, "answer", job["id"], "decision", "--value", json.dumps(YES))
    assert given.returncode == 0, given.stderr
    assert given.stdout.strip() == f"Answered 'decision': job {job['id']} is queued"
    done = wait_state(s.url, job["id"], {"completed", "failed"})
    assert done["result"]["decision"] == YES
    watched = run_cli(s.url, "watch", job["id"], "--plain")
    assert "Waiting for input 'decision': Go on?" in watched.stdout
    assert "Input 'decision' given by anonymous; resuming" in watched.stdout


NODE = shutil.which("node")
BROWSER_ANSWER = """
import { answer } from "%s";
const [base, job, token] = process.argv.slice(2);
const outcome = async (value) => {
  try {
    const record = await answer(job, "decision", value, { baseUrl: base, token });
    return { state: record.state, by: record.answers.decision.by };
  } catch (error) {
    return { name: error.name, status: error.status, code: error.code, details: error.details };
  }
};
const results = [];
for (const value of [{ approved: "no" }, { approved: true }, { approved: false }]) {
  results.push(await outcome(value));
}
console.log(JSON.stringify(results));
"""


@pytest.mark.skipif(NODE is None, reason="`node` is not on PATH")
def test_the_browser_client_answers_with_an_answering_token(prod: Stack, tmp_path: Path) -> None:
    """answer() of /stepstream.js, run by Node against the real server: a bad value rejects
    with the server's 422 details, the first answer resolves to the queued record, a second
    rejects with already_answered."""
    s = prod
    job = http.post(f"{s.url}/api/jobs", json={"task": "asks", "input": {}}, headers=ALICE).json()
    waiting(s.url, job["id"], headers=ALICE)
    token = http.post(
        f"{s.url}/api/jobs/{job['id']}/token", json={"may_answer": True}, headers=ALICE
    ).json()["token"]
    script = tmp_path / "answer.mjs"
    script.write_text(BROWSER_ANSWER % (ROOT / "static" / "stepstream.js").as_uri())
    assert NODE is not None
    run = subprocess.run(
        [NODE, str(script), f"{s.url}/", job["id"], token],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    bad, given, again = json.loads(run.stdout)
    assert bad["name"] == "StepstreamError" and bad["status"] == 422
    assert bad["code"] == "invalid_value" and bad["details"][0]["loc"] == ["approved"]
    assert given == {"state": "queued", "by": "token"}
    assert again["status"] == 409 and again["code"] == "already_answered"
    done = wait_state_as(s, job["id"])
    assert done["result"]["decision"]["approved"] is True


def wait_state_as(s: Stack, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        job = http.get(f"{s.url}/api/jobs/{job_id}", headers=ALICE, timeout=10).json()
        if job["state"] in ("completed", "failed"):
            return dict(job)
        assert time.monotonic() < deadline, job["state"]
        time.sleep(0.05)


def test_one_stream_follows_a_job_through_its_wait_with_the_async_client(
    make_stack_module: Stack,
) -> None:
    """A wait is no end: the job's stream goes on through `waiting`, the answer given from the
    same script, `input`, and the run after it, to `completed`; the events come typed."""
    s = make_stack_module

    async def scenario() -> list[Any]:
        seen: list[Any] = []
        async with AsyncClient(s.url) as client:
            job = await client.submit("asks", {})
            async for event in client.events(job.id, after="0"):
                seen.append(event)
                if isinstance(event, WaitingEvent):
                    assert event.name == "decision" and event.prompt == "Go on?"
                    assert event.schema_["properties"]["approved"]["type"] == "boolean"
                    answered = await client.answer(job.id, "decision", Decision(approved=True))
                    assert answered.state is JobState.queued
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    types = [e.type for e in seen]
    assert types[-1] == "completed", types
    given = next(e for e in seen if isinstance(e, InputEvent))
    assert given.value == {"approved": True, "note": "", "level": 1} and given.by == "anonymous"
    assert types.index("waiting") < types.index("input") < types.index("completed")
