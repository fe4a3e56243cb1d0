"""Operations with real processes: the old failure alert settings, worker heartbeats, JSON logs,
doctor."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from stepstream.tasks.keyspace import Keys
from tests.conftest import StackFactory
from tests.support import http
from tests.support.api import submit, wait_state
from tests.support.processes import ROOT, Web, free_port, wait_until
from tests.support.receiver import Receiver
from tests.support.tasks import gate_key

TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(lambda d: 503 if d.headers["X-Stepstream-Attempt"] == "1" else 200)
    yield server.start()
    server.stop()


def stats(base: str) -> dict[str, Any]:
    response = http.get(f"{base}/api/stats", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_the_old_failure_alert_settings_are_a_deployment_webhook_for_failed_jobs(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    # STEPSTREAM_ALERT_WEBHOOK_* (deprecated) still work: the durable webhook, `failed` only.
    s = make_stack(
        webs=1,
        workers=1,
        STEPSTREAM_ALERT_WEBHOOK_URL=receiver.url(),
        STEPSTREAM_ALERT_WEBHOOK_BACKOFF_SECONDS="0.1",
        STEPSTREAM_ALERT_WEBHOOK_TIMEOUT_SECONDS="1",
        STEPSTREAM_PUBLIC_URL="https://jobs.example.test",
        STEPSTREAM_ALERT_WEBHOOK_SECRET="hook-secret",
    )
    failing = [
        submit(s.url, "counted", {"permanent_failure": True}),
        submit(s.url, "counted", {"permanent_failure": True, "fail_at": "one"}),
    ]
    retried = submit(s.url, "counted", {"transient_failures": 1})
    for job in failing:
        wait_state(s.url, job["id"], {"failed"})
    assert wait_state(s.url, retried["id"], TERMINAL)["state"] == "completed"

    wait_until(lambda: len(receiver.accepted()) == 2, timeout=20, what="two alerts")
    # Every job has ended, so every alert is in the outbox; once it is empty nothing else
    # can arrive: no duplicate, nothing for the completed job.
    with s.redis() as r:
        outbox = Keys(s.prefix).webhook_outbox
        wait_until(lambda: r.xlen(outbox) == 0, timeout=10, what="the outbox to empty")
    accepted = receiver.accepted()
    assert sorted(a.job_id for a in accepted) == sorted(j["id"] for j in failing)
    assert retried["id"] not in {d.job_id for d in receiver.all()}
    # Each first delivery met a 503 and was retried: four requests, two alerts.
    assert len(receiver.all()) == 4

    by_id = {a.job_id: a.body for a in accepted}
    first = by_id[failing[0]["id"]]
    assert first["type"] == "job.failed"
    job = first["job"]
    assert job["task"] == "counted" and job["attempt"] == 1
    assert job["error"]["type"] == "PermanentError"
    assert job["error"]["message"] == "refused at three"
    assert job["error"]["step"] == "three"
    assert "traceback" not in job["error"]
    assert job["links"]["self"] == f"https://jobs.example.test/api/jobs/{job['id']}"
    assert by_id[failing[1]["id"]]["job"]["error"]["step"] == "one"
    for delivery in receiver.all():
        assert delivery.headers["Content-Type"] == "application/json"
        assert delivery.signed_with("hook-secret")


def test_a_webhook_that_is_down_neither_blocks_nor_crashes_the_worker(
    make_stack: StackFactory,
) -> None:
    # A receiver that takes connections and never answers: each attempt hangs for its timeout.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    hole.settimeout(20)
    try:
        s = make_stack(
            webs=1,
            workers=1,
            STEPSTREAM_WEBHOOK_URL=f"http://127.0.0.1:{hole.getsockname()[1]}/never-answers",
            STEPSTREAM_WEBHOOK_ATTEMPTS="2",
            STEPSTREAM_WEBHOOK_TIMEOUT_SECONDS="5",
            STEPSTREAM_WEBHOOK_BACKOFF_SECONDS="0.2",
        )
        (worker,) = s.workers
        failed = submit(s.url, "counted", {"permanent_failure": True, "fail_at": "one"})
        wait_state(s.url, failed["id"], {"failed"})
        held, _ = hole.accept()  # a first attempt is connected, waiting for its answer
        # The next job runs from start to end while that attempt hangs. (That it ends within
        # the attempt's 5 s is the one time bound here, generous for a job of five no-ops.)
        ok = submit(s.url, "counted")
        assert wait_state(s.url, ok["id"], TERMINAL, timeout=30)["state"] == "completed"
        assert "webhook attempt 1 of 2 failed" not in worker.log(), "it was not still hanging"
        held.close()
    finally:
        hole.close()  # from here every attempt fails at once
    wait_until(
        lambda: worker.log().count("webhook gave up after 2 attempts") == 2,
        timeout=30,
        what="both events given up",
    )
    assert worker.alive
    again = submit(s.url, "counted")
    assert wait_state(s.url, again["id"], TERMINAL, timeout=10)["state"] == "completed"


def test_worker_heartbeats_show_running_jobs_and_vanish_when_a_worker_stops(
    make_stack: StackFactory,
) -> None:
    interval = 0.5
    s = make_stack(webs=1, workers=2, STEPSTREAM_WORKER_HEARTBEAT_SECONDS=str(interval))
    wait_until(lambda: stats(s.url)["workers_alive"] == 2, timeout=10, what="two workers")

    job = submit(s.url, "counted", {"gate_at": "two"})

    def running() -> list[dict[str, Any]]:
        return [j for w in stats(s.url)["workers"] for j in w["running"]]

    wait_until(
        lambda: any(j["job_id"] == job["id"] for j in running()), timeout=10, what="job in a beat"
    )
    (shown,) = running()
    assert shown["task"] == "counted" and shown["state"] == "running"
    assert shown["step"]["name"] == "two" and shown["attempt"] == 1
    workers = stats(s.url)["workers"]
    assert {w["pid"] for w in workers} == {w.proc.pid for w in s.workers if w.proc}
    with s.redis() as r:
        r.rpush(gate_key(job["id"]), "go")
    wait_state(s.url, job["id"], {"completed"})
    wait_until(lambda: running() == [], timeout=5, what="no running job")

    # A killed worker cannot say goodbye: its heartbeat expires after three missed beats.
    killed, stopped = s.workers
    (killed_id,) = [w["id"] for w in workers if killed.proc and w["pid"] == killed.proc.pid]
    killed.kill()
    # Its last beat is the one that stays, and it lives three beats at most: the bound is the
    # key's own TTL, not how soon a loaded machine gets round to noticing.
    ttl_ms = s.redis().pttl(Keys(s.prefix).worker(killed_id))
    assert 0 < ttl_ms <= 3 * interval * 1000
    wait_until(lambda: stats(s.url)["workers_alive"] == 1, timeout=10, what="expiry")
    # A worker stopped with SIGTERM removes its heartbeat on the way out.
    stopped.stop()
    assert stats(s.url)["workers_alive"] == 0


def test_a_worker_writes_json_lines_with_the_job_id_on_every_line_about_a_job(
    make_stack: StackFactory,
) -> None:
    s = make_stack(webs=1, workers=1, STEPSTREAM_LOG_FORMAT="json")
    ok = submit(s.url, "counted")
    bad = submit(s.url, "counted", {"permanent_failure": True})
    wait_state(s.url, ok["id"], {"completed"})
    wait_state(s.url, bad["id"], {"failed"})
    (worker,) = s.workers
    (web,) = s.webs
    worker.stop()
    web.stop()

    def lines(text: str) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for raw in text.splitlines():
            if raw.strip():
                parsed = json.loads(raw)  # every line is one JSON object
                assert isinstance(parsed, dict) and {"ts", "level", "msg"} <= set(parsed)
                out.append((raw, parsed))
        return out

    worker_lines = lines(worker.log())
    for job in (ok, bad):
        about = [parsed for raw, parsed in worker_lines if job["id"] in raw]
        assert len(about) >= 3, about  # arq's pick-up, started, the end, arq's finish line
        assert all(p.get("job_id") == job["id"] for p in about), about
    messages = {(p.get("job_id"), p["msg"]): p for _, p in worker_lines}
    started = messages[(ok["id"], "job started: attempt 1 of 3")]
    assert started["task"] == "counted" and started["attempt"] == 1
    assert started["process"] == "worker"
    done = messages[(ok["id"], "job completed")]
    assert done["duration_s"] >= 0
    failed = messages[(bad["id"], "job failed: refused at three")]
    assert failed["level"] == "warning" and failed["step"] == "three" and failed["attempt"] == 1

    web_lines = lines(web.log())
    submitted = [p for _, p in web_lines if p["msg"] == "job submitted"]
    assert {p["job_id"] for p in submitted} == {ok["id"], bad["id"]}
    assert all(p["process"] == "web" and p["task"] == "counted" for p in submitted)


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepstream.doctor", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_doctor_says_all_is_well_or_what_is_wrong(make_stack: StackFactory) -> None:
    s = make_stack(webs=1, workers=1)
    wait_until(lambda: stats(s.url)["workers_alive"] == 1, timeout=10, what="a heartbeat")
    good = doctor(s.env, "--url", s.url)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "Redis reachable" in good.stdout
    assert "1 worker(s) alive" in good.stdout
    assert f"web process at {s.url} is ready" in good.stdout

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    bad = doctor(
        {**s.env, "REDIS_URL": nowhere, "STEPSTREAM_LEASE_SECONDS": "soon"},
        "--url",
        f"http://127.0.0.1:{free_port()}",
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "STEPSTREAM_LEASE_SECONDS is not valid" in bad.stdout
    good_settings = doctor({**s.env, "REDIS_URL": nowhere})
    assert good_settings.returncode == 1
    assert "cannot reach Redis at" in good_settings.stdout
    assert "cannot reach the web process" in bad.stdout


def test_a_task_s_error_cannot_forge_a_text_log_line(make_stack: StackFactory) -> None:
    """A newline in an error message would start a line that reads as the server's own."""
    s = make_stack(webs=1, workers=1, STEPSTREAM_LOG_FORMAT="text")
    forged = "12:00:00 INFO stepstream.worker: job completed [job_id=forged]"
    message = f"no\n{forged}\r\x1b[2Kcleared"
    job = submit(s.url, "refuses", {"message": message})
    wait_state(s.url, job["id"], {"failed"})
    (worker,) = s.workers
    wait_until(lambda: "job failed" in worker.log(), timeout=10, what="the failure's log line")
    worker.stop()
    lines = worker.log().splitlines()
    failed = [line for line in lines if "job failed" in line]
    assert len(failed) == 1, failed
    (line,) = failed
    assert line.endswith("]") and f"job_id={job['id']}" in line, line
    assert "no\\n12:00:00 INFO" in line and "\\r\\x1b[2Kcleared" in line, line
    # No line starts as the forged one: it stayed inside the real line.
    assert not any(text.startswith(forged) for text in lines), lines
    assert not any("\x1b" in text or "\r" in text for text in lines)


def test_stream_tokens_never_reach_the_access_log(make_stack: StackFactory) -> None:
    s = make_stack(webs=0, workers=1)
    web = Web(s.env, s.log_dir)
    web.args[web.args.index("--log-level") + 1] = "info"  # uvicorn's access lines on
    s.webs.append(web.start())
    job = submit(s.url, "counted")
    wait_state(s.url, job["id"], {"completed"})
    token = job["stream_token"]
    events = f"{s.url}/api/jobs/{job['id']}/events?after=0"
    # The parameter's name percent-encoded is still the token to the server...
    for name in ["token", "%74oken", "%74%6F%6B%65%6E"]:
        streamed = http.get(f"{events}&{name}={token}", timeout=10)
        assert streamed.status_code == 200 and "event: completed" in streamed.text
        refused = http.get(f"{events}&{name}={token[:-4]}", timeout=10)
        assert refused.status_code == 401, (name, refused.text)
    web.stop()
    log = web.log()
    access = [line for line in log.splitlines() if "/events?" in line]
    # ...and to the redaction.
    for name in ["token", "%74oken", "%74%6F%6B%65%6E"]:
        assert sum(f"&{name}=[redacted]" in line for line in access) == 2, (name, access)
    assert token not in log and token[:-4] not in log
