"""A stream's body served outside the middleware stack, once its response has started.

An ASGI app's call lasts as long as its response, so a stream served through the stack keeps
every layer's coroutine suspended for its whole life: Starlette's error and exception layers,
the router, the route, our middleware (security headers, CORS, the deadline), each with its
closures; a third of an idle stream's memory. Yet every one of them is done once the response
has started: the headers are added, the CORS answer is made, the deadline is stopped.

So a stream's request goes through the whole stack as any request does (authentication, the
limits, every error answer with its headers), and so does its response start; then the
response leaves itself in the request's ``Handoff`` and returns, the stack unwinds, and the
app's own call sends the body, straight to the server's ``send``. The stack's layers only ever
pass a body message on unchanged; the one that counts frames (``stepstream_sse_events_delivered``)
leaves its counter here instead. With tracing on, nothing is handed off: a request's span
covers its stream and counts its frames.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from stepstream.tasks import logs

if TYPE_CHECKING:
    from stepstream.server.events import EventStream

SCOPE_KEY = "stepstream.handoff"


class Handoff:
    """Set in the scope of a request that may open a stream; the stream leaves itself here."""

    __slots__ = ("counter", "stream")

    def __init__(self) -> None:
        self.stream: EventStream | None = None
        self.counter: Any = None  # the metric counting the frames sent, if any


async def through(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve the request with ``app``, then the body of a stream it handed off.

    One frame for the stream's life: what it calls while idle is the stream's own.
    """
    taker = Handoff()
    scope[SCOPE_KEY] = taker
    try:
        await app(scope, receive, send)
    except BaseException:
        if taker.stream is not None:  # started, then the stack failed: the slot is freed
            taker.stream.close()
        raise
    stream, taker.stream = taker.stream, None
    if stream is None:
        return
    job_id = scope.get("path_params", {}).get("job_id")
    # Log lines about the stream name its job, as in the stack (metrics._BindJob).
    tag = logs.tag_job(job_id) if isinstance(job_id, str) else None
    try:
        await stream.send_body(scope, receive, send, taker.counter)
    finally:
        stream.close()
        if tag is not None:
            logs.untag_job(tag)


def handoff(scope: Scope) -> Handoff | None:
    found = scope.get(SCOPE_KEY)
    return found if isinstance(found, Handoff) else None
