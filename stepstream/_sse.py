"""Reading SSE, and following a Stepstream stream across dropped connections, free of I/O.

Every Python reader of server-sent events (this client, the LLM provider, the benchmarks)
decodes with httpx-sse, through ``EventSource`` or the two helpers here, so one parser knows
the format (several ``data:`` lines, CR line ends, comments).

The sync and the async client both drive the same two objects:

- ``StreamFollower`` knows the resume protocol of docs/protocol.md: which cursor to send, what
  each frame means (``retry:``, ``snapshot``, ``reset``, a terminal event, a 204), and when the
  stream is over.
- ``Reconnector`` decides how long to wait before the next connection and when to give up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from httpx_sse import EventSource, ServerSentEvent
from httpx_sse._decoders import SSEDecoder  # EventSource's own, for text already read

from stepstream._backoff import Backoff
from stepstream._exceptions import RateLimited, ServerUnavailable, StepstreamError
from stepstream._models import Event, ResetEvent, SnapshotEvent, parse_event
from stepstream._stream_id import StreamId

DEFAULT_RETRY_SECONDS = 1.0


class AnyTypeEventSource(EventSource):
    """httpx-sse's reader without its ``Content-Type: text/event-stream`` check, for servers
    that stream events under another type (some OpenAI-compatible ones answer
    ``application/json``)."""

    def _check_content_type(self) -> None:
        return None


def decode_frame(lines: Iterable[str]) -> ServerSentEvent | None:
    """The event in one frame's lines (the text between two blank lines, already read), or
    None for a frame with no field (only comments)."""
    decoder = SSEDecoder()
    for line in lines:
        decoder.decode(line)
    return decoder.decode("")


class StreamFollower:
    """The state of one logical stream, over as many HTTP connections as it takes."""

    def __init__(self, path: str, after: str | None, *, ends_at_terminal: bool) -> None:
        self.path = path
        # The cursor: the id of the last event delivered (None = start fresh / live).
        self.cursor = after
        self.ends_at_terminal = ends_at_terminal
        self.retry_seconds = DEFAULT_RETRY_SECONDS
        self.finished = False
        self.delivered = 0  # events handed to the caller on the current connection

    def request_headers(self) -> dict[str, str]:
        # The header, not ``?after=``: the server lets the header win, and it is the one
        # cursor that moves on every reconnect.
        return {"Last-Event-ID": self.cursor} if self.cursor is not None else {}

    def connection_opened(self) -> None:
        self.delivered = 0

    def no_content(self) -> None:
        """204: the cursor is the job's terminal event; there is nothing more, ever."""
        self.finished = True

    def accept(self, sse: ServerSentEvent) -> Event | None:
        """The typed event for one frame, or None for frames that only steer the stream."""
        if sse.retry is not None:
            self.retry_seconds = max(0.0, sse.retry / 1000)
        if sse.event == "message" and not sse.data:
            # A frame with only ``retry:``, or only ``id:`` (a position with no event, as
            # EventSource treats it: the cursor moves, nothing is dispatched).
            if sse.id and not self._already_seen(sse.id):
                self.cursor = sse.id
            return None
        # A ``reset`` carries no id (it moves no cursor); the decoder would repeat the last one.
        event_id = None if sse.event == "reset" else (sse.id or None)
        if event_id is not None and self._already_seen(event_id):
            return None
        event = parse_event(sse.event, event_id, sse.data)
        if event_id is not None:
            self.cursor = event_id
        self.delivered += 1
        if self.ends_at_terminal and (
            event.terminal or (isinstance(event, SnapshotEvent) and event.job.finished)
        ):
            self.finished = True
        if isinstance(event, ResetEvent) and not self.ends_at_terminal:
            # The firehose goes on from its oldest entry: any id after 0 is new.
            self.cursor = "0"
        return event

    def _already_seen(self, event_id: str) -> bool:
        # The server never repeats an id on one stream; this guards a resume that overlaps.
        if self.cursor is None:
            return False
        new, last = StreamId.parse_or_none(event_id), StreamId.parse_or_none(self.cursor)
        return new is not None and last is not None and new <= last


class Reconnector:
    """When to connect again, and when to stop trying and raise ``ServerUnavailable``.

    Before the first successful connection, ``retries`` quick attempts (a wrong URL should fail
    fast). Once connected, a dropped connection is retried at once, then with the server's
    ``retry:`` delay doubling up to ``max_delay``, for up to ``reconnect_timeout`` seconds.
    """

    def __init__(self, retries: int, reconnect_timeout: float, max_delay: float = 10.0) -> None:
        self.retries = retries
        self.reconnect_timeout = reconnect_timeout
        self.max_delay = max_delay
        self.ever_connected = False
        self.failures = 0
        self.down_since: float | None = None
        self.opened_at = 0.0

    def opened(self) -> None:
        self.ever_connected = True
        self.opened_at = time.monotonic()

    def dropped(self, follower: StreamFollower) -> float:
        """An open stream ended or broke: the delay before reconnecting."""
        lasted = time.monotonic() - self.opened_at
        if follower.delivered or lasted > 5.0:
            # It worked for a while: come back at once.
            self.failures = 0
            self.down_since = None
            return 0.0
        # Opened and closed at once with nothing new: back off, or this would spin.
        return self.failed(follower, "the stream closed without sending anything")

    def failed(
        self,
        follower: StreamFollower,
        reason: str,
        give_up_with: StepstreamError | None = None,
        retry_after: float | None = None,
    ) -> float:
        """A connection attempt failed (refused, timed out, 5xx, 429): the delay, or raise
        ``give_up_with`` (default ``ServerUnavailable``) when it is time to stop trying."""
        now = time.monotonic()
        self.failures += 1
        if not self.ever_connected:
            if self.failures > self.retries or isinstance(give_up_with, RateLimited):
                # Refused before we ever held a stream: the caller's own limit, say so now.
                raise give_up_with or ServerUnavailable(reason)
            return Backoff(0.25, self.max_delay, jitter=0.0).delay(self.failures)
        if self.down_since is None:
            self.down_since = now
        if now - self.down_since > self.reconnect_timeout:
            if give_up_with is not None and not isinstance(give_up_with, ServerUnavailable):
                raise give_up_with
            raise ServerUnavailable(
                f"{reason}; gave up reconnecting after {self.reconnect_timeout:g}s"
            )
        # A little jitter, so clients of a restarted server do not all come back at once.
        backoff = Backoff(follower.retry_seconds, self.max_delay, jitter=0.2)
        delay = backoff.delay(self.failures)
        return max(delay, retry_after or 0.0)
