"""Webhooks with real processes: a job's callback_url and the deployment webhook get each
terminal event, signed, retried, de-duplicable by event id, and delivered from the durable
outbox even when the worker delivering it is killed."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stepstream import Client
from stepstream.tasks import webhooks
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import get_job, wait_state
from tests.support.processes import ROOT, Process, Worker, free_port, wait_until
from tests.support.receiver import Delivery, Receiver
from tests.support.tasks import gate_key
from tests.test_jobs import store_snapshot

SECRET = "webhook-test-secret"
TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def second_receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def submit(base: str, task: str, input: dict[str, Any] | None = None, **extra: Any) -> str:
    body = {"task": task, "input": input or {}, **extra}
    response = http.post(f"{base}/api/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def outbox_size(s: Stack) -> int:
    with s.redis() as r:
        return int(r.xlen(f"{s.prefix}webhooks"))


def by_event(deliveries: list[Delivery]) -> dict[str, list[Delivery]]:
    out: dict[str, list[Delivery]] = {}
    for delivery in deliveries:
        out.setdefault(delivery.event_id, []).append(delivery)
    return out


@pytest.mark.slow  # kills a worker
def test_a_callback_arrives_once_per_job_even_when_its_worker_is_killed_mid_delivery(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    # Every first attempt stalls until the test releases it, then answers 200 to nobody: a
    # receiver that wrote the result to its database while the worker died before hearing so.
    def answer(delivery: Delivery) -> int:
        if delivery.headers["X-Stepstream-Attempt"] == "1":
            receiver.release.wait(60)
        return 200

    receiver.answer = answer
    s = make_stack(
        webs=1,
        workers=1,
        STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        STEPSTREAM_WEBHOOK_SECRET=SECRET,
        STEPSTREAM_WEBHOOK_TIMEOUT_SECONDS="8",  # the kill lands well within it
        STEPSTREAM_WEBHOOK_BACKOFF_SECONDS="0.2",
    )
    job_ids = [submit(s.url, "counted", callback_url=receiver.url()) for _ in range(3)]
    for job_id in job_ids:
        wait_state(s.url, job_id, {"completed"})
    # Each job's terminal event is stored and its first delivery is in flight in the worker.
    wait_until(lambda: receiver.stalled() == 3, timeout=15, what="three stalled deliveries")
    (worker,) = s.workers
    worker.kill()
    assert worker.proc is not None and worker.proc.returncode == -signal.SIGKILL
    assert "stepstream.webhooks" not in worker.log()  # it died inside the attempts, silent
    killed_at = time.monotonic()
    receiver.release.set()
    s.add_worker()

    wait_until(
        lambda: (
            {d.job_id for d in receiver.accepted() if d.received_at > killed_at} == set(job_ids)
        ),
        timeout=40,
        what="every job delivered again by the new worker",
    )
    for job_id in job_ids:
        record = get_job(s.url, job_id)
        deliveries = receiver.for_job(job_id)
        # At least once: the receiver acted twice (the answer to the dead worker, the new
        # worker's delivery), with one event id between them: once after de-duplication.
        assert len(deliveries) == 2, [d.headers for d in deliveries]
        (event,) = by_event(deliveries)
        assert event == f"{job_id}:{record['last_event_id']}"
        first, again = deliveries
        assert first.received_at < killed_at < again.received_at
        assert again.headers["X-Stepstream-Attempt"] == "2"
        assert first.raw == again.raw  # the same event, byte for byte
        for delivery in deliveries:
            assert delivery.signed_with(SECRET)
            assert not delivery.signed_with("another secret")
            assert delivery.body["id"] == event
            assert delivery.body["type"] == "job.completed"
            assert delivery.body["job"]["state"] == "completed"
            assert delivery.body["job"]["result"] == record["result"]
            assert delivery.body["job"]["id"] == job_id
            assert "callback_url" not in delivery.body["job"]
    assert len({d.event_id for d in receiver.accepted()}) == 3
    wait_until(lambda: outbox_size(s) == 0, timeout=5, what="an empty outbox")


def test_deliveries_retry_with_backoff_and_give_up_after_the_last_attempt(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    def answer(delivery: Delivery) -> int:
        if delivery.path == "/flaky":
            return 503 if delivery.headers["X-Stepstream-Attempt"] in ("1", "2") else 200
        return 500

    receiver.answer = answer
    timeout, backoff = 1.0, 0.3
    s = make_stack(
        webs=1,
        workers=1,
        STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        STEPSTREAM_WEBHOOK_SECRET=SECRET,
        STEPSTREAM_WEBHOOK_ATTEMPTS="3",
        STEPSTREAM_WEBHOOK_TIMEOUT_SECONDS=str(timeout),
        STEPSTREAM_WEBHOOK_BACKOFF_SECONDS=str(backoff),
    )
    (worker,) = s.workers
    flaky = submit(s.url, "counted", callback_url=receiver.url("/flaky"))
    down = submit(s.url, "counted", {"permanent_failure": True}, callback_url=receiver.url("/down"))
    wait_state(s.url, flaky, {"completed"})
    wait_state(s.url, down, {"failed"})

    wait_until(lambda: len(receiver.accepted()) == 1, timeout=20, what="the flaky delivery")
    tries = receiver.for_job(flaky)
    assert [d.status for d in tries] == [503, 503, 200]
    assert [d.headers["X-Stepstream-Attempt"] for d in tries] == ["1", "2", "3"]
    assert len(by_event(tries)) == 1 and len({d.raw for d in tries}) == 1
    # Attempt n+1 begins no sooner than the timeout plus backoff * 2^(n-1) (jittered down to
    # half) after attempt n began. Seen from the receiver, an attempt that was slow to arrive
    # (a loaded machine: 64 ms once, 0.46 s at twice CI's load) shortens the gap after it: 0.6 s
    # of slack for that, which still tells a backoff from none.
    for n, (before, after) in enumerate(itertools.pairwise(tries), start=1):
        waited = after.received_at - before.received_at
        assert waited >= timeout + backoff * 2 ** (n - 1) / 2 - 0.6

    wait_until(
        lambda: "webhook gave up after 3 attempts" in worker.log(), timeout=20, what="give up"
    )
    gave_up = [line for line in worker.log().splitlines() if "gave up after 3" in line]
    assert len(gave_up) == 1 and down in gave_up[0] and "HTTP 500" in gave_up[0]
    assert "webhook attempt 1 of 3 failed (HTTP 500)" in worker.log()
    # The receiver saw the 200 before the worker read it: the worker's line may come later.
    wait_until(lambda: "webhook delivered (HTTP 200)" in worker.log(), timeout=10, what="log")
    # Given up means gone from the outbox: nothing is left there to retry.
    wait_until(lambda: outbox_size(s) == 0, timeout=10, what="the outbox to empty")
    assert [d.status for d in receiver.for_job(down)] == [500, 500, 500]
    assert receiver.for_job(down)[0].body["type"] == "job.failed"


def test_a_stalled_receiver_holds_no_job_slot_and_in_flight_deliveries_are_bounded(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    def answer(delivery: Delivery) -> int:
        receiver.release.wait(60)
        return 200

    receiver.answer = answer
    s = make_stack(
        webs=1,
        workers=1,
        STEPSTREAM_MAX_JOBS="1",
        STEPSTREAM_WEBHOOK_CONCURRENCY="2",
        STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        STEPSTREAM_WEBHOOK_TIMEOUT_SECONDS="30",
    )
    hooked = [submit(s.url, "counted", callback_url=receiver.url()) for _ in range(3)]
    for job_id in hooked:
        wait_state(s.url, job_id, {"completed"})
    wait_until(lambda: receiver.stalled() == 2, timeout=10, what="two stalled deliveries")
    # The worker's one job slot is free: more jobs run while both deliveries hang.
    plain = [submit(s.url, "counted") for _ in range(3)]
    for job_id in plain:
        assert wait_state(s.url, job_id, TERMINAL, timeout=10)["state"] == "completed"
    assert receiver.stalled() == 2 and len(receiver.all()) == 2  # the third waits for room
    receiver.release.set()
    wait_until(lambda: len(receiver.accepted()) == 3, timeout=10, what="all three delivered")
    assert {d.job_id for d in receiver.accepted()} == set(hooked)


def test_the_deployment_webhook_gets_every_terminal_event(
    make_stack: StackFactory, receiver: Receiver, second_receiver: Receiver
) -> None:
    deployment, callbacks = receiver, second_receiver
    s = make_stack(
        webs=1,
        workers=1,
        STEPSTREAM_WEBHOOK_URL=deployment.url("/all"),  # the operator's URL: no allow-list
        STEPSTREAM_WEBHOOK_SECRET=SECRET,
        STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",  # for the callback_url
        STEPSTREAM_PUBLIC_URL="https://jobs.example.test",
    )
    completed = submit(s.url, "counted")
    failed = submit(s.url, "counted", {"permanent_failure": True})
    retried = submit(s.url, "counted", {"transient_failures": 1})
    waiting = submit(s.url, "counted", delay=600)  # cancelled by the web process
    running = submit(s.url, "counted", {"gate_at": "two"})  # cancelled by the worker
    hooked = submit(s.url, "counted", callback_url=callbacks.url("/mine"))
    assert http.post(f"{s.url}/api/jobs/{waiting}/cancel", timeout=10).status_code == 200
    wait_until(lambda: get_job(s.url, running)["step"] is not None, timeout=10, what="running")
    assert http.post(f"{s.url}/api/jobs/{running}/cancel", timeout=10).status_code == 202
    batch = http.post(
        f"{s.url}/api/batches",
        json={"task": "counted", "inputs": [{}, {}], "callback_url": callbacks.url("/batch")},
        timeout=10,
    )
    assert batch.status_code == 202, batch.text
    parent = batch.json()["id"]
    jobs = [completed, failed, retried, waiting, running, hooked, parent]
    for job_id in jobs:
        wait_state(s.url, job_id, TERMINAL)
    with s.redis() as r:
        r.rpush(gate_key(running), "go")  # if the cancel had not landed, it would complete

    expected = {
        completed: "job.completed",
        failed: "job.failed",
        retried: "job.completed",
        waiting: "job.cancelled",
        running: "job.cancelled",
        hooked: "job.completed",
        parent: "job.completed",
    }
    wait_until(lambda: len(deployment.accepted()) == 9, timeout=20, what="nine events")
    # Every job has ended, so every event is in the outbox; once it is empty, none is left to
    # arrive (a second copy included).
    wait_until(lambda: outbox_size(s) == 0, timeout=10, what="the outbox to empty")
    delivered = deployment.accepted()
    assert len(delivered) == 9  # each once: no event for `retrying`, none twice
    by_job = {d.job_id: d for d in delivered if d.job_id in expected}
    assert {job_id: d.body["type"] for job_id, d in by_job.items()} == expected
    children = [d for d in delivered if d.job_id not in expected]
    assert [d.body["job"]["batch_id"] for d in children] == [parent, parent]
    for delivery in delivered:
        record = get_job(s.url, delivery.job_id)
        assert delivery.signed_with(SECRET)
        assert delivery.event_id == delivery.body["id"]
        assert delivery.event_id == f"{delivery.job_id}:{record['last_event_id']}"
        assert delivery.headers["X-Stepstream-Event"] == delivery.body["type"]
        assert delivery.body["job"]["state"] == record["state"]
        assert delivery.body["at"] == record["finished_at"]
        links = delivery.body["job"]["links"]
        assert links["self"] == f"https://jobs.example.test/api/jobs/{delivery.job_id}"
    error = by_job[failed].body["job"]["error"]
    assert error["type"] == "PermanentError" and error["step"] == "three"
    assert "traceback" not in error
    assert by_job[retried].body["job"]["attempt"] == 2
    assert by_job[parent].body["job"]["result"] == {
        "size": 2,
        "completed": 2,
        "failed": 0,
        "cancelled": 0,
    }

    # The job's own callback gets its event too, with the same event id; the batch's
    # callback is the parent's alone.
    wait_until(lambda: len(callbacks.accepted()) == 2, timeout=10, what="two callbacks")
    wait_until(lambda: outbox_size(s) == 0, timeout=10, what="the outbox to empty")
    mine = {d.path: d for d in callbacks.accepted()}
    assert set(mine) == {"/mine", "/batch"} and len(callbacks.all()) == 2
    assert mine["/mine"].event_id == by_job[hooked].event_id
    assert mine["/mine"].raw == by_job[hooked].raw
    assert mine["/batch"].job_id == parent


@pytest.mark.parametrize(
    ("callback_url", "reason"),
    [
        pytest.param("http://169.254.169.254/latest/meta-data/", "169.254.169.254", id="metadata"),
        pytest.param("http://10.0.0.1/hook", "10.0.0.1", id="private"),
        pytest.param("http://127.0.0.1:8000/hook", "127.0.0.1", id="loopback-not-allowed"),
        pytest.param("http://[::1]/hook", "::1", id="ipv6-loopback"),
        pytest.param("http://[::ffff:10.0.0.1]/hook", "may not reach", id="ipv4-mapped"),
        pytest.param("http://localhost:8000/hook", "localhost", id="a-name-for-loopback"),
        pytest.param("ftp://example.com/hook", "http", id="not-http"),
        pytest.param("example.com/hook", "http", id="no-scheme"),
        pytest.param("http:///hook", "host", id="no-host"),
        pytest.param("https://example.com:99999/", "not a valid URL", id="bad-port"),
        pytest.param("https://user:pw@example.com/", "credentials", id="credentials"),
        pytest.param("https://exa mple.com/", "spaces", id="space"),
        pytest.param(42, "string", id="not-a-string"),
        pytest.param("https://example.com/" + "x" * 2_100, "2048", id="too-long"),
    ],
)
def test_a_callback_url_webhooks_may_not_reach_is_refused_and_nothing_is_stored(
    make_stack_module: Stack, callback_url: object, reason: str
) -> None:
    s = make_stack_module  # no allow-list: internal addresses are refused
    before = store_snapshot(s)
    for path, body in (
        ("/api/jobs", {"task": "counted", "input": {}, "callback_url": callback_url}),
        ("/api/batches", {"task": "counted", "inputs": [{}], "callback_url": callback_url}),
    ):
        response = http.post(f"{s.url}{path}", json=body, timeout=10)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_callback_url"
        assert error["message"].startswith("`callback_url` ")
        assert reason in error["message"]
        assert error["details"]["field"] == "callback_url"
    assert store_snapshot(s) == before


def test_the_address_is_checked_again_at_delivery(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    # The web process allows 127.0.0.1, the worker does not: as if the host's DNS had changed
    # to an internal address between the submit and the delivery. Nothing is sent, and the
    # event is held, not dropped (tests/test_webhook_settings.py delivers one later).
    s = make_stack(webs=1, workers=0, STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1")
    worker = Worker({**s.env, "STEPSTREAM_WEBHOOK_ALLOWED_HOSTS": ""}, s.log_dir).start()
    s.workers.append(worker)
    job_id = submit(s.url, "counted", callback_url=receiver.url())
    wait_state(s.url, job_id, {"completed"})
    wait_until(
        lambda: "webhook held: refused" in worker.log(),
        timeout=10,
        what="the refusal",
    )
    line = next(x for x in worker.log().splitlines() if "webhook held: refused" in x)
    assert job_id in line and "127.0.0.1" in line
    assert receiver.all() == []
    assert outbox_size(s) == 1


def test_a_full_outbox_takes_no_more_events_and_a_worker_says_how_many_it_dropped(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    def answer(delivery: Delivery) -> int:
        receiver.release.wait(60)
        return 200

    receiver.answer = answer
    s = make_stack(
        webs=1,
        workers=1,
        STEPSTREAM_WEBHOOK_OUTBOX_MAXLEN="2",
        STEPSTREAM_WEBHOOK_CONCURRENCY="1",
        STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        STEPSTREAM_WEBHOOK_TIMEOUT_SECONDS="30",
    )
    (worker,) = s.workers
    first = submit(s.url, "counted", callback_url=receiver.url())
    wait_until(lambda: receiver.stalled() == 1, timeout=10, what="the first delivery")
    # The outbox holds the event in flight and one more; the next two do not fit.
    rest = [submit(s.url, "counted", callback_url=receiver.url()) for _ in range(3)]
    for job_id in rest:
        assert wait_state(s.url, job_id, TERMINAL)["state"] == "completed"  # jobs go on

    def reported() -> int:  # one line per sweep that found drops: "1 ...", "1 ..." or "2 ..."
        found = re.findall(r"(\d+) webhook event\(s\) dropped: the outbox was full", worker.log())
        return sum(int(n) for n in found)

    wait_until(lambda: reported() == 2, timeout=10, what="the drops reported")
    receiver.release.set()
    wait_until(lambda: len(receiver.accepted()) == 2, timeout=10, what="the two kept")
    wait_until(lambda: outbox_size(s) == 0, timeout=10, what="the outbox to empty")
    assert [d.job_id for d in receiver.accepted()] == [first, rest[0]]


def test_the_receiver_in_the_docs_verifies_deduplicates_and_stores_results(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    docs = (ROOT / "docs" / "deploy.md").read_text()
    (code,) = [
        b for b in re.findall(r"```python\n(.*?)```", docs, re.S) if "stepstream_webhook" in b
    ]
    (tmp_path / "hook_receiver.py").write_text(code)
    database = tmp_path / "results.db"
    port = free_port()
    env = {
        **os.environ,
        "STEPSTREAM_WEBHOOK_SECRET": SECRET,
        "RESULTS_DB": str(database),
        "PYTHONPATH": str(tmp_path),
    }
    args = ["-m", "uvicorn", "hook_receiver:app", "--host", "127.0.0.1", "--port", str(port)]
    app = Process("hook-receiver", [sys.executable, *args], env, tmp_path).start()
    hook = f"http://127.0.0.1:{port}/hooks/stepstream"

    def rows(sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(database) as db:
            return db.execute(sql).fetchall()

    def up() -> bool:
        assert app.alive, app.log()
        try:
            return http.get(hook, timeout=1).status_code == 405
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=20, what="the receiver")
        s = make_stack(
            webs=1,
            workers=1,
            STEPSTREAM_WEBHOOK_SECRET=SECRET,
            STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        )
        with Client(s.url) as client:  # the Python client passes callback_url along
            ok = client.submit("counted", callback_url=hook).id
        bad = submit(s.url, "counted", {"permanent_failure": True}, callback_url=hook)
        wait_until(
            lambda: len(rows("SELECT * FROM job_results")) == 2, timeout=20, what="two results"
        )
        results = {
            job_id: (state, json.loads(body))
            for job_id, state, body in rows("SELECT job_id, state, body FROM job_results")
        }
        assert results[ok] == ("completed", get_job(s.url, ok)["result"])
        assert results[bad][0] == "failed"
        assert results[bad][1]["type"] == "PermanentError"
        # The receiver stores a result before it answers; the worker logs the delivery after.
        wait_until(
            lambda: "webhook delivered (HTTP 204)" in s.workers[0].log(),
            timeout=10,
            what="the worker to log the delivery",
        )

        # A forged body, a replayed (old) signature: refused. A redelivery: changes nothing.
        body = json.dumps(
            {"id": f"{ok}:1-0", "job": {"id": ok, "state": "failed", "result": None, "error": {}}}
        ).encode()

        def post(secret: str, timestamp: int) -> int:
            headers = {
                "X-Stepstream-Timestamp": str(timestamp),
                "X-Stepstream-Signature": webhooks.sign(secret, timestamp, body),
            }
            return http.post(hook, content=body, headers=headers, timeout=10).status_code

        assert post("not the secret", int(time.time())) == 400
        assert post(SECRET, int(time.time()) - 3_600) == 400
        assert rows(f"SELECT state FROM job_results WHERE job_id = '{ok}'") == [("completed",)]
        assert post(SECRET, int(time.time())) == 204
        assert post(SECRET, int(time.time())) == 204
        assert len(rows("SELECT * FROM webhook_events")) == 3
    finally:
        app.stop()
