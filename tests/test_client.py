"""The Python client against a real server and worker: jobs, live events, resume, errors."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest

from stepstream import (
    AsyncClient,
    BadRequest,
    Client,
    CompletedEvent,
    Conflict,
    InvalidInput,
    JobState,
    NotFound,
    ProgressEvent,
    QueuedEvent,
    RateLimited,
    ResetEvent,
    ServerUnavailable,
    SnapshotEvent,
    StepEvent,
    Unauthorized,
    WaitTimeout,
)
from stepstream.tasks.demo.analyze_document import STEPS as ANALYZE_DOCUMENT_STEPS
from tests.conftest import Stack, StackFactory
from tests.support.api import DOC
from tests.support.clock import SetClock, add_clocked_web
from tests.support.processes import free_port
from tests.support.sse import read_stream
from tests.support.tasks import gate_key

ANALYZE_STEPS = list(ANALYZE_DOCUMENT_STEPS)


def full_log(base: str, job_id: str) -> list[tuple[str | None, str, dict[str, object]]]:
    """The job's log as the server serves it from the beginning (read with a plain reader)."""
    status, events = read_stream(f"{base}/api/jobs/{job_id}/events?after=0")
    assert status == 200
    return [(e.id, e.type, e.data) for e in events]


def test_submit_then_wait_returns_the_final_record(stack: Stack) -> None:
    with Client(stack.url) as client:
        job = client.submit("analyze_document", {"text": DOC, "title": "Notes"})
        assert job.state is JobState.queued and job.task == "analyze_document"
        done = client.wait(job.id, timeout=30)
        assert done.id == job.id
        assert done.state is JobState.completed
        assert done.result["title"] == "Notes"
        assert done.result["keywords"]
        assert [s.state for s in done.steps] == ["completed"] * 7
        assert client.get(job.id).result == done.result


def test_events_from_the_start_are_typed_and_end_at_the_terminal_event(stack: Stack) -> None:
    with Client(stack.url) as client:
        job = client.submit("analyze_document", {"text": DOC, "pace": 0.01})
        events = list(client.events(job.id, after="0"))
    assert isinstance(events[0], QueuedEvent)
    assert events[0].input["text"] == DOC
    assert isinstance(events[-1], CompletedEvent)
    assert events[-1].result["stats"]["sentences"] == 5
    steps = [e.step for e in events if isinstance(e, StepEvent)]
    assert [s.name for s in steps] == ANALYZE_STEPS
    assert [str(s) for s in steps][2] == "Step 3 of 7 · Embedding chunks"
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert progress and all(e.message for e in progress)
    # Exactly the server's log, id for id.
    assert [(e.id, e.type, e.data) for e in events] == full_log(stack.url, job.id)


def test_a_fresh_follow_starts_from_a_snapshot(stack: Stack) -> None:
    with Client(stack.url) as client:
        job = client.submit("generate_quote", {"roles": [{"role": "ml_engineer"}], "weeks": 4})
        done = client.wait(job.id, timeout=30)
        # Finished: the snapshot alone (terminal state), then the end.
        events = list(client.events(job.id))
        assert len(events) == 1 and isinstance(events[0], SnapshotEvent)
        assert events[0].id == done.last_event_id
        assert events[0].job.state is JobState.completed
        assert events[0].job.result["total"] == done.result["total"]
        # At the terminal event there is nothing more: the server answers 204 and we stop.
        assert list(client.events(job.id, after=done.last_event_id)) == []


def test_the_async_iterator_resumes_from_a_cursor_with_nothing_missed_or_repeated(
    stack: Stack,
) -> None:
    redis = stack.redis()

    async def scenario() -> None:
        async with AsyncClient(stack.url) as client:
            job = await client.submit("gated", {"events": 6})
            seen = []
            async with aclosing(client.events(job.id, after="0")) as events:
                async for event in events:
                    seen.append(event)
                    if event.type == "step":  # the job is running: let three events out
                        for _ in range(3):
                            redis.rpush(gate_key(job.id), "go")
                    if isinstance(event, ProgressEvent) and event.current == 3:
                        break
            cursor = seen[-1].id
            assert cursor is not None
            for _ in range(3):  # these happen while nobody is listening
                redis.rpush(gate_key(job.id), "go")
            done = await client.wait(job.id, timeout=30)
            assert done.state is JobState.completed
            async with aclosing(client.events(job.id, after=cursor)) as events:
                rest = [event async for event in events]

        log = full_log(stack.url, job.id)
        ids = [entry[0] for entry in log]
        assert [e.id for e in seen] == ids[: len(seen)]
        assert [(e.id, e.type, e.data) for e in rest] == log[ids.index(cursor) + 1 :]
        assert [e.current for e in rest if isinstance(e, ProgressEvent)] == [4, 5, 6]
        assert isinstance(rest[-1], CompletedEvent)

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


