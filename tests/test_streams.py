"""One job's SSE stream: order, resume from every cursor, snapshot, reset, end of stream."""

from __future__ import annotations

import time
from typing import Any

import httpx
import redis

from stepstream import Client, SnapshotEvent
from stepstream.server.sse import HEARTBEAT
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import DOC, get_job, submit, wait_state
from tests.support.monitor import Monitor
from tests.support.processes import wait_until
from tests.support.sse import Event, StreamReader, read_stream
from tests.support.tasks import gate_key

ANALYZE_STEPS = 7


def events_url(base: str, job_id: str) -> str:
    return f"{base}/api/jobs/{job_id}/events"


def test_a_job_streams_every_step_in_order_and_ends(stack: Stack) -> None:
    job = submit(stack.url, "analyze_document", {"text": DOC, "pace": 0.02})
    status, events = read_stream(events_url(stack.url, job["id"]))
    assert status == 200
    assert events[0].type == "snapshot"
    types = [e.type for e in events]
    assert types[-1] == "completed"
    # Every step that was not already in the snapshot arrives, in order, with no gap.
    snapshot = events[0].data
    seen_steps = [e.data["step"]["index"] for e in events if e.type == "step"]
    first = snapshot["step"]["index"] + 1 if snapshot["step"] else 1
    if snapshot["state"] == "queued":
        assert "started" in types
        first = 1
    assert seen_steps == list(range(first, ANALYZE_STEPS + 1))
    ids = [e.id for e in events[1:]]
    assert len(ids) == len(set(ids)), "an event arrived twice"
    record = get_job(stack.url, job["id"])
    assert record["state"] == "completed"
    assert record["result"] == events[-1].data["result"]
    assert record["result"]["keywords"], "the analysis found no keywords"
    assert [s["state"] for s in record["steps"]] == ["completed"] * ANALYZE_STEPS
    assert all(s["duration_ms"] is not None for s in record["steps"])


def test_resume_from_every_position_of_a_finished_log(stack: Stack) -> None:
    job = submit(stack.url, "analyze_document", {"text": DOC})
    wait_state(stack.url, job["id"], {"completed"})
    status, full = read_stream(events_url(stack.url, job["id"]) + "?after=0")
    assert status == 200
    assert full[0].type == "queued" and full[-1].type == "completed"
    assert "snapshot" not in [e.type for e in full]
    for position, event in enumerate(full[:-1]):
        assert event.id is not None
        status, rest = read_stream(
            events_url(stack.url, job["id"]), headers={"Last-Event-ID": event.id}
        )
        assert status == 200
        assert [e.id for e in rest] == [e.id for e in full[position + 1 :]]
    # At the terminal event there is nothing more: 204 tells EventSource to stop reconnecting.
    status, rest = read_stream(
        events_url(stack.url, job["id"]), headers={"Last-Event-ID": full[-1].id or ""}
    )
    assert status == 204 and rest == []


def test_a_fresh_connect_to_a_finished_job_gets_its_snapshot_then_the_end(stack: Stack) -> None:
    job = submit(stack.url, "generate_quote", {"roles": [{"role": "ml_engineer"}], "weeks": 4})
    done = wait_state(stack.url, job["id"], {"completed"})
    status, events = read_stream(events_url(stack.url, job["id"]))
    assert status == 200
    assert [e.type for e in events] == ["snapshot"]
    assert events[0].data["state"] == "completed"
    assert events[0].id == done["last_event_id"]
    assert events[0].data["result"]["total"] > 0


def test_resume_in_the_middle_of_a_running_job(stack: Stack) -> None:
    job = submit(stack.url, "gated", {"events": 6})
    r = stack.redis()
    first = StreamReader(events_url(stack.url, job["id"])).start()
    first.wait_for(lambda evs: len(evs) >= 1)  # subscribed: what follows arrives live
    for _ in range(3):
        r.rpush(gate_key(job["id"]), "go")
    first.wait_for(lambda evs: sum(e.type == "progress" for e in evs) == 3)
    first.close()
    wait_until(lambda: streams_open(stack.url) == 0, timeout=10, what="the first stream gone")
    cursor = [e for e in first.events if e.type == "progress"][-1].id
    second = StreamReader(
        events_url(stack.url, job["id"]), headers={"Last-Event-ID": cursor or ""}
    ).start()
    # Attached before the job goes on: the rest is written while the second stream listens.
    wait_until(lambda: streams_open(stack.url) == 1, timeout=10, what="the second stream")
    for _ in range(3):
        r.rpush(gate_key(job["id"]), "go")
    rest = second.wait_closed()
    _, full = read_stream(events_url(stack.url, job["id"]) + "?after=0")
    index = [e.id for e in full].index(cursor)
    assert [e.id for e in rest] == [e.id for e in full[index + 1 :]]
    assert [e.data["current"] for e in rest if e.type == "progress"] == [4, 5, 6]
    assert rest[-1].type == "completed"


