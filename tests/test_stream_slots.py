"""Stream slots come back however a stream ends (issue 14, finding 1 and after).

Streams are opened and closed every way a client can: GET to the end, HEAD, a disconnect
before the headers are read, after them, mid-backlog and mid-live, a token's expiry, a slow
consumer cut off, a shutdown. Afterwards the web process holds no stream (``streams_open`` in
/api/stats and /metrics is 0) and admits exactly its limits again: as many streams with the
key as STEPSTREAM_MAX_STREAMS_PER_KEY, and then exactly as many as STEPSTREAM_MAX_STREAMS in
all. A slot held by any key or token counts against the process, so a leak anywhere shows.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.processes import wait_until
from tests.support.sse import read_stream
from tests.support.tasks import gate_key
from tests.test_auth import ALICE, PRODUCTION, submit_as

PER_KEY = 4
PER_TOKEN = 4
PER_PROCESS = 8
TOKEN_TTL = 2.0
BACKLOG_EVENTS, BACKLOG_PADDING = 500, 16_000  # 8 MB: more than the socket buffers hold
BURST_EVENTS, BURST_PADDING = 400, 16_000  # 6.4 MB a slow consumer does not read
ENV = {
    **PRODUCTION,
    "STEPSTREAM_MAX_STREAMS_PER_KEY": str(PER_KEY),
    "STEPSTREAM_MAX_STREAMS_PER_TOKEN": str(PER_TOKEN),
    "STEPSTREAM_MAX_STREAMS": str(PER_PROCESS),
    "STEPSTREAM_TOKEN_TTL_SECONDS": str(TOKEN_TTL),
    "STEPSTREAM_SUBSCRIBER_QUEUE": "4",
    "STEPSTREAM_SEND_TIMEOUT_SECONDS": "1",
    "STEPSTREAM_REPLAY_BATCH": "100",
}


@dataclass
class Deployment:
    stack: Stack
    port: int
    live_job: str  # a gated job, running: one progress event per push to its gate
    backlog_job: str  # finished, with an 8 MB log
    small_job: str  # finished, a handful of events

    @property
    def url(self) -> str:
        return self.stack.url

    def token(self, job_id: str | None) -> str:
        path = "/api/events/token" if job_id is None else f"/api/jobs/{job_id}/token"
        response = http.post(f"{self.url}{path}", headers=ALICE, timeout=10)
        assert response.status_code == 200, response.text
        token: str = response.json()["token"]
        return token

    def path(
        self, job_id: str | None, credential: str, query: str = ""
    ) -> tuple[str, dict[str, str]]:
        """A stream's path and headers: with the key itself, or a token minted for it now."""
        base = "/api/events" if job_id is None else f"/api/jobs/{job_id}/events"
        params = [query] if query else []
        headers: dict[str, str] = {}
        if credential == "token":
            params.append(f"token={self.token(job_id)}")
        else:
            headers = dict(ALICE)
        return base + ("?" + "&".join(params) if params else ""), headers

    def push(self) -> None:
        self.stack.redis().rpush(gate_key(self.live_job), "go")

    def finished(self, job_id: str) -> bool:
        record = http.get(f"{self.url}/api/jobs/{job_id}", headers=ALICE, timeout=10).json()
        return bool(record["state"] in {"completed", "failed", "cancelled"})

    def streams_open(self) -> tuple[int, float]:
        stats = http.get(f"{self.url}/api/stats", headers=ALICE, timeout=10).json()
        metrics = http.get(f"{self.url}/metrics", timeout=10).text
        gauge = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("stepstream_sse_streams_open ")
        )
        return int(stats["streams_open"]), gauge

    def streams_accepted(self) -> float:
        metrics = http.get(f"{self.url}/metrics", timeout=10).text
        return next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("stepstream_sse_streams_accepted_total ")
        )

    def slow_consumers_dropped(self) -> float:
        metrics = http.get(f"{self.url}/metrics", timeout=10).text
        return next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("stepstream_sse_slow_consumers_dropped_total ")
        )


class RawStream:
    """One HTTP request on a socket of its own, read (or not) byte by byte as a test likes."""

    def __init__(
        self,
        port: int,
        path: str,
        headers: dict[str, str],
        *,
        method: str = "GET",
        receive_buffer: int | None = None,
    ) -> None:
        self.sock = socket.socket()
        if receive_buffer is not None:  # small: the server's writes back up at once
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(20)
        self.sock.connect(("127.0.0.1", port))
        lines = [f"{method} {path} HTTP/1.1", "Host: test", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.received = b""

    def read_until(self, marker: bytes) -> None:
        while marker not in self.received:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"the stream ended before {marker!r}: {self.received[:300]!r}")
            self.received += chunk

    def status(self) -> int:
        self.read_until(b"\r\n\r\n")
        return int(self.received.split(b" ", 2)[1])

    def drain(self, timeout: float) -> int:
        """Read until the server closes the connection; the bytes read in all."""
        self.sock.settimeout(timeout)
        while chunk := self.sock.recv(65536):
            self.received += chunk
        return len(self.received)

    def close(self) -> None:
        self.sock.close()