@pytest.mark.slow  # restarts the web process
def test_following_a_job_survives_a_web_server_restart(make_stack: StackFactory) -> None:
    s = make_stack(webs=1, workers=1)
    redis = s.redis()
    port = s.webs[0].port
    with Client(s.url, reconnect_timeout=30) as client:
        job = client.submit("gated", {"events": 6})
        events = client.events(job.id, after="0")
        seen = []
        for event in events:
            seen.append(event)
            if event.type == "step":
                for _ in range(3):
                    redis.rpush(gate_key(job.id), "go")
            if isinstance(event, ProgressEvent) and event.current == 3:
                break
        # The server goes away mid-stream and comes back on the same address.
        s.webs[0].stop()
        for _ in range(2):
            redis.rpush(gate_key(job.id), "go")
        s.add_web(port=port)
        redis.rpush(gate_key(job.id), "go")
        started = time.monotonic()
        seen.extend(events)
        assert time.monotonic() - started < 30
    assert [e.current for e in seen if isinstance(e, ProgressEvent)] == [1, 2, 3, 4, 5, 6]
    assert isinstance(seen[-1], CompletedEvent)
    assert [(e.id, e.type, e.data) for e in seen] == full_log(s.url, job.id)


class CountingTransport(httpx.HTTPTransport):
    """A real transport that counts the stream connections a client opens."""

    def __init__(self) -> None:
        super().__init__()
        self.stream_connections = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            self.stream_connections += 1
        return super().handle_request(request)


@pytest.mark.slow  # 30 MB through a reader
def test_a_slow_reader_is_dropped_by_the_server_and_resumes_without_a_gap(
    make_stack: StackFactory,
) -> None:
    # A tiny per-subscriber queue: a reader that falls behind is disconnected by the server.
    s = make_stack(webs=1, workers=1, STEPSTREAM_SUBSCRIBER_QUEUE="4")
    transport = CountingTransport()
    with Client(s.url, transport=transport) as client:
        big = client.submit("burst", {"events": 1500, "padding": 20_000})
        stream = client.events(big.id)
        seen = [next(stream)]  # the snapshot: this reader is subscribed
        # It reads nothing more while the worker writes ~30 MB, far more than the sockets between
        # them take in while nothing reads (Linux grows a receive buffer as its reader drains
        # it). Reading slowly instead raced the worker: on a loaded machine the reader once kept
        # up, and nothing was dropped.
        with Client(s.url) as watcher:
            assert watcher.wait(big.id, timeout=60).state == "completed"
        seen.extend(stream)
    currents = [e.current for e in seen if isinstance(e, ProgressEvent)]
    snapshot = seen[0]
    assert isinstance(snapshot, SnapshotEvent)
    already = int(snapshot.job.message.split()[1]) if snapshot.job.message else 0
    assert currents == list(range(already + 1, 1501)), "an event was missed or repeated"
    assert isinstance(seen[-1], CompletedEvent)
    assert transport.stream_connections > 1, (
        f"the server never dropped the slow reader (it connected after event {already})"
    )


def test_a_cursor_whose_events_expired_gets_a_reset_then_the_snapshot(stack: Stack) -> None:
    with Client(stack.url) as client:
        job = client.submit("analyze_document", {"text": DOC})
        done = client.wait(job.id, timeout=30)
        log = list(client.events(job.id, after="0"))
        stack.redis().xtrim(f"{stack.prefix}job:{{{job.id}}}:events", maxlen=3, approximate=False)
        events = list(client.events(job.id, after=log[1].id))
    assert [type(e) for e in events] == [ResetEvent, SnapshotEvent]
    assert events[0].id is None
    assert isinstance(events[1], SnapshotEvent) and events[1].job.result == done.result


