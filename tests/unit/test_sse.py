"""stepstream/_sse.py: the resume protocol and the reconnect state machine, without I/O."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
from httpx_sse import ServerSentEvent

from stepstream import _backoff, _sse
from stepstream._exceptions import RateLimited, ServerUnavailable
from stepstream._models import ProgressEvent, ResetEvent, SnapshotEvent
from stepstream._sse import Reconnector, StreamFollower

RECORD = {"id": "j1", "task": "t", "state": "running", "input": {}}


def frame(
    event: str = "message", data: object = None, id: str = "", retry: int | None = None
) -> ServerSentEvent:
    text = "" if data is None else json.dumps(data)
    return ServerSentEvent(event=event, data=text, id=id, retry=retry)


def progress(id: str, current: int) -> ServerSentEvent:
    return frame("progress", {"job_id": "j1", "current": current, "total": 9}, id)


def job_follower(after: str | None = None) -> StreamFollower:
    return StreamFollower("/api/jobs/j1/events", after, ends_at_terminal=True)


def test_the_cursor_follows_each_event_and_is_sent_on_the_next_connection() -> None:
    follower = job_follower()
    assert follower.request_headers() == {}
    assert isinstance(follower.accept(progress("5-0", 1)), ProgressEvent)
    assert isinstance(follower.accept(progress("5-1", 2)), ProgressEvent)
    assert follower.request_headers() == {"Last-Event-ID": "5-1"}
    assert follower.delivered == 2
    follower.connection_opened()
    assert follower.delivered == 0 and follower.cursor == "5-1"


def test_an_event_at_or_before_the_cursor_is_dropped_as_a_repeat() -> None:
    follower = job_follower(after="7-3")
    assert follower.accept(progress("7-3", 1)) is None
    assert follower.accept(progress("6-9", 1)) is None
    # Compared as numbers, not text: "10-0" comes after "7-3".
    assert follower.accept(progress("10-0", 2)) is not None
    assert follower.cursor == "10-0"


def test_a_frame_with_only_an_id_moves_the_cursor_and_only_forward() -> None:
    follower = job_follower(after="4-0")
    assert follower.accept(frame(id="9-0")) is None
    assert follower.cursor == "9-0"
    assert follower.accept(frame(id="8-0")) is None
    assert follower.cursor == "9-0"
    assert follower.delivered == 0


def test_retry_sets_the_reconnect_delay_and_a_retry_only_frame_dispatches_nothing() -> None:
    follower = job_follower()
    assert follower.accept(frame(retry=2500)) is None
    assert follower.retry_seconds == 2.5
    assert follower.cursor is None


def test_a_terminal_event_or_a_finished_snapshot_ends_a_job_stream() -> None:
    follower = job_follower()
    done = follower.accept(frame("completed", {"job_id": "j1", "result": {"n": 1}}, "3-0"))
    assert done is not None and done.terminal and follower.finished

    follower = job_follower()
    snapshot = follower.accept(frame("snapshot", {**RECORD, "state": "completed"}, "3-0"))
    assert isinstance(snapshot, SnapshotEvent) and follower.finished

    follower = job_follower()
    follower.accept(frame("snapshot", RECORD, "2-0"))
    assert not follower.finished


def test_a_204_finishes_the_stream() -> None:
    follower = job_follower(after="3-0")
    follower.no_content()
    assert follower.finished


def test_a_reset_moves_no_job_cursor_but_restarts_the_firehose_from_its_start() -> None:
    follower = job_follower(after="2-0")
    # The decoder repeats the last id on a frame without one: a reset must not take it.
    reset = follower.accept(frame("reset", {"reason": "trimmed"}, "2-0"))
    assert isinstance(reset, ResetEvent) and reset.id is None
    assert follower.cursor == "2-0"

    firehose = StreamFollower("/api/events", "2-0", ends_at_terminal=False)
    firehose.accept(frame("reset", {"reason": "trimmed"}))
    assert firehose.cursor == "0"
    # The firehose does not end at one job's terminal event.
    firehose.accept(frame("completed", {"job_id": "j1", "result": {}}, "1-0"))
    assert not firehose.finished


class Clock:
    """The module's ``time`` with a clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(_sse, "time", fake)
    # No jitter: the highest value of random.uniform(0.8, 1.0) (stepstream/_backoff.py).
    monkeypatch.setattr(_backoff, "random", SimpleNamespace(uniform=lambda low, high: high))
    return fake