def test_a_stream_opened_before_the_job_starts_sees_it_start(make_stack: StackFactory) -> None:
    s = make_stack(webs=1, workers=0)
    job = submit(s.url, "analyze_document", {"text": DOC})
    reader = StreamReader(events_url(s.url, job["id"])).start()
    reader.wait_for(lambda evs: len(evs) >= 1)
    assert reader.events[0].type == "snapshot"
    assert reader.events[0].data["state"] == "queued"
    s.add_worker()
    events = reader.wait_closed()
    types = [e.type for e in events]
    assert types[1] == "started"
    assert types.count("step") == ANALYZE_STEPS
    assert types[-1] == "completed"


def test_an_event_written_between_registering_and_reading_arrives_once(
    make_stack: StackFactory,
) -> None:
    # The server pauses between registering with the hub and reading the backlog: long enough
    # that the two writes land inside it on a loaded machine too (2 s was missed at load 13).
    window = 5.0
    s = make_stack(webs=1, workers=1, STEPSTREAM_RESUME_DELAY_SECONDS=str(window))
    job = submit(s.url, "gated", {"events": 3})
    r = s.redis()
    r.rpush(gate_key(job["id"]), "go")
    wait_until_progress(s.url, job["id"], 1)
    cursor = get_job(s.url, job["id"])["last_event_id"]
    connecting = time.time()
    reader = StreamReader(events_url(s.url, job["id"]), {"Last-Event-ID": cursor}).start()
    wait_until(lambda: streams_open(s.url) == 1, timeout=10, what="the stream registered")
    # These land inside the window: in the hub's buffer AND in the log the server reads.
    r.rpush(gate_key(job["id"]), "go")
    r.rpush(gate_key(job["id"]), "go")
    events = reader.wait_closed()
    currents = [e.data["current"] for e in events if e.type == "progress"]
    assert currents == [2, 3]
    # The window opened after ``connecting`` and the writes came after the registration; an
    # event id is the time Valkey stored it. Otherwise this run tested nothing.
    stored_at = max(int((e.id or "0").split("-")[0]) / 1000 for e in events)
    assert stored_at < connecting + window, "the writes landed after the window"
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids))


def test_a_stream_reads_the_log_only_once_its_subscription_holds(
    make_stack: StackFactory,
) -> None:
    # The server holds each subscription a stream asks for this long before sending it, the
    # way a slow network would. A stream that read the log first (or did not wait for Redis to
    # confirm its SUBSCRIBE) would miss whatever is written between its read and its
    # subscription: the writes below are made right after the read, inside that window.
    s = make_stack(webs=1, workers=1, STEPSTREAM_SUBSCRIBE_DELAY_SECONDS="3")
    job = submit(s.url, "gated", {"events": 3})
    r = s.redis()
    r.rpush(gate_key(job["id"]), "go")
    wait_until_progress(s.url, job["id"], 1)
    cursor = get_job(s.url, job["id"])["last_event_id"]
    log_key = f"{s.prefix}job:{{{job['id']}}}:events"
    channel = f"{s.prefix}job:{{{job['id']}}}:live"
    monitor = Monitor(s.valkey.port)
    reader = StreamReader(events_url(s.url, job["id"]), {"Last-Event-ID": cursor})
    try:
        reader.start()
        # The stream's first look at the log (XINFO for the cursor's trim check, then XRANGE).
        wait_until(
            lambda: monitor.commands("XINFO", "XRANGE", mentioning=log_key),
            timeout=20,
            what="the stream read the log",
        )
        r.rpush(gate_key(job["id"]), "go")
        r.rpush(gate_key(job["id"]), "go")
        events = reader.wait_closed(timeout=30)
    finally:
        reader.close()
        monitor.close()
    currents = [e.data["current"] for e in events if e.type == "progress"]
    assert currents == [2, 3], "an event written after the read came neither live nor from it"
    assert events[-1].type == "completed"
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids))
    # What Valkey ran, in its order: the SSUBSCRIBE came before the stream's first read.
    subscribed = monitor.commands("SSUBSCRIBE", mentioning=channel)
    read = monitor.commands("XINFO", "XRANGE", mentioning=log_key)
    assert subscribed and subscribed[0] < read[0], "the log was read before the subscription"


