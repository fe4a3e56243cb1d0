"""uvicorn's HTTP/1.1 protocol with limits on a request's head: its time and its size.

uvicorn bounds an idle keep-alive connection, but not the time a client takes to send a
request line and headers: one byte every few seconds holds a connection (and a file
descriptor) for ever. Here a connection must deliver each request's head within
``head_timeout`` seconds of opening, or of the previous response's end; otherwise it is
closed. Once a request is under way (its body, a long stream) the limit no longer applies.

Nor does uvicorn bound a head's size with httptools, whose parser keeps a header however long
it grows: one connection could make the process buffer (and parse) 100 MB. Here the bytes of
a head are counted as they arrive, and one over ``max_head_bytes`` gets 431 and the connection
is closed before the rest is read. (h11, without httptools, has a limit of its own, set to the
same size by ``stepstream web``; it answers 400.)
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, MutableMapping
from typing import Any

from stepstream.server.bodies import Error

HEAD_TOO_LARGE = 431
# The scope extension under which a request's uvicorn cycle is kept (httptools only): see
# ``body_writer``.
BODY_WRITER = "stepstream.body_writer"
# How long an event stream's head may wait for its first frames, to go out in one write.
STREAM_HEAD_WAIT = 0.1
EVENT_STREAM_HEAD = b"\r\ncontent-type: text/event-stream"
# What a HeadHolding holds: a head with a Content-Length; that or an event stream's.
CONTENT_HEAD = 1
STREAM_HEAD = 2


def head_too_large(max_bytes: int) -> bytes:
    """The whole 431 response, written straight to the socket: no app runs for a head that
    was never read whole."""
    error = Error.of(
        "header_too_large",
        f"the request line and headers are larger than {max_bytes} bytes",
        {"limit": max_bytes, "setting": "STEPSTREAM_MAX_HEADER_BYTES"},
    )
    body = json.dumps(error.model_dump(mode="json"), separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {HEAD_TOO_LARGE} Request Header Fields Too Large\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


def with_head_limits(
    base: type[asyncio.Protocol], seconds: float, max_bytes: int
) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's h11 or httptools protocol) with the head's time and size limits.

    The size is counted only where the parser reports where a head ends (httptools'
    ``on_headers_complete`` and ``on_message_complete``): from the end of one message to the
    end of the next head.
    """
    counts_size = hasattr(base, "on_headers_complete") and hasattr(base, "on_message_complete")
    refusal = head_too_large(max_bytes)

    class HeadLimitsProtocol(base):  # type: ignore[valid-type,misc]
        # In slots, not the instance's dict: three more keys there grew every connection's
        # dict past its size class (1.5 KiB per connection, by tracemalloc).
        __slots__ = ("_head_bytes", "_head_timer", "_heads_read", "_on_lost")
        head_timeout = seconds
        max_head_bytes = max_bytes

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            _lighten(self)
            self._on_lost: Callable[[], None] | None = None  # see BodyWriter.on_connection_lost
            self._head_timer: asyncio.TimerHandle | None = None
            # Bytes of the head being read; None while a body is (no head is due).
            self._head_bytes: int | None = 0 if counts_size else None
            self._heads_read = 0
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            if self._head_bytes is not None:
                room = self.max_head_bytes - self._head_bytes
                if len(data) > room:
                    # Up to the limit: the head may end inside it; if not, it is too large.
                    within, rest = data[:room], data[room:]
                    heads_read = self._heads_read
                    if within:
                        self._feed(within)
                    if self._heads_read == heads_read:
                        self._refuse_head()
                    elif rest and not self.transport.is_closing():
                        self.data_received(rest)  # a body, or the next head, counted again
                    return
                self._head_bytes += len(data)
            self._feed(data)

        def _feed(self, data: bytes) -> None:
            super().data_received(data)
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                self._disarm_head_timer()  # the head is in: a request is under way

        def on_headers_complete(self) -> None:
            self._head_bytes = None
            self._heads_read += 1
            super().on_headers_complete()
            cycle = getattr(self, "cycle", None)
            if cycle is None or cycle.scope is not self.scope:
                return  # no request under way: an upgrade, or a head refused
            _lighten_cycle(cycle)
            # Parsed into the scope: kept, the raw target (a stream token's query) would be
            # held for a stream's life. A WebSocket upgrade, which reads it later, returned
            # before making a cycle.
            self.url = b""  # type: ignore[misc]  # uvicorn's attribute, in its dict
            if hasattr(cycle, "flow"):
                # Read by an SSE response for its live frames (the app runs later, in a task).
                self.scope.setdefault("extensions", {})[BODY_WRITER] = BodyWriter(self, cycle)
                # A HEAD's answer has no frames for its head to wait for.
                waits = STREAM_HEAD if self.scope["method"] != "HEAD" else CONTENT_HEAD
                cycle.transport = HeadHolding(cycle.transport, waits)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._head_bytes = 0  # what follows on this connection is the next head

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()  # the next request on this connection, if any

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            callback, self._on_lost = self._on_lost, None
            super().connection_lost(exc)
            if callback is not None:
                callback()

        def _refuse_head(self) -> None:
            self._disarm_head_timer()
            self._head_bytes = None
            if not self.transport.is_closing():
                self.transport.write(refusal)
                self.transport.close()

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(self.head_timeout, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeadLimitsProtocol


class ListEvent(asyncio.Event):
    """An ``asyncio.Event`` whose waiters are a list, not a deque.

    uvicorn keeps two events per connection (its flow control's, and the request cycle's for
    the next body message), which a stream holds for its whole life with no waiter, or one:
    an empty deque is 760 bytes, an empty list 56. ``Event`` only appends, removes and
    iterates its waiters.
    """

    def __init__(self) -> None:
        super().__init__()
        self._waiters = []  # type: ignore[assignment]


class _Pipeline(list[Any]):
    """uvicorn's queue of pipelined requests (a deque: 760 bytes, nearly always empty)."""

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


def _lighten(protocol: Any) -> None:
    """Swap uvicorn's per-connection deques for lists, while nothing waits on them yet."""
    if type(getattr(protocol, "pipeline", None)) is deque and not protocol.pipeline:
        protocol.pipeline = _Pipeline()
    flow = getattr(protocol, "flow", None)
    writable = getattr(flow, "_is_writable_event", None)
    if type(writable) is asyncio.Event:
        lighter = ListEvent()
        if writable.is_set():
            lighter.set()
        flow._is_writable_event = lighter  # type: ignore[union-attr]


def _lighten_cycle(cycle: Any) -> None:
    event = getattr(cycle, "message_event", None)
    if type(event) is asyncio.Event and not event.is_set():
        cycle.message_event = ListEvent()  # created just now: no one waits on it yet


class HeadHolding:
    """A request's side of the connection (uvicorn's cycle writes through it) that holds back
    a response's head until its first bytes of body: one write, one system call, instead of
    two. A head with a Content-Length (a Starlette ``Response`` sends its body right after its
    head) is held until the next turn of the loop at most; an event stream's (to a GET: a HEAD
    has no frames), until its first frames (a Redis read later: the stream registers and reads
    its catch-up after its response has started) or ``STREAM_HEAD_WAIT`` seconds at most, so
    that a stream whose first bytes are slow (a subscription Redis has not confirmed yet) is
    seen as open all the same. Any other head, and whatever write, close or timer comes first,
    sends the head on its own.

    Live frames go past this (``BodyWriter``), which is safe because a stream's first bytes go
    through it before the hub may write a frame straight to the connection
    (server/streams.py)."""

    __slots__ = ("_first", "_held", "_timer", "transport")

    def __init__(self, transport: Any, holds: int = STREAM_HEAD) -> None:
        self.transport = transport
        self._held: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        # The heads its first write may hold (the response's head: "100 Continue" aside), 0
        # once written.
        self._first = holds

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.transport.write(held + data)
            return
        if self._first and data.startswith(b"HTTP/1.1 "):
            holds, self._first = self._first, 0
            if b"\r\ncontent-length: " in data:
                self._held = data
                asyncio.get_running_loop().call_soon(self.flush)
                return
            if holds == STREAM_HEAD and EVENT_STREAM_HEAD in data:
                self._held = data
                self._timer = asyncio.get_running_loop().call_later(STREAM_HEAD_WAIT, self.flush)
                return
        self.transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self.transport.is_closing():
                self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        closing: bool = self.transport.is_closing()
        return closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)


