"""uvicorn's HTTP/1.1 protocol with a time limit on a request's head.

uvicorn bounds an idle keep-alive connection, but not the time a client takes to send a
request line and headers: one byte every few seconds holds a connection (and a file
descriptor) for ever. Here a connection must deliver each request's head within
``head_timeout`` seconds of opening, or of the previous response's end; otherwise it is
closed. Once a request is under way (its body, a long stream) the limit no longer applies.
"""

from __future__ import annotations

import asyncio
from typing import Any


def with_head_timeout(base: type[asyncio.Protocol], seconds: float) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's h11 or httptools protocol) with the head time limit."""

    class HeadTimeoutProtocol(base):  # type: ignore[valid-type,misc]
        head_timeout = seconds

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                self._disarm_head_timer()  # the head is in: a request is under way

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()  # the next request on this connection, if any

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

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

    return HeadTimeoutProtocol


def http_protocol(seconds: float) -> type[asyncio.Protocol]:
    """The protocol uvicorn would pick (httptools when installed, else h11), time-limited."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base: type[asyncio.Protocol] = HttpToolsProtocol
    except ImportError:  # uvicorn without its [standard] extra
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    return with_head_timeout(base, seconds)