def test_wait_times_out_and_the_job_goes_on(stack: Stack) -> None:
    with Client(stack.url) as client:
        job = client.submit("gated", {"events": 1})
        started = time.monotonic()
        with pytest.raises(WaitTimeout):
            client.wait(job.id, timeout=1.0)
        assert time.monotonic() - started < 10  # time is the feature: 1 s, generously
        assert not client.get(job.id).finished
        stack.redis().rpush(gate_key(job.id), "go")
        assert client.wait(job.id, timeout=30).state is JobState.completed


def test_the_async_wait_times_out_too(stack: Stack) -> None:
    async def scenario() -> None:
        async with AsyncClient(stack.url) as client:
            job = await client.submit("gated", {"events": 1})
            with pytest.raises(WaitTimeout):
                await client.wait(job.id, timeout=0.5)
            stack.redis().rpush(gate_key(job.id), "go")
            done = await client.wait(job.id, timeout=30)
            assert done.result == {"events": 1}

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_the_firehose_replays_then_follows_live(make_stack: StackFactory) -> None:
    s = make_stack(webs=1, workers=1)
    with Client(s.url) as client:
        first = client.submit("generate_quote", {"roles": [{"role": "ml_engineer"}], "weeks": 2})
        client.wait(first.id, timeout=30)
        second = None
        by_job: dict[str, list[str]] = {}
        for event in client.events_all(after="0"):
            assert event.job_id is not None
            by_job.setdefault(event.job_id, []).append(event.type)
            if event.job_id == first.id and event.type == "completed" and second is None:
                second = client.submit("gated", {"events": 1})
            if event.job_id == (second and second.id) and event.type == "started":
                s.redis().rpush(gate_key(second.id), "go")
            if event.job_id == (second and second.id) and event.terminal:
                break
        assert second is not None
        assert by_job[second.id] == [
            "queued",
            "started",
            "step",
            "progress",
            "step_completed",
            "completed",
        ]
        # Firehose events carry their id in the job's own log.
        log_ids = [entry[0] for entry in full_log(s.url, first.id)]
        assert len(by_job[first.id]) == len(log_ids)
        jobs = list(client.iter_jobs(page_size=1))
        assert [j.id for j in jobs] == [second.id, first.id]


def test_errors_are_typed_and_carry_the_servers_words(stack: Stack) -> None:
    with Client(stack.url) as client:
        tasks = {task.name: task for task in client.tasks()}
        assert tasks["analyze_document"].steps == ANALYZE_STEPS
        assert "text" in tasks["analyze_document"].input_schema["properties"]

        with pytest.raises(NotFound) as not_found:
            client.get("no-such-job")
        assert not_found.value.status == 404 and "no-such-job" in str(not_found.value)

        with pytest.raises(InvalidInput) as invalid:
            client.submit("generate_quote", {"roles": [{"role": "x", "count": 0}]})
        fields = {e.field for e in invalid.value.field_errors}
        assert fields == {"roles.0.count", "weeks"}
        assert "weeks: Field required" in str(invalid.value)

        with pytest.raises(InvalidInput) as unknown:
            client.submit("no_such_task", {})
        assert "analyze_document" in unknown.value.known_tasks

        done = client.submit("generate_quote", {"roles": [{"role": "ml_engineer"}], "weeks": 1})
        client.wait(done.id, timeout=30)
        with pytest.raises(Conflict) as conflict:
            client.cancel(done.id)
        assert conflict.value.state == "completed"
        assert str(conflict.value) == "cannot cancel a job that is completed"

        with pytest.raises(BadRequest):
            client.list(status="sleeping")
        with pytest.raises(NotFound):
            list(client.events("no-such-job"))