class BodyWriter:
    """Writes a piece of a chunked response body straight to the connection, as uvicorn's
    httptools ``send`` would, without a coroutine or the middlewares' wrappers of ``send``.

    An SSE response uses it for the live frames the hub fans out: one write per subscriber per
    event, where the ``send`` chain costs about as much as the system call. ``write`` declines
    (False) whenever ``send`` would do more than write: the response not started, finished or
    not chunked, the client gone, or the connection's buffer over its high-water mark (then
    ``send`` waits for it to drain, under the response's send timeout).
    """

    __slots__ = ("cycle", "protocol")

    def __init__(self, protocol: Any, cycle: Any) -> None:
        self.protocol = protocol
        self.cycle = cycle

    def on_connection_lost(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` when the client goes: without a task awaiting ``receive()`` for
        ``http.disconnect`` (with its coroutines, future and uvicorn's event, ~2 KiB per
        stream). None unregisters it."""
        self.protocol._on_lost = callback
        if callback is not None and self.cycle.disconnected:
            callback()  # gone already, before the response started

    def write(self, chunk: bytes) -> bool:
        cycle = self.cycle
        if cycle.flow.write_paused or not chunk:
            return False
        transport = self.open_transport()
        if transport is None:
            return False
        transport.write(chunked(chunk))
        return True

    def open_transport(self) -> Any:
        """The connection's transport while the response takes body pieces written straight to
        it (``chunked``): started, chunked and not finished, the client still there; None
        otherwise. Past the cycle's HeadHolding: a chunked response's head is never held, so
        the wrapper would only add a call to every frame of the fan-out. A writer checks the
        transport's buffer before each write: ``send`` waits while it is over its high-water
        mark."""
        cycle = self.cycle
        if (
            cycle.disconnected
            or not cycle.response_started
            or cycle.response_complete
            or not cycle.chunked_encoding
        ):
            return None
        return self.protocol.transport


# The last piece framed and its framing: the hub's fan-out writes one frame to every viewer of a
# job in turn, so it is framed once, not once per viewer.
_last_chunked: tuple[bytes, bytes] = (b"", b"")


def chunked(piece: bytes) -> bytes:
    """``piece`` framed as one chunk of a chunked HTTP/1.1 body."""
    global _last_chunked
    last, framed = _last_chunked
    if piece is not last:
        framed = b"%x\r\n%b\r\n" % (len(piece), piece)
        _last_chunked = (piece, framed)
    return framed


def body_writer(scope: MutableMapping[str, Any]) -> BodyWriter | None:
    """The request's ``BodyWriter``, when it is served by ``http_protocol``'s httptools."""
    writer: BodyWriter | None = scope.get("extensions", {}).get(BODY_WRITER)
    return writer


def http_protocol(seconds: float, max_bytes: int) -> type[asyncio.Protocol]:
    """The protocol uvicorn would pick (httptools when installed, else h11), with the head's
    time and size limits."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base: type[asyncio.Protocol] = HttpToolsProtocol
    except ImportError:  # uvicorn without its [standard] extra
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    return with_head_limits(base, seconds, max_bytes)