def streams_open(base: str) -> int:
    count: int = http.get(f"{base}/api/stats", timeout=10).json()["streams_open"]
    return count


def xinfo_calls(s: Stack) -> int:
    """XINFO calls Valkey answered so far (a stream reads its log's newest id with one)."""
    stats: dict[str, Any] = s.redis().info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k.startswith("cmdstat_xinfo"))


def wait_until_progress(base: str, job_id: str, current: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job = get_job(base, job_id)
        if job["message"] == f"event {current}":
            return
        time.sleep(0.02)
    raise TimeoutError("progress did not arrive")


def test_a_trimmed_cursor_gets_reset_then_snapshot(stack: Stack) -> None:
    job = submit(stack.url, "analyze_document", {"text": DOC})
    wait_state(stack.url, job["id"], {"completed"})
    _, full = read_stream(events_url(stack.url, job["id"]) + "?after=0")
    r: redis.Redis = stack.redis()
    key = f"{stack.prefix}job:{{{job['id']}}}:events"
    r.xtrim(key, maxlen=3, approximate=False)
    status, events = read_stream(
        events_url(stack.url, job["id"]), headers={"Last-Event-ID": full[1].id or ""}
    )
    assert status == 200
    assert [e.type for e in events] == ["reset", "snapshot"]
    assert events[0].id is None
    assert events[1].data["state"] == "completed"


def test_bad_cursors_and_unknown_jobs_are_client_errors(stack: Stack) -> None:
    job = submit(stack.url, "analyze_document", {"text": DOC})
    # Past 2^64 - 1, or after the last id there is: Redis refuses to read from such a cursor.
    beyond = ["0-18446744073709551616", "18446744073709551616-0", f"{2**64 - 1}-{2**64 - 1}"]
    for bad in ["abc", "1-", "-1", "1-2-3", "12", " 1-1", *beyond]:
        for url in [events_url(stack.url, job["id"]), f"{stack.url}/api/events"]:
            response = http.get(url, params={"after": bad}, timeout=10)
            assert response.status_code == 400, (url, bad)
            assert response.json()["error"]["code"] == "bad_cursor"
    response = http.get(events_url(stack.url, "nope"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


def test_the_firehose_resumes_from_any_cursor_and_names_each_job_event_id(
    make_stack: StackFactory,
) -> None:
    s = make_stack(webs=2, workers=1)
    jobs = [submit(s.url, "analyze_document", {"text": DOC}) for _ in range(3)]
    for job in jobs:
        wait_state(s.url, job["id"], {"completed"})
    # The worker runs the three at once, so they may end in any order: read until all have.
    ended: set[str] = set()

    def all_ended(event: Event) -> bool:
        if event.type == "completed":
            ended.add(event.data["job_id"])
        return ended == {j["id"] for j in jobs}

    status, everything = read_stream(f"{s.url}/api/events?after=0", stop=all_ended)
    assert status == 200
    assert {e.data["job_id"] for e in everything} == {j["id"] for j in jobs}
    # Each firehose event names its id in its job's log.
    _, log = read_stream(f"{s.url}/api/jobs/{jobs[0]['id']}/events?after=0")
    mine = [e for e in everything if e.data["job_id"] == jobs[0]["id"]]
    assert [e.data["event_id"] for e in mine] == [e.id for e in log]
    # Resume on the other web process from the middle: exactly the rest.
    middle = len(everything) // 2
    _, rest = read_stream(
        f"{s.webs[1].url}/api/events",
        {"Last-Event-ID": everything[middle].id or ""},
        stop=lambda e: e.id == everything[-1].id,
    )
    assert [e.id for e in rest] == [e.id for e in everything[middle + 1 :]]


def test_a_fresh_firehose_connect_misses_nothing_written_while_it_connects(
    make_stack: StackFactory,
) -> None:
    # The server pauses between reading the firehose's newest id and subscribing.
    s = make_stack(webs=1, workers=0, STEPSTREAM_RESUME_DELAY_SECONDS="2.0")
    before = xinfo_calls(s)
    reader = StreamReader(f"{s.url}/api/events").start()
    # The server read the firehose's newest id: the window is open.
    wait_until(lambda: xinfo_calls(s) > before, timeout=10, what="the stream's first read")
    job = submit(s.url, "analyze_document", {"text": DOC})
    # The job's first event is stored and the stream has not subscribed yet: it can only come
    # from the log read after the window. Otherwise this run tested nothing.
    assert streams_open(s.url) == 0, "the stream subscribed before the write"
    reader.wait_for(lambda evs: any(e.data.get("job_id") == job["id"] for e in evs))
    later = submit(s.url, "analyze_document", {"text": DOC})
    reader.wait_for(lambda evs: any(e.data.get("job_id") == later["id"] for e in evs))
    reader.close()
    queued = [e.data["job_id"] for e in reader.events if e.type == "queued"]
    assert queued == [job["id"], later["id"]], "each event exactly once, in order"


SEPARATORS = "\u2028\u2029\u0085"  # line breaks to str.splitlines(), not to SSE


def raw_stream(url: str, until: bytes | None = None, timeout: float = 30) -> bytes:
    """A stream's bytes as sent: to its end, or until ``until`` has arrived."""
    body = b""
    deadline = time.monotonic() + timeout
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream("GET", url) as response,
    ):
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            body += chunk
            if until is not None and until in body:
                break
            assert time.monotonic() < deadline, f"{url}: {until!r} not seen in {timeout}s"
    return body


def test_no_frame_carries_a_raw_unicode_line_break_and_the_client_reads_them_all(
    stack: Stack,
) -> None:
    """pydantic writes U+2028, U+2029 and U+0085 raw, json.dumps escapes them: every frame,
    the snapshot too, is ASCII, so a client that splits lines on them still reads each one."""
    text = f"One{SEPARATORS[0]}. Two{SEPARATORS[1]}. Three{SEPARATORS[2]} end."
    job = submit(stack.url, "analyze_document", {"text": text, "title": SEPARATORS})
    wait_state(stack.url, job["id"], {"completed"})
    snapshot = raw_stream(events_url(stack.url, job["id"]))
    log = raw_stream(f"{events_url(stack.url, job['id'])}?after=0")
    completed = f'"job_id":"{job["id"]}","type":"completed"'.encode()
    firehose = raw_stream(f"{stack.url}/api/events?after=0", until=completed)
    assert b"event: snapshot" in snapshot
    for name, body in [("snapshot", snapshot), ("log", log), ("firehose", firehose)]:
        assert body.isascii(), f"the {name} has a byte past ASCII"
        # The characters went out, escaped: the test's precondition.
        assert b"\\u2028" in body and b"\\u2029" in body and b"\\u0085" in body, name
    with Client(stack.url) as client:
        first, *_ = client.events(job["id"])
        assert isinstance(first, SnapshotEvent)
        assert first.job.input == {"text": text, "title": SEPARATORS}
        log_events = list(client.events(job["id"], after="0"))
    assert log_events[0].type == "queued" and log_events[-1].type == "completed"


def test_the_end_of_a_live_job_reaches_every_viewer_once_and_ends_their_streams(
    make_stack: StackFactory,
) -> None:
    """The terminal frame goes from the hub's fan-out straight to each client, like progress;
    each stream's task then ends the response. Every viewer gets it once, last, and its
    stream closes with the job (not at some later wake-up: heartbeats are an hour apart here);
    a viewer resuming from a cursor gets its catch-up first, then the live rest."""
    stack = make_stack(webs=1, workers=1, STEPSTREAM_HEARTBEAT_SECONDS="3600")
    job = submit(stack.url, "gated", {"events": 3})
    r = stack.redis()
    r.rpush(gate_key(job["id"]), "go")
    wait_until_progress(stack.url, job["id"], 1)
    cursor = get_job(stack.url, job["id"])["last_event_id"]
    before = streams_open(stack.url)
    fresh = [StreamReader(events_url(stack.url, job["id"])).start() for _ in range(8)]
    resumed = StreamReader(events_url(stack.url, job["id"]), {"Last-Event-ID": cursor}).start()
    for reader in fresh:
        reader.wait_for(lambda evs: len(evs) >= 1)  # the snapshot: live from here on
    # The resumed one has nothing to catch up yet: registered is enough (what follows is
    # buffered live while it reads the log).
    wait_until(lambda: streams_open(stack.url) == before + 9, timeout=10, what="9 streams")
    r.rpush(gate_key(job["id"]), "go")
    r.rpush(gate_key(job["id"]), "go")
    _, log = read_stream(events_url(stack.url, job["id"]) + "?after=0")
    after_cursor = [e.id for e in log[[e.id for e in log].index(cursor) + 1 :]]
    for reader in [*fresh, resumed]:
        events = reader.wait_closed(timeout=30)  # the server ended it: no close() of ours
        assert reader.error is None
        live = events[1:] if events[0].type == "snapshot" else events
        assert [e.id for e in live] == after_cursor, "a frame was lost, repeated or misplaced"
        assert [e.type for e in live][-2:] == ["step_completed", "completed"]
    assert [e.data["current"] for e in resumed.events if e.type == "progress"] == [2, 3]
    wait_until(lambda: streams_open(stack.url) == before, timeout=10, what="the slots back")


def chunks_of(body: bytes) -> list[bytes]:
    """A chunked HTTP/1.1 body's pieces, failing on a frame that is not a whole chunk."""
    pieces: list[bytes] = []
    while True:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n", f"bytes after the last chunk: {rest[:100]!r}"
            return pieces
        assert rest[size : size + 2] == b"\r\n", f"a chunk's framing is broken: {rest[:100]!r}"
        pieces.append(rest[:size])
        body = rest[size + 2 :]


def test_an_idle_stream_hears_a_heartbeat_each_interval_then_the_job_to_its_end(
    make_stack: StackFactory,
) -> None:
    """While the job writes nothing, the stream gets a comment every
    STEPSTREAM_HEARTBEAT_SECONDS (so that proxies keep it open), each a whole chunk of the
    response, written to the waiting stream's connection by the hub; the job's next event and
    its end follow on the same stream."""
    from tests.test_stream_slots import RawStream

    s = make_stack(webs=1, workers=1, STEPSTREAM_HEARTBEAT_SECONDS="0.5")
    job = submit(s.url, "gated", {"events": 1})
    wait_state(s.url, job["id"], {"running"})
    stream = RawStream(s.webs[0].port, f"/api/jobs/{job['id']}/events", {"Connection": "close"})
    try:
        assert stream.status() == 200
        stream.read_until(b"event: snapshot")
        snapshot_end = len(stream.received)
        deadline = time.monotonic() + 10
        while stream.received[snapshot_end:].count(HEARTBEAT) < 3:
            stream.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = stream.sock.recv(65536)
            except TimeoutError:
                raise AssertionError("no heartbeat every 0.5 s on an idle stream") from None
            assert chunk, "the idle stream ended"
            stream.received += chunk
        s.redis().rpush(gate_key(job["id"]), "go")
        stream.drain(timeout=20)  # to the server's close, after the job's end
    finally:
        stream.close()
    head, _, body = stream.received.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    pieces = chunks_of(body)
    kinds = [
        "heartbeat" if piece == HEARTBEAT else "events" if b"event: " in piece else repr(piece)
        for piece in pieces
    ]
    first_heartbeat = kinds.index("heartbeat")
    assert kinds[first_heartbeat : first_heartbeat + 3] == ["heartbeat"] * 3
    rest = b"".join(pieces[first_heartbeat:])
    assert rest.index(b"event: progress") < rest.index(b"event: completed")
    assert b"".join(pieces).count(b"event: completed") == 1


def test_the_end_of_a_job_reaches_a_client_that_fell_behind_once_then_its_stream_ends(
    make_stack: StackFactory,
) -> None:
    """A client that stops reading while a burst arrives: its writes back up, the stream's task
    completes them under the send timeout, then the terminal frame, once, then the end."""
    from tests.test_stream_slots import RawStream

    s = make_stack(
        webs=1,
        workers=0,
        STEPSTREAM_SUBSCRIBER_QUEUE="1000",
        STEPSTREAM_SEND_TIMEOUT_SECONDS="60",  # the client reads again well before
    )
    events, padding = 200, 16_000  # 3.2 MB: more than the socket buffers between the two hold
    job = submit(s.url, "burst", {"events": events, "padding": padding, "interval": 0.002})
    stream = RawStream(
        s.webs[0].port,
        f"/api/jobs/{job['id']}/events",
        {"Connection": "close"},  # the end of the response closes the socket
        receive_buffer=4096,
    )
    try:
        assert stream.status() == 200
        stream.read_until(b"event: snapshot")
        s.add_worker()
        wait_state(s.url, job["id"], {"completed"}, timeout=60)
        # Written in full while this client read nothing: its stream is held, not cut off.
        assert streams_open(s.url) == 1, "the stream ended before the client read its end"
        assert len(stream.received) < events * padding
        stream.drain(timeout=30)  # to the server's close
    finally:
        stream.close()
    body = stream.received.decode()
    assert body.count("event: progress") == events
    assert body.count("event: completed") == 1
    assert body.rstrip("\r\n0").rstrip().endswith("}"), "something came after the last frame"
    assert body.rindex("event: completed") > body.rindex("event: progress")
    wait_until(lambda: streams_open(s.url) == 0, timeout=10, what="the slot back")


def test_viewers_connecting_together_while_a_job_writes_each_get_a_snapshot_then_every_event(
    stack: Stack,
) -> None:
    """Streams connecting at once share their record reads (one read, one snapshot frame),
    but only a read started after a stream registered may serve it: whatever its snapshot
    lacks then arrives live. Each viewer gets the log after its snapshot, once, in order."""
    job = submit(stack.url, "gated", {"events": 60})
    wait_state(stack.url, job["id"], {"running"})
    r = stack.redis()
    readers = arrive_in_waves(stack, job["id"], {}, written_before=0)
    for _ in range(40):
        r.rpush(gate_key(job["id"]), "go")
    _, log = read_stream(events_url(stack.url, job["id"]) + "?after=0", timeout=60)
    ids = [e.id for e in log]
    snapshots = set()
    for reader in readers:
        events = reader.wait_closed(timeout=60)
        assert events[0].type == "snapshot"
        snapshot_id = events[0].id
        snapshots.add(snapshot_id)
        after = ids[ids.index(snapshot_id) + 1 :] if snapshot_id in ids else ids
        assert [e.id for e in events[1:]] == after, "a gap, a repeat or a frame out of order"
        assert events[-1].type == "completed"
    assert len(snapshots) > 1, "every viewer connected at the same point: nothing was tested"


def arrive_in_waves(
    stack: Stack, job_id: str, headers: dict[str, str], written_before: int
) -> list[StreamReader]:
    """Four waves of six viewers, each wave followed by five events of the gated job (which
    had written ``written_before``): some share a read, some cannot."""
    r = stack.redis()
    readers: list[StreamReader] = []
    for wave in range(4):
        readers += [StreamReader(events_url(stack.url, job_id), headers).start() for _ in range(6)]
        for _ in range(5):
            r.rpush(gate_key(job_id), "go")
        wait_until(
            lambda wave=wave: progress_reached(stack.url, job_id, 5 * wave + 5 + written_before),
            timeout=20,
            what="the wave's events written",
        )
    return readers


def progress_reached(base: str, job_id: str, current: int) -> bool:
    message = get_job(base, job_id)["message"] or ""
    return message.startswith("event ") and int(message.split()[1]) >= current


def test_viewers_resuming_together_while_a_job_writes_each_get_every_event_after_their_cursor(
    stack: Stack,
) -> None:
    """A reconnect storm's viewers resume from one cursor together: a read of the log serves
    every stream registered before it was sent (server/streams.py, SharedRead), no later one.
    Each viewer gets the log after its cursor, once, in order, then the end."""
    job = submit(stack.url, "gated", {"events": 60})
    wait_state(stack.url, job["id"], {"running"})
    r = stack.redis()
    r.rpush(gate_key(job["id"]), "go")
    wait_until_progress(stack.url, job["id"], 1)
    cursor = get_job(stack.url, job["id"])["last_event_id"]
    readers = arrive_in_waves(stack, job["id"], {"Last-Event-ID": cursor}, written_before=1)
    for _ in range(40):
        r.rpush(gate_key(job["id"]), "go")
    _, log = read_stream(events_url(stack.url, job["id"]) + "?after=0", timeout=60)
    ids = [e.id for e in log]
    after = ids[ids.index(cursor) + 1 :]
    for reader in readers:
        events = reader.wait_closed(timeout=60)
        assert [e.id for e in events] == after, "a gap, a repeat or a frame out of order"
        assert events[-1].type == "completed"