def test_cancel_and_retry_a_running_job(stack: Stack) -> None:
    with Client(stack.url) as client:
        job = client.submit("gated", {"events": 2})
        events = client.events(job.id, after="0")
        for event in events:
            if event.type == "step":
                break
        requested = client.cancel(job.id)
        assert requested.cancel_requested
        assert [e.type for e in events][-1] == "cancelled"
        assert client.get(job.id).state is JobState.cancelled
        again = client.retry(job.id)
        # Queued again; a worker may already have taken it by the time the answer is written.
        assert again.state in (JobState.queued, JobState.running)
        for _ in range(2):
            stack.redis().rpush(gate_key(job.id), "go")
        assert client.wait(job.id, timeout=30).state is JobState.completed
        cancelled = {j.id for j in client.iter_jobs(status=["completed"], task="gated")}
        assert job.id in cancelled


def test_an_unreachable_server_raises_server_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retries=1) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="cannot connect"):
            client.get("abc")
        with pytest.raises(ServerUnavailable):
            list(client.events("abc"))
        assert time.monotonic() - started < 10


def test_headers_and_retries_on_the_wire() -> None:
    """What a proxy or an auth layer sees: the bearer key, the idempotency key, and a GET
    tried again after a 503 while a POST without a key is not."""
    seen: list[httpx.Request] = []
    record = {"id": "j1", "task": "t", "state": "queued", "input": {}}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "GET" and len(seen) == 1:
            return httpx.Response(503, json={"error": {"code": "busy", "message": "busy"}})
        if request.url.path == "/api/jobs/j1/cancel":
            return httpx.Response(502, text="Bad gateway")
        return httpx.Response(200 if request.method == "GET" else 202, json=record)

    with Client(
        "http://stepstream.test", api_key="k3y", transport=httpx.MockTransport(handler)
    ) as c:
        assert c.get("j1").id == "j1"
        assert len(seen) == 2, "the 503 was retried"
        c.submit("t", {"a": 1}, idempotency_key="once")
        assert seen[-1].headers["idempotency-key"] == "once"
        assert json.loads(seen[-1].content) == {"task": "t", "input": {"a": 1}}
        with pytest.raises(ServerUnavailable, match="502"):
            c.cancel("j1")
        assert sum(r.url.path.endswith("/cancel") for r in seen) == 1
    assert all(r.headers["authorization"] == "Bearer k3y" for r in seen)


ALICE_KEY = "key-alice-client-0123456789"
BOB_KEY = "key-bob-client-0123456789"
PRODUCTION = {
    "STEPSTREAM_MODE": "production",
    "STEPSTREAM_SECRET": "client-tests-secret-0123456789abcdef",
    "STEPSTREAM_API_KEYS": f"alice:{ALICE_KEY},bob:{BOB_KEY}",
}


