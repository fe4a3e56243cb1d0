"""The SSE endpoints: one job's events, and the firehose."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from stepstream._stream_id import LAST, StreamId
from stepstream.server.api_errors import ApiError
from stepstream.server.guards import guarded, open_stream
from stepstream.server.handoff import handoff
from stepstream.server.hub import Hub
from stepstream.server.jobs import load_job
from stepstream.server.protocol import BodyWriter, body_writer
from stepstream.server.state import AppState
from stepstream.server.streams import FirehoseStream, JobStream
from stepstream.server.traces import frames_in
from stepstream.tasks import tracing

logger = logging.getLogger("stepstream.sse")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]


class EventStream:
    """A lean ASGI response for SSE: one task per stream plus one that waits for the disconnect.

    sse-starlette runs a task group per connection (the stream, a disconnect listener, a
    shutdown watcher) and a cancel scope around every send. Here the hub's one timer does the
    shared work: heartbeats (queued as frames), the send timeout (a send still blocked at its
    deadline is cancelled) and the end of every stream on shutdown. Bytes are sent as the
    streams yield them; the first is always ``retry:``.
    """

    __slots__ = (
        "_cancelled_by_us",
        "_error",
        "_pending",
        "_raw",
        "_send",
        "_task",
        "body",
        "counter",
        "hub",
        "on_close",
        "send_deadline",
        "send_timeout",
    )

    # The last chunk written directly and how many frames it holds (see try_write).
    _counted: ClassVar[tuple[bytes, int]] = (b"", 0)

    def __init__(
        self,
        hub: Hub,
        body: AsyncIterator[bytes],
        send_timeout: float,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.hub = hub
        self.body = body
        self.send_timeout = send_timeout
        self.on_close = on_close  # called once when the response ends, however it ends
        self.send_deadline = 0.0
        self.counter: Any = None  # see send_body
        self._task: asyncio.Task[object] | None = None
        self._cancelled_by_us = False
        self._send: Send | None = None
        self._raw: BodyWriter | None = None
        self._pending: tuple[Generator[Any, None, None], Any] | None = None
        self._error: BaseException | None = None

    # -- direct writes (see JobStream._direct) --------------------------------------------

    def try_write(self, chunk: bytes) -> bool:
        """Send ``chunk`` now, from the hub's loop over subscribers, without awaiting.

        Straight to the connection when it can (``BodyWriter``); otherwise through ``send``:
        uvicorn's returns without suspending unless the connection's write buffer is over its
        high-water mark; the coroutine is stepped once by hand. If it suspends, it is kept for
        ``flush`` (run by this stream's task, under the send timeout).
        """
        if self._send is None or self._pending is not None or self._error is not None:
            return False
        raw = self._raw
        if raw is not None and raw.write(chunk):
            # Past the middlewares that count frames: the hub counts these (server/metrics.py),
            # counted once for a chunk the fan-out writes to every viewer in turn.
            last, count = EventStream._counted
            if chunk is not last:
                count = frames_in(chunk)
                EventStream._counted = (chunk, count)
            self.hub.frames_written_directly += count
            return True
        if self.counter is not None:
            self._count(chunk)  # sent now or by flush(): the stream ends if it is not
        message: Message = {"type": "http.response.body", "body": chunk, "more_body": True}
        coro = self._send(message).__await__()  # works for any awaitable, not only coroutines
        try:
            awaiting = coro.send(None)
        except StopIteration:
            return True
        except BaseException as exc:  # raised again by flush(), in the stream's task
            self._error = exc
            return False
        if getattr(awaiting, "_asyncio_future_blocking", False):
            # What a Task does with a future its coroutine yields; `await` in flush() would
            # otherwise refuse it ("await wasn't used with future").
            awaiting._asyncio_future_blocking = False
        self._pending = (coro, awaiting)
        self.send_deadline = asyncio.get_running_loop().time() + self.send_timeout
        return False

    def direct_transport(self) -> Any:
        """The connection's transport, while a live frame may be written to it straight
        (framed by server/protocol.py ``chunked``, counted in ``Hub.frames_written_directly``)
        without even ``try_write``: nothing of this stream's is pending and the response takes
        raw chunks. None otherwise (then ``try_write``)."""
        raw = self._raw
        if (
            raw is None
            or self._send is None
            or self._pending is not None
            or self._error is not None
        ):
            return None
        return raw.open_transport()

    async def flush(self) -> None:
        """Complete a direct write that could not finish at once."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._pending is None:
            return
        coro, awaiting = self._pending
        try:
            while True:
                try:
                    if awaiting is None:
                        await asyncio.sleep(0)
                    else:
                        await awaiting
                except BaseException as exc:
                    try:
                        awaiting = coro.throw(exc)
                    except StopIteration:
                        return  # the send handled it and finished
                else:
                    try:
                        awaiting = coro.send(None)
                    except StopIteration:
                        return
                if getattr(awaiting, "_asyncio_future_blocking", False):
                    awaiting._asyncio_future_blocking = False
        finally:
            self._pending = None
            self.send_deadline = 0.0
            coro.close()

    def _count(self, chunk: bytes) -> None:
        frames = frames_in(chunk)
        if frames:
            self.counter.inc(frames)

    def send_timed_out(self) -> None:
        """Called by the hub's timer: the client stopped reading; give up on it."""
        if self._task is not None and not self._cancelled_by_us:
            self._cancelled_by_us = True
            self._task.cancel()

    def _client_gone(self, _: object) -> None:
        self.send_timed_out()

    async def _wait_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        taker = handoff(scope)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if taker is not None:
                # The stack has added its headers: the body is sent from outside it.
                taker.stream = self
                return
            await self.send_body(scope, receive, send)
        finally:
            if taker is None or taker.stream is not self:
                self.close()

    def close(self) -> None:
        """Release the stream's slot, once (``on_close``)."""
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

    async def send_body(
        self, scope: Scope, receive: Receive, send: Send, counter: Any = None
    ) -> None:
        """Everything after the response start. ``counter``: a metric to count the frames
        sent through ``send`` (server/handoff.py), when no layer around ``send`` does."""
        self.counter = counter
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._send = send
        raw = body_writer(scope)  # None unless served by ``stepstream web``'s protocol
        # Live frames skip the ``send`` chain when uvicorn is ours; not with tracing on, whose
        # span counts the frames sent through ``send``.
        self._raw = None if tracing.enabled() else raw
        watcher: asyncio.Future[None] | None = None
        if raw is not None:
            raw.on_connection_lost(self.send_timed_out)
        else:
            watcher = asyncio.ensure_future(self._wait_disconnect(receive))
            watcher.add_done_callback(self._client_gone)
        self.hub.senders.add(self)
        send_timeout = self.send_timeout
        try:
            async for chunk in self.body:
                self.send_deadline = loop.time() + send_timeout
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.send_deadline = 0.0
                if counter is not None:
                    self._count(chunk)
                del chunk  # not kept while the stream idles (a snapshot is a record's size)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not self._cancelled_by_us:
                raise  # not ours: the server is cancelling us
            task = self._task
            if task is not None:
                task.uncancel()
        finally:
            self._cancelled_by_us = True  # a late disconnect callback must not cancel cleanup
            self.hub.senders.discard(self)
            self._send = None
            self._raw = None
            if self._pending is not None:
                self._pending[0].close()
                self._pending = None
            if raw is not None:
                raw.on_connection_lost(None)
            if watcher is not None:
                watcher.remove_done_callback(self._client_gone)
                watcher.cancel()
            try:
                await self.body.aclose()  # type: ignore[attr-defined]
            except Exception:
                logger.exception("closing a stream failed")


def read_cursor(
    request: Request, position: Callable[[str], list[StreamId]] = lambda raw: [StreamId.parse(raw)]
) -> str | None:
    """``Last-Event-ID`` wins over ``?after=``: EventSource keeps its first URL on reconnect.
    ``position``: the cursor as stream ids (the firehose's on a cluster has one per partition)."""
    raw = request.headers.get("last-event-id") or request.query_params.get("after")
    if raw is None or raw == "":
        return None
    try:
        ids = position(raw)
    except ValueError as error:
        raise ApiError(
            400,
            "bad_cursor",
            f"{raw!r} is not an event id (`0` or `<ms>-<seq>`)",
            {"reason": str(error)},
        ) from None
    if LAST in ids:  # no event can follow it: Redis refuses to read after it
        raise ApiError(400, "bad_cursor", f"{raw!r} is the last possible event id")
    return raw


def sse_response(
    state: AppState, body: AsyncIterator[bytes], on_close: Callable[[], None]
) -> EventStream:
    return EventStream(state.hub, body, state.settings.send_timeout_seconds, on_close)


async def job_events(request: Request) -> Response | EventStream:
    state: AppState = request.app.state.stepstream
    principal = await state.auth.authenticate(request, allow_token=True)
    cursor = read_cursor(request)
    record = await load_job(request, principal, shared=True)
    if cursor is not None and record.state.terminal and cursor == record.last_event_id:
        return Response(status_code=204)  # the standard's "stop reconnecting"
    release = open_stream(state, principal)
    stream = JobStream(state.store, state.hub, state.settings, record, cursor)
    frames = guarded(principal, stream.frames(), state.auth.watch, state.hub)
    response = sse_response(state, frames, release)
    stream.writer = response  # live frames may go straight from the hub to the client
    return response


async def firehose(request: Request) -> EventStream:
    state: AppState = request.app.state.stepstream
    principal = await state.auth.authenticate(request, allow_token=True)
    if not principal.may_open_firehose:
        raise ApiError(
            401,
            "token_scope",
            "this token opens one job's stream, not the firehose",
            headers={"WWW-Authenticate": "Bearer"},  # every 401 names the scheme (RFC 9110)
        )
    cursor = read_cursor(request, state.store.firehose_position)
    release = open_stream(state, principal)
    stream = FirehoseStream(
        state.store, state.hub, state.settings, cursor, principal.owner, principal.subject
    )
    frames = guarded(principal, stream.frames(), state.auth.watch, state.hub)
    return sse_response(state, frames, release)
