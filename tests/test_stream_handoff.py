"""A stream's body is sent past the middleware stack (server/handoff.py); its response is still
the whole stack's: the security headers and the CORS answer on it, its frames counted, the
terminal frame sent once and the stream ended after it. Production mode, one page origin
allowed, the key itself and a stream token."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.processes import wait_until
from tests.support.sse import StreamReader
from tests.support.tasks import gate_key
from tests.test_auth import ALICE, PRODUCTION, submit_as

PAGE = "https://page.example"
SECURITY = {
    "content-security-policy",
    "x-content-type-options",
    "referrer-policy",
    "x-frame-options",
}


@pytest.fixture(scope="module")
def web(module_stacks: StackFactory) -> Stack:
    return module_stacks(**PRODUCTION, STEPSTREAM_CORS_ORIGINS=PAGE)


def token_for(web: Stack, job_id: str | None) -> str:
    path = "/api/events/token" if job_id is None else f"/api/jobs/{job_id}/token"
    response = http.post(f"{web.url}{path}", headers=ALICE, timeout=10)
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


def stream_head(url: str, headers: dict[str, str]) -> httpx.Headers:
    """The head of a stream's response (the stream is then closed)."""
    with http.stream("GET", url, headers=headers, timeout=10) as response:
        assert response.status_code == 200, response.read()
        return response.headers


@pytest.mark.parametrize("credential", ["key", "token"])
@pytest.mark.parametrize("route", ["job", "firehose"])
def test_a_stream_carries_the_stacks_headers(web: Stack, route: str, credential: str) -> None:
    """What the stack adds to a response start: the same on a stream as on any answer."""
    job = submit_as(web, ALICE, {"events": 1}, task="gated")
    path = f"/api/jobs/{job['id']}/events" if route == "job" else "/api/events"
    params = ""
    headers = {"Origin": PAGE, "Accept": "text/event-stream"}
    if credential == "key":
        headers.update(ALICE)
    else:
        params = f"?token={token_for(web, job['id'] if route == 'job' else None)}"
    record = http.get(f"{web.url}/api/jobs/{job['id']}", headers={**ALICE, "Origin": PAGE})
    stream = stream_head(f"{web.url}{path}{params}", headers)

    assert stream["content-type"].startswith("text/event-stream")
    for name in SECURITY:
        assert stream[name] == record.headers[name], name
    assert stream["access-control-allow-origin"] == PAGE
    exposed = record.headers["access-control-expose-headers"]
    assert stream["access-control-expose-headers"] == exposed
    web.redis().rpush(gate_key(job["id"]), "go")


def test_an_error_answer_to_a_stream_request_carries_them_too(web: Stack) -> None:
    """A 401 or 404 on the stream routes is answered inside the stack: headers and CORS."""
    job = submit_as(web, ALICE, {"events": 1}, task="gated")
    for url, headers, status in [
        (f"/api/jobs/{job['id']}/events", {}, 401),
        ("/api/jobs/no-such-job/events", ALICE, 404),
    ]:
        answer = http.get(f"{web.url}{url}", headers={**headers, "Origin": PAGE}, timeout=10)
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]["code"]
        assert set(answer.headers) >= SECURITY, answer.headers
        assert answer.headers["access-control-allow-origin"] == PAGE
    web.redis().rpush(gate_key(job["id"]), "go")


@pytest.mark.parametrize("credential", ["key", "token"])
def test_the_terminal_frame_comes_once_and_ends_the_stream(web: Stack, credential: str) -> None:
    """Live viewers of a job see each of its events once, `completed` last, and then the
    server ends the stream; the frames are counted in stepstream_sse_events_delivered."""
    job = submit_as(web, ALICE, {"events": 3}, task="gated")
    url = f"{web.url}/api/jobs/{job['id']}/events"
    headers = dict(ALICE)
    if credential == "token":
        url += f"?token={token_for(web, job['id'])}"
        headers = {}
    before = delivered(web)
    readers = [StreamReader(url, headers, timeout=30).start() for _ in range(3)]
    try:
        for reader in readers:
            reader.wait_for(lambda events: bool(events), timeout=20)  # the snapshot is in
        for _ in range(3):
            web.redis().rpush(gate_key(job["id"]), "go")
        logs = [reader.wait_closed(timeout=30) for reader in readers]
    finally:
        for reader in readers:
            reader.close()
    for events in logs:
        types = [event.type for event in events]
        assert types.count("completed") == 1, types
        assert types[-1] == "completed", types
        ids = [event.id for event in events if event.id is not None]
        assert len(ids) == len(set(ids)), ids
        assert [e.data["current"] for e in events if e.type == "progress"] == [1, 2, 3], types
    sent = sum(len(events) for events in logs)
    wait_until(
        lambda: delivered(web) - before == sent,
        timeout=10,
        what=f"{sent} frames counted in stepstream_sse_events_delivered",
    )
    # No stream is left holding a slot.
    wait_until(
        lambda: http.get(f"{web.url}/api/stats", headers=ALICE).json()["streams_open"] == 0,
        timeout=10,
        what="no stream open",
    )


def delivered(web: Stack) -> float:
    text = http.get(f"{web.url}/metrics", headers=ALICE, timeout=10).text
    for line in text.splitlines():
        if line.startswith('stepstream_sse_events_delivered_total{stream="job"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
