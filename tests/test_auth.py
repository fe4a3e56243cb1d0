"""Owners, API keys, stream tokens, limits and hostile input, in production mode."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from stepstream.tasks.keyspace import Keys
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import DOC
from tests.support.clock import SetClock, add_clocked_web
from tests.support.processes import ROOT, free_port, stack_env, wait_until
from tests.support.sse import StreamReader, read_stream
from tests.test_jobs import store_snapshot

ALICE = {"Authorization": "Bearer key-alice-0123456789"}
BOB = {"Authorization": "Bearer key-bob-0123456789"}
PRODUCTION = {
    "STEPSTREAM_MODE": "production",
    "STEPSTREAM_SECRET": "s3cret-for-tests-only-0123456789abcdef",
    "STEPSTREAM_API_KEYS": "alice:key-alice-0123456789,bob:key-bob-0123456789",
}


@pytest.fixture(scope="module")
def prod(module_stacks: StackFactory) -> Stack:
    return module_stacks(webs=1, workers=1, **PRODUCTION)


def submit_as(
    s: Stack,
    who: dict[str, str],
    input: dict[str, object] | None = None,
    task: str = "analyze_document",
    **fields: object,
) -> dict:
    response = http.post(
        f"{s.url}/api/jobs",
        json={"task": task, "input": input or {"text": DOC}, **fields},
        headers=who,
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def finish(s: Stack, job_id: str, who: dict[str, str]) -> None:
    deadline = time.monotonic() + 30
    while http.get(f"{s.url}/api/jobs/{job_id}", headers=who).json()["state"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_every_api_call_needs_credentials(prod: Stack) -> None:
    for method, path in [
        ("GET", "/api/jobs"),
        ("POST", "/api/jobs"),
        ("GET", "/api/tasks"),
        ("GET", "/api/events"),
        ("GET", "/api/jobs/x/events"),
        # It lists every task and input schema that /api/tasks protects.
        ("GET", "/openapi.json"),
    ]:
        response = http.request(method, f"{prod.url}{path}")
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = http.get(f"{prod.url}/api/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert http.get(f"{prod.url}/healthz").status_code == 200


def test_an_owner_sees_only_their_jobs(prod: Stack) -> None:
    a = submit_as(prod, ALICE)
    b = submit_as(prod, BOB)
    assert a["owner"] == "alice" and b["owner"] == "bob"
    for path in ["", "/events", "/token"]:
        method = "POST" if path == "/token" else "GET"
        response = http.request(method, f"{prod.url}/api/jobs/{b['id']}{path}", headers=ALICE)
        assert response.status_code == 404, path  # not 403: ids cannot be probed
    for action in ["cancel", "retry"]:
        response = http.post(f"{prod.url}/api/jobs/{b['id']}/{action}", headers=ALICE)
        assert response.status_code == 404
    listed = http.get(f"{prod.url}/api/jobs", headers=ALICE).json()["jobs"]
    assert {j["owner"] for j in listed} == {"alice"}
    assert a["id"] in {j["id"] for j in listed}


def test_the_firehose_of_one_owner_never_carries_another_s_events(prod: Stack) -> None:
    live = StreamReader(f"{prod.url}/api/events", ALICE).start()
    # Attached before either job exists: otherwise it would carry none of Bob's events anyway.
    wait_until(
        lambda: http.get(f"{prod.url}/api/stats", headers=ALICE).json()["streams_open"] == 1,
        timeout=10,
        what="the firehose attached",
    )
    mine = submit_as(prod, ALICE)
    theirs = submit_as(prod, BOB)
    finish(prod, theirs["id"], BOB)
    finish(prod, mine["id"], ALICE)
    live.wait_for(lambda evs: any(e.type == "completed" for e in evs))
    live.close()
    seen = {e.data["job_id"] for e in live.events}
    assert mine["id"] in seen and theirs["id"] not in seen, (mine["id"], theirs["id"], seen)
    # Alice's jobs from the tests before may still be running, and show: hers, so they may.
    # Every job on her firehose must be one she can open (another owner's is a 404 to her).
    opened = {
        job: http.get(f"{prod.url}/api/jobs/{job}", headers=ALICE).status_code for job in seen
    }
    assert set(opened.values()) == {200}, opened
    # Replay from the start of the firehose: still only alice's.
    token = http.post(f"{prod.url}/api/events/token", headers=ALICE).json()["token"]
    reader = StreamReader(f"{prod.url}/api/events?after=0&token={token}").start()
    reader.wait_for(lambda evs: any(e.data.get("job_id") == mine["id"] for e in evs))
    reader.close()
    assert theirs["id"] not in {e.data.get("job_id") for e in reader.events}


def test_a_job_token_opens_one_job_s_stream_and_record_and_nothing_else(prod: Stack) -> None:
    job = submit_as(prod, ALICE)
    finish(prod, job["id"], ALICE)
    token = job["stream_token"]
    status, events = read_stream(f"{prod.url}/api/jobs/{job['id']}/events?after=0&token={token}")
    assert status == 200 and events[-1].type == "completed"
    other = submit_as(prod, ALICE)
    wrong_job = http.get(f"{prod.url}/api/jobs/{other['id']}/events?token={token}")
    assert wrong_job.status_code == 404
    assert http.get(f"{prod.url}/api/events?token={token}").status_code == 401
    # It reads its job's record, not another's, and writes and lists nothing.
    record = http.get(f"{prod.url}/api/jobs/{job['id']}?token={token}")
    assert record.status_code == 200 and record.json()["state"] == "completed"
    assert http.get(f"{prod.url}/api/jobs/{other['id']}?token={token}").status_code == 404
    assert http.get(f"{prod.url}/api/jobs?token={token}").status_code == 401
    for action in ["cancel", "retry", "token"]:
        refused = http.post(f"{prod.url}/api/jobs/{job['id']}/{action}?token={token}")
        assert refused.status_code == 401, action
    payload, signature = token.split(".")
    tampered = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "." + signature
    refused = http.get(f"{prod.url}/api/jobs/{job['id']}/events?token={tampered}")
    assert refused.status_code == 401 and b"data:" not in refused.content


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_a_token_is_accepted_only_as_it_was_minted(prod: Stack) -> None:
    """Padding, or a last character whose unused bits differ, decode to the same bytes with a
    lenient base64 decoder: each such spelling is refused, the minted one still works."""
    job = submit_as(prod, ALICE)
    token = job["stream_token"]
    payload, signature = token.split(".")
    assert len(signature) % 4 == 3  # 32 bytes: the last character carries 2 unused bits
    last = B64URL.index(signature[-1])
    same_bytes = signature[:-1] + B64URL[last ^ 1]
    assert base64.urlsafe_b64decode(same_bytes + "=") == base64.urlsafe_b64decode(signature + "=")
    for variant in [
        token + "==",
        token + "=",
        f"{payload}=.{signature}",
        f"{payload}.{same_bytes}",
        f"{payload}.{signature}\n",
    ]:
        for path in [f"/api/jobs/{job['id']}", f"/api/jobs/{job['id']}/events"]:
            refused = http.get(f"{prod.url}{path}", params={"token": variant}, timeout=10)
            assert refused.status_code == 401, (variant, path, refused.text)
            assert refused.json()["error"]["code"] == "unauthorized"
    assert http.get(f"{prod.url}/api/jobs/{job['id']}", params={"token": token}).status_code == 200


def test_a_browser_without_a_token_is_told_to_get_a_stream_token(prod: Stack) -> None:
    for path in ["/api/jobs/x/events", "/api/events", "/api/jobs/x"]:
        refused = http.get(f"{prod.url}{path}", headers={"Accept": "text/event-stream"})
        assert refused.status_code == 401
        error = refused.json()["error"]
        assert error["code"] == "unauthorized"
        assert "stream token in ?token=" in error["message"], error
        assert "POST /api/jobs/{id}/token" in error["message"]
    # Where a stream token cannot serve, the key is what is asked for.
    listed = http.get(f"{prod.url}/api/jobs").json()["error"]["message"]
    assert "API key" in listed and "stream token" not in listed


def test_an_owner_s_stats_name_no_worker_machine(prod: Stack) -> None:
    wait_until(
        lambda: http.get(f"{prod.url}/api/stats", headers=ALICE).json()["workers_alive"] == 1,
        timeout=10,
        what="a worker's heartbeat",
    )
    (worker,) = http.get(f"{prod.url}/api/stats", headers=ALICE).json()["workers"]
    assert "host" not in worker and "pid" not in worker, worker
    (process,) = prod.workers
    assert process.proc is not None and str(process.proc.pid) not in worker["id"], worker
    assert socket.gethostname() not in worker["id"], worker
    assert {"started_at", "last_seen", "max_jobs", "running"} <= set(worker)
    # The same worker keeps the same id, for a dashboard that follows it.
    again = http.get(f"{prod.url}/api/stats", headers=BOB).json()["workers"]
    assert [w["id"] for w in again] == [worker["id"]]


def test_token_expiry_ends_the_stream_with_a_distinct_event(
    make_stack: StackFactory,
) -> None:
    # Tokens live 5 s: the fresh one below must still be valid when it connects, which at load
    # 10 took longer than 1.5 s. The job (7 steps of 2 s) still outlasts the first one.
    s = make_stack(webs=1, workers=1, STEPSTREAM_TOKEN_TTL_SECONDS="5", **PRODUCTION)
    job = submit_as(s, ALICE, {"text": DOC, "pace": 2})
    expires_at = token_claims(job["stream_token"])["e"]
    # The job is paced to outlast the token: the stream ends with the expiry, not the job.
    status, events = read_stream(
        f"{s.url}/api/jobs/{job['id']}/events?token={job['stream_token']}", timeout=20
    )
    assert status == 200
    assert events[-1].type == "token_expired"
    # It carries no id of its own: the client's last event id stays that of the event before.
    assert events[-1].id == events[-2].id
    assert time.time() >= expires_at, "the stream ended before its token expired"
    expired = http.get(f"{s.url}/api/jobs/{job['id']}/events?token={job['stream_token']}")
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "token_expired"
    fresh = http.post(f"{s.url}/api/jobs/{job['id']}/token", headers=ALICE).json()["token"]
    assert http.get(f"{s.url}/api/jobs/{job['id']}?", headers=ALICE).status_code == 200
    reader = StreamReader(f"{s.url}/api/jobs/{job['id']}/events?token={fresh}").start()
    reader.wait_for(lambda evs: len(evs) >= 1)
    reader.close()
    assert reader.events[0].type == "snapshot"


def token_claims(token: str) -> dict[str, Any]:
    """What a stream token says (its payload is readable; its signature is what counts)."""
    payload = token.split(".")[0]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def test_production_without_a_secret_refuses_to_start() -> None:
    env = stack_env("redis://127.0.0.1:1/0", "nosecret:", STEPSTREAM_MODE="production")
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "stepstream.server.app:app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "needs STEPSTREAM_SECRET" in result.stderr


def test_a_non_loopback_bind_defaults_to_production() -> None:
    env = stack_env("redis://127.0.0.1:1/0", "auto:")
    args = [sys.executable, "-m", "uvicorn", "stepstream.server.app:app", "--host", "0.0.0.0"]
    result = subprocess.run(
        [*args, "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "production mode" in result.stderr


def test_a_production_start_without_keys_says_how_to_add_one(
    make_stack: StackFactory, prod: Stack
) -> None:
    keyless = {name: value for name, value in PRODUCTION.items() if name != "STEPSTREAM_API_KEYS"}
    s = make_stack(webs=1, workers=0, **keyless)
    log = s.webs[0].log()
    assert "no API key" in log and "stepstream keys create OWNER" in log, log
    assert "STEPSTREAM_API_KEYS=owner:key" in log
    # With a key configured there is nothing to say.
    assert "no API key" not in prod.webs[0].log()


def test_keys_created_on_the_command_line_work(prod: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stepstream.apikey_command", "create", "carol"],
        cwd=ROOT,
        env=prod.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("sk_")
    carol = {"Authorization": f"Bearer {key}"}
    assert submit_as(prod, carol)["owner"] == "carol"
    stored = prod.redis().hgetall(f"{prod.prefix}apikeys")
    assert key not in json.dumps(stored), "keys are stored hashed"


def test_over_limit_requests_get_429_413_422_and_change_nothing(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    s = make_stack(
        webs=0,
        workers=0,
        STEPSTREAM_SUBMISSIONS_PER_SECOND="3",
        STEPSTREAM_MAX_UNFINISHED_PER_OWNER="5",
        STEPSTREAM_MAX_STREAMS_PER_OWNER="2",
        STEPSTREAM_MAX_INPUT_DEPTH="5",
        STEPSTREAM_MAX_STRING_LENGTH="1000",
        **PRODUCTION,
    )
    # The rate limit's window is the second on this clock, which the test sets.
    clock = SetClock(tmp_path / "clock")
    add_clocked_web(s, clock)

    def snapshot() -> dict[str, str]:
        return store_snapshot(s)

    # Depth and string length: 422 naming the limit.
    deep: dict[str, object] = {"text": "x"}
    for _ in range(6):
        deep = {"nested": deep}
    before = snapshot()
    too_deep = http.post(
        f"{s.url}/api/jobs", json={"task": "analyze_document", "input": deep}, headers=ALICE
    )
    assert too_deep.status_code == 422 and too_deep.json()["error"]["code"] == "input_too_deep"
    too_long = http.post(
        f"{s.url}/api/jobs",
        json={"task": "analyze_document", "input": {"text": "x" * 1001}},
        headers=ALICE,
    )
    assert too_long.status_code == 422 and too_long.json()["error"]["code"] == "string_too_long"
    assert snapshot() == before

    # Submissions per second: the fourth in one window of the counter is 429 with Retry-After.
    keys = Keys(s.prefix)
    r = s.redis()

    def submit_as_bob(_: int) -> httpx.Response:
        return http.post(
            f"{s.url}/api/jobs",
            json={"task": "analyze_document", "input": {"text": DOC}},
            headers=BOB,
            timeout=30,
        )

    second = int(time.time()) + 3600  # a window no earlier request counted in
    clock.set(second + 0.5)  # one window for all four, however long they take
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(submit_as_bob, range(4)))
    assert r.get(keys.submissions("bob", second)) == "4"  # the server counted all four there
    # Sent at once, any one of the four may be the one past the limit.
    assert sorted(c.status_code for c in codes) == [202, 202, 202, 429]
    (refused,) = [c for c in codes if c.status_code == 429]
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limited"
    # Refused past the rate with an Idempotency-Key (the create script counts and refuses):
    # nothing changes but the count, and the key is free for the client's retry.
    before = snapshot()  # (the counters are housekeeping: left out)
    keyed = {**BOB, "Idempotency-Key": "over-the-rate"}
    body = {"task": "analyze_document", "input": {"text": DOC}}
    again = http.post(f"{s.url}/api/jobs", json=body, headers=keyed)
    assert again.status_code == 429 and again.json()["error"]["code"] == "rate_limited"
    assert snapshot() == before
    assert r.get(keys.submissions("bob", second)) == "5"
    clock.set(second - 10 + 0.5)  # another window, never counted in
    retried = http.post(f"{s.url}/api/jobs", json=body, headers=keyed)
    assert retried.status_code == 202, retried.text
    assert r.exists(keys.job(retried.json()["id"]))

    # Unfinished jobs per owner (no worker runs them): the sixth is refused.
    # Two a window, under the rate limit: only the unfinished limit can refuse.
    for window in range(1, 4):
        clock.set(second + window)
        submit_as(s, ALICE)
        if window < 3:
            submit_as(s, ALICE)
    clock.set(second + 4)
    before = snapshot()
    refused = http.post(
        f"{s.url}/api/jobs",
        json={"task": "analyze_document", "input": {"text": DOC}},
        headers=ALICE,
    )
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_unfinished_jobs"
    assert snapshot() == before

    # Streams per owner (per web process).
    jobs = http.get(f"{s.url}/api/jobs", headers=ALICE).json()["jobs"]
    readers = [
        StreamReader(f"{s.url}/api/jobs/{jobs[i]['id']}/events", ALICE).start() for i in range(2)
    ]
    for reader in readers:
        reader.wait_for(lambda evs: len(evs) >= 1)
    third = http.get(f"{s.url}/api/jobs/{jobs[2]['id']}/events", headers=ALICE)
    assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_streams"
    for reader in readers:
        reader.close()


def test_user_text_cannot_inject_sse_fields(stack: Stack) -> None:
    hostile = "line one\r\nevent: completed\r\ndata: {}\n\nid: 9999999999999-0\r\r"
    job = http.post(
        f"{stack.url}/api/jobs",
        json={"task": "analyze_document", "input": {"text": hostile + " More. ", "title": hostile}},
    ).json()
    status, events = read_stream(f"{stack.url}/api/jobs/{job['id']}/events?after=0")
    assert status == 200
    assert [e.type for e in events].count("completed") == 1 and events[-1].type == "completed"
    assert events[0].data["input"]["title"] == hostile
    assert all(e.id is None or (e.id.count("-") == 1 and e.id != "9999999999999-0") for e in events)


def test_dashboard_and_api_send_security_headers_and_no_cors(stack: Stack) -> None:
    page = http.get(f"{stack.url}/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    preflight = httpx.options(
        f"{stack.url}/api/jobs",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_the_openapi_document_needs_a_key_in_production_unless_published(
    prod: Stack, make_stack: StackFactory
) -> None:
    with_key = http.get(f"{prod.url}/openapi.json", headers=ALICE, timeout=10)
    assert with_key.status_code == 200 and "analyze_document" in with_key.text
    published = make_stack(**PRODUCTION, STEPSTREAM_PUBLIC_OPENAPI="true")
    assert http.get(f"{published.url}/openapi.json", timeout=10).status_code == 200