def test_before_any_connection_a_few_quick_retries_then_server_unavailable(clock: Clock) -> None:
    reconnect = Reconnector(retries=2, reconnect_timeout=60)
    follower = job_follower()
    assert reconnect.failed(follower, "refused") == 0.25
    assert reconnect.failed(follower, "refused") == 0.5
    with pytest.raises(ServerUnavailable, match="refused"):
        reconnect.failed(follower, "refused")


def test_a_rate_limit_before_any_connection_is_raised_at_once(clock: Clock) -> None:
    reconnect = Reconnector(retries=5, reconnect_timeout=60)
    limited = RateLimited(429, "too_many_streams", "too many", retry_after=1)
    with pytest.raises(RateLimited):
        reconnect.failed(job_follower(), "429", give_up_with=limited)


def test_a_stream_that_delivered_is_reopened_at_once(clock: Clock) -> None:
    reconnect = Reconnector(retries=0, reconnect_timeout=60)
    follower = job_follower()
    reconnect.opened()
    follower.connection_opened()
    follower.accept(progress("1-0", 1))
    assert reconnect.dropped(follower) == 0.0


def test_an_empty_stream_backs_off_doubling_the_servers_retry_up_to_the_cap(clock: Clock) -> None:
    reconnect = Reconnector(retries=0, reconnect_timeout=600, max_delay=10)
    follower = job_follower()
    follower.accept(frame(retry=1000))
    delays = []
    for _ in range(6):
        reconnect.opened()
        follower.connection_opened()
        delays.append(reconnect.dropped(follower))  # closed at once, nothing new
        clock.now += 1
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_stream_that_stayed_open_a_while_is_reopened_at_once_even_if_quiet(clock: Clock) -> None:
    reconnect = Reconnector(retries=0, reconnect_timeout=60)
    follower = job_follower()
    reconnect.opened()
    follower.connection_opened()
    clock.now += 6  # longer than a connection that fails at once
    assert reconnect.dropped(follower) == 0.0


def test_reconnecting_gives_up_after_the_reconnect_timeout(clock: Clock) -> None:
    reconnect = Reconnector(retries=0, reconnect_timeout=30)
    follower = job_follower()
    reconnect.opened()
    assert reconnect.failed(follower, "refused") == 1.0
    clock.now += 29
    assert reconnect.failed(follower, "refused") > 0
    clock.now += 2
    with pytest.raises(ServerUnavailable, match="gave up reconnecting after 30s"):
        reconnect.failed(follower, "refused")


def test_a_servers_retry_after_is_the_least_delay(clock: Clock) -> None:
    reconnect = Reconnector(retries=0, reconnect_timeout=60)
    reconnect.opened()
    assert reconnect.failed(job_follower(), "503", retry_after=7.0) == 7.0


def test_success_resets_the_backoff(clock: Clock) -> None:
    reconnect = Reconnector(retries=0, reconnect_timeout=60)
    follower = job_follower()
    reconnect.opened()
    for _ in range(3):
        reconnect.failed(follower, "refused")
    reconnect.opened()
    follower.connection_opened()
    follower.accept(progress("1-0", 1))
    assert reconnect.dropped(follower) == 0.0
    assert reconnect.failed(follower, "refused") == 1.0


# -- the one SSE decoder the LLM provider and the benchmarks read with ----------------------


def test_a_frame_with_several_data_lines_is_one_event_with_the_lines_joined() -> None:
    from bench.loadgen import parse_frames

    body = b'id: 1-0\nevent: progress\ndata: {"a":\ndata: 1}\n\n: keep-alive\n\n'
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
    status, frames = parse_frames([(1.0, head + body)])
    assert status == 200
    assert frames == [(1.0, "1-0", "progress", b'{"a":\n1}')]


def test_the_llm_reader_reads_events_whatever_the_content_type() -> None:
    body = b'data: {"x": 1}\r\n\r\ndata: [DONE]\n\n'
    response = httpx.Response(200, headers={"content-type": "application/json"}, content=body)
    assert [sse.data for sse in _sse.AnyTypeEventSource(response).iter_sse()] == [
        '{"x": 1}',
        "[DONE]",
    ]