def test_in_production_the_api_key_opens_the_callers_own_jobs(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STEPSTREAM_API_KEY", raising=False)
    s = make_stack(webs=1, workers=1, **PRODUCTION)
    with Client(s.url) as anonymous, pytest.raises(Unauthorized, match="credentials required"):
        anonymous.submit("analyze_document", {"text": DOC})
    with Client(s.url, api_key=ALICE_KEY) as alice, Client(s.url, api_key=BOB_KEY) as bob:
        job = alice.submit("analyze_document", {"text": DOC})
        assert job.stream_token, "the submit answer carries a token for a browser's stream"
        events = list(alice.events(job.id, after="0"))
        assert isinstance(events[-1], CompletedEvent)
        assert alice.wait(job.id, timeout=30).result == events[-1].result
        # Another owner's job does not exist, as far as Bob can tell.
        with pytest.raises(NotFound):
            bob.get(job.id)
        with pytest.raises(NotFound):
            list(bob.events(job.id))
        monkeypatch.setenv("STEPSTREAM_API_KEY", BOB_KEY)
        with Client(s.url) as from_env:
            assert job.id not in {j.id for j in from_env.iter_jobs()}


def test_the_firehose_keeps_its_position_from_a_frame_with_only_an_id() -> None:
    """``id:`` alone moves the cursor (as in EventSource) without yielding an event."""
    cursors: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cursors.append(request.headers.get("last-event-id"))
        body = (
            b"retry: 1\n\nid: 7-0\n\n"
            if len(cursors) == 1
            else (
                b'id: 8-0\nevent: log\ndata: {"job_id": "j", "type": "log", "event_id": "3-0"}\n\n'
            )
        )
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    with Client("http://stepstream.test", transport=httpx.MockTransport(handler)) as client:
        event = next(iter(client.events_all()))
    assert cursors[0] is None and "7-0" in cursors
    assert (event.id, event.type, event.event_id) == ("8-0", "log", "3-0")


def test_the_stream_protocol_on_the_wire() -> None:
    """A scripted server: heartbeats and ``retry:`` are absorbed, a cut connection resumes
    from the last id, a 429 on the way back is waited out, a 204 ends the stream."""
    job = "j1"

    def frame(event_id: str, type_: str, **data: object) -> bytes:
        body = json.dumps({"job_id": job, "type": type_, "at": "2026-01-01T00:00:00Z", **data})
        return f"id: {event_id}\nevent: {type_}\ndata: {body}\n\n".encode()

    answers: list[httpx.Response] = [
        httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=b"retry: 10\n\n: keep-alive\n\n"
            + frame("1-0", "queued", input={})
            + frame("2-0", "started", max_attempts=1),  # then the connection ends early
        ),
        httpx.Response(503, json={"error": {"code": "down", "message": "restarting"}}),
        httpx.Response(
            429,
            headers={"retry-after": "0"},
            json={"error": {"code": "too_many_streams", "message": "too many"}},
        ),
        httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=frame("3-0", "step", step={"index": 1, "count": 1, "name": "emit"})
            + b": keep-alive\n\n"
            + frame("4-0", "completed", result={"ok": True}),
        ),
    ]
    cursors: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cursors.append(request.headers.get("last-event-id"))
        return answers.pop(0) if answers else httpx.Response(204)

    with Client("http://stepstream.test", transport=httpx.MockTransport(handler)) as client:
        events = list(client.events(job, after="0"))
        assert [e.type for e in events] == ["queued", "started", "step", "completed"]
        assert cursors == ["0", "2-0", "2-0", "2-0"]
        assert isinstance(events[-1], CompletedEvent) and events[-1].result == {"ok": True}
        # Coming back at the terminal event: 204, nothing more.
        assert list(client.events(job, after="4-0")) == []


def test_a_short_rate_limit_is_waited_out_and_a_long_one_is_raised(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    s = make_stack(
        webs=0,
        workers=0,
        STEPSTREAM_SUBMISSIONS_PER_SECOND="3",
        STEPSTREAM_MAX_UNFINISHED_PER_OWNER="16",
    )
    clock = SetClock(tmp_path / "clock")  # the rate limit's window; the real time until set
    add_clocked_web(s, clock)
    quote = {"roles": [{"role": "ml_engineer"}], "weeks": 1}
    with Client(s.url) as client:
        # Over the per-second limit, the 429's "Retry-After: 1" is waited out: every submit lands.
        ids = {client.submit("generate_quote", quote).id for _ in range(7)}
        assert len(ids) == 7
    with Client(s.url, retries=0) as impatient:
        # One window for all four, however long they take; one the submits above did not use.
        clock.set(time.time() + 3600)
        for _ in range(3):
            impatient.submit("generate_quote", quote)
        with pytest.raises(RateLimited) as raised:
            impatient.submit("generate_quote", quote)
        assert raised.value.code == "rate_limited" and raised.value.retry_after == 1
    clock.release()

    class Answers(httpx.AsyncHTTPTransport):
        """A real transport that keeps the error code of every answer to a submit."""

        def __init__(self) -> None:
            super().__init__()
            self.codes: list[str | None] = []

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await super().handle_async_request(request)
            if request.method == "POST" and request.url.path == "/api/jobs":
                await response.aread()
                error = json.loads(response.content).get("error") or {}
                self.codes.append(error.get("code"))
            return response

    answers = Answers()

    async def fill_up() -> None:
        async with AsyncClient(s.url, transport=answers) as client:
            for _ in range(16):
                try:
                    await client.submit("generate_quote", quote)
                except RateLimited as full:
                    # "Too many unfinished jobs" asks for 5 s: the caller decides, at once.
                    assert full.code == "too_many_unfinished_jobs"
                    assert answers.codes.count("too_many_unfinished_jobs") == 1, answers.codes
                    assert answers.codes[-1] == "too_many_unfinished_jobs", "it was retried"
                    return
            raise AssertionError("the unfinished-jobs limit was never reached")

    asyncio.run(asyncio.wait_for(fill_up(), 60))