# -- the ways a stream ends ---------------------------------------------------------------


def head(d: Deployment, credential: str, job: bool) -> None:
    path, headers = d.path(d.live_job if job else None, credential)
    response = http.head(f"{d.url}{path}", headers=headers, timeout=10)
    assert response.status_code == 200 and response.content == b""


def drop_before_headers(d: Deployment, credential: str, job: bool) -> None:
    accepted = d.streams_accepted()
    stream = RawStream(d.port, *d.path(d.live_job if job else None, credential))
    stream.close()
    # The server takes the request from its buffer after the client is gone: the way is tried
    # only once it has given the stream a slot.
    wait_until(
        lambda: d.streams_accepted() > accepted, timeout=10, what="the dropped stream's slot"
    )


def drop_after_headers(d: Deployment, credential: str, job: bool) -> None:
    stream = RawStream(d.port, *d.path(d.live_job if job else None, credential))
    assert stream.status() == 200
    stream.close()


def drop_mid_backlog(d: Deployment, credential: str, job: bool) -> None:
    path, headers = d.path(d.backlog_job if job else None, credential, "after=0")
    stream = RawStream(d.port, path, headers, receive_buffer=4096)
    assert stream.status() == 200
    stream.read_until(b"event: progress")  # the backlog is 8 MB: far from all of it
    stream.close()


def drop_mid_live(d: Deployment, credential: str, job: bool) -> None:
    path, headers = d.path(d.live_job if job else None, credential)
    stream = RawStream(d.port, path, headers)
    assert stream.status() == 200
    # Open: the job's snapshot, or the firehose's first position.
    stream.read_until(b"event: snapshot" if job else b"id: ")
    seen = len(stream.received)
    d.push()
    while b"event: progress" not in stream.received[seen:]:
        chunk = stream.sock.recv(65536)
        assert chunk, "the stream ended before its live event"
        stream.received += chunk
    stream.close()


def read_to_end(d: Deployment, credential: str, job: bool) -> None:
    path, headers = d.path(d.small_job, credential, "after=0")
    status, events = read_stream(f"{d.url}{path}", headers, timeout=20)
    assert status == 200 and events[-1].type == "completed"


def live_to_end(d: Deployment, credential: str, job: bool) -> None:
    """A job's stream open while the job ends: the terminal frame, written by the hub's fan-out
    straight to the client, then the end of the response (the firehose just carries it on)."""
    ending = submit_as(d.stack, ALICE, {"events": 1}, task="gated")
    path, headers = d.path(ending["id"] if job else None, credential)
    stream = RawStream(d.port, path, {**headers, "Connection": "close"})
    try:
        assert stream.status() == 200
        stream.read_until(b"event: snapshot" if job else b"id: ")
        d.stack.redis().rpush(gate_key(ending["id"]), "go")
        if job:
            stream.drain(timeout=20)  # to the server's close
            assert stream.received.count(b"event: completed") == 1
        else:
            stream.read_until(f'"job_id":"{ending["id"]}","type":"completed"'.encode())
    finally:
        stream.close()


def token_expiry(d: Deployment, credential: str, job: bool) -> None:
    path, headers = d.path(d.live_job if job else None, "token")
    started = time.monotonic()
    status, events = read_stream(f"{d.url}{path}", headers, timeout=TOKEN_TTL + 10)
    assert status == 200 and events[-1].type == "token_expired"
    assert time.monotonic() - started < TOKEN_TTL + 5


def slow_consumer(d: Deployment, credential: str, job: bool) -> None:
    """A firehose reader that stops reading while a burst arrives: the server cuts it off."""
    path, headers = d.path(None, "key")
    stream = RawStream(d.port, path, headers, receive_buffer=4096)
    assert stream.status() == 200
    stream.read_until(b"id: ")
    burst = submit_as(
        d.stack, ALICE, {"events": BURST_EVENTS, "padding": BURST_PADDING}, task="burst"
    )
    wait_until(lambda: d.finished(burst["id"]), timeout=30, what="the burst to be written")
    try:
        received = stream.drain(timeout=15)  # ends at the server's close
    finally:
        stream.close()
    assert received < BURST_EVENTS * BURST_PADDING, "it got everything: it was never cut off"


Way = Callable[[Deployment, str, bool], None]
WAYS: dict[str, Way] = {
    way.__name__: way
    for way in (
        head,
        drop_before_headers,
        drop_after_headers,
        drop_mid_backlog,
        drop_mid_live,
        read_to_end,
        live_to_end,
        token_expiry,
        slow_consumer,
    )
}
Action = tuple[str, str, bool]  # (way, "key" | "token", a job's stream rather than the firehose)


# -- the deployment and the check ---------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(module_stacks: StackFactory) -> Iterator[Deployment]:
    s = module_stacks(webs=1, workers=1, **ENV)
    live = submit_as(s, ALICE, {"events": 10_000}, task="gated")
    small = submit_as(s, ALICE, {"events": 3}, task="burst")
    backlog = submit_as(
        s, ALICE, {"events": BACKLOG_EVENTS, "padding": BACKLOG_PADDING}, task="burst"
    )
    d = Deployment(s, s.webs[0].port, live["id"], backlog["id"], small["id"])
    for job in (small, backlog):
        wait_until(lambda job=job: d.finished(job["id"]), timeout=60, what="the job to finish")
    yield d


def assert_no_stream_held(d: Deployment) -> None:
    """Nothing open, and the limits admit exactly what they say."""
    wait_until(lambda: d.streams_open() == (0, 0.0), timeout=10, what="every stream to close")
    held: list[RawStream] = []
    try:
        for _ in range(PER_KEY):
            held.append(RawStream(d.port, "/api/events", dict(ALICE)))
            assert held[-1].status() == 200, "the key's streams were not all given back"
        over = http.get(f"{d.url}/api/events", headers=ALICE, timeout=10)
        assert over.status_code == 429 and over.json()["error"]["details"]["per"] == "key"
        token = d.token(None)
        for _ in range(PER_PROCESS - PER_KEY):
            held.append(RawStream(d.port, f"/api/events?token={token}", {}))
            assert held[-1].status() == 200, "the process's streams were not all given back"
        over = http.get(f"{d.url}/api/events?token={d.token(None)}", timeout=10)
        assert over.status_code == 429 and over.json()["error"]["details"]["per"] == "process"
    finally:
        for stream in held:
            stream.close()
    wait_until(lambda: d.streams_open() == (0, 0.0), timeout=10, what="the probes to close")


def run(d: Deployment, actions: list[Action]) -> None:
    dropped = d.slow_consumers_dropped()
    with ThreadPoolExecutor(max_workers=len(actions)) as pool:
        futures = [pool.submit(WAYS[way], d, credential, job) for way, credential, job in actions]
        for future in futures:
            future.result(timeout=60)
    slow = sum(way == "slow_consumer" for way, _, _ in actions)
    assert d.slow_consumers_dropped() >= dropped + slow, "a slow consumer was not dropped"
    assert_no_stream_held(d)


actions = st.lists(
    st.tuples(st.sampled_from(sorted(WAYS)), st.sampled_from(["key", "token"]), st.booleans()),
    min_size=1,
    max_size=3,
)


@pytest.mark.slow  # many streams, kills
@settings(
    max_examples=4,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(actions=actions)
# Every way with each credential, on a job's stream and on the firehose; then mixes.
@example(actions=[(way, "key", False) for way in ("head", "drop_before_headers", "drop_mid_live")])
@example(actions=[(way, "token", True) for way in ("head", "drop_before_headers", "drop_mid_live")])
@example(
    actions=[
        (way, "key", True) for way in ("drop_after_headers", "drop_mid_backlog", "read_to_end")
    ]
)
@example(
    actions=[
        (way, "token", False) for way in ("drop_after_headers", "drop_mid_backlog", "token_expiry")
    ]
)
@example(actions=[("live_to_end", "key", True), ("live_to_end", "token", True)])
@example(
    actions=[
        ("slow_consumer", "key", False),
        ("token_expiry", "token", True),
        ("read_to_end", "token", True),
    ]
)
def test_every_way_a_stream_ends_gives_its_slot_back(
    deployment: Deployment, actions: list[Action]
) -> None:
    run(deployment, actions)


def test_a_shutdown_ends_every_stream_at_once(make_stack: StackFactory) -> None:
    """uvicorn waits for open responses before it stops: every stream has to end on its own
    (server/hub.py) instead of being cancelled at the graceful timeout."""
    s = make_stack(webs=1, workers=0, **ENV)
    live = submit_as(s, ALICE)  # queued for good: its stream stays open
    d = Deployment(s, s.webs[0].port, live["id"], live["id"], live["id"])
    streams = []
    for job, credential in [(True, "key"), (False, "key"), (True, "token"), (False, "token")]:
        stream = RawStream(d.port, *d.path(live["id"] if job else None, credential))
        assert stream.status() == 200
        streams.append(stream)
    wait_until(lambda: d.streams_open() == (4, 4.0), timeout=10, what="four open streams")

    web = s.webs[0]
    web.stop(timeout=20)
    try:
        for stream in streams:
            stream.drain(timeout=5)
            # The last chunk of the body: the stream ended, it was not cut off.
            assert stream.received.endswith(b"\r\n0\r\n\r\n"), stream.received[-200:]
    finally:
        for stream in streams:
            stream.close()
    # uvicorn logs this when it cancels the responses left at its graceful timeout (3 s):
    # the streams ended on their own. (How fast the process exits is the machine's business.)
    assert "timeout graceful shutdown exceeded" not in web.log()
