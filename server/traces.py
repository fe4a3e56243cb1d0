"""Spans of the web process (docs/observability.md): one per API request, named by its route.

Installed by ``create_app`` only when tracing is on (tasks/tracing.py), so a process without
it pays nothing. A request's span records its method, path, route template and status, and
never its query string or headers: a stream token travels as ``?token=`` and an API key in
``Authorization``, and neither may reach a trace. A stream is one span for its whole
connection, with the events it sent and whether it resumed from a cursor.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stepstream.tasks import tracing

STREAM_ROUTES = frozenset({"/api/jobs/{job_id}/events", "/api/events"})


class RequestSpans:
    """ASGI middleware: a server span around each HTTP request, the child of the caller's
    ``traceparent`` (or of the host app's span, mounted in an instrumented app)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in (b"traceparent", b"tracestate")
        }
        # Named by the method until the router finds the route (``name_routes``); a path
        # that matches no route keeps that name, so raw paths never become span names.
        span = tracing.start_span(
            method,
            {"http.request.method": method, "url.path": scope["path"]},
            parent=tracing.incoming(headers),
            kind="server",
        )

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                span.set({"http.response.status_code": message["status"]})
                if message["status"] >= 500:
                    span.set({"error.type": str(message["status"])})
            await send(message)

        try:
            with span.current():
                await self.app(scope, receive, sending)
        except Exception as exc:
            span.fail(exc)
            raise
        finally:
            span.end()


def name_routes(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """Wrap each route so that its request's span is named ``METHOD /route/{template}``."""
    for route in routes:
        if isinstance(route, Route):
            route.app = _RouteName(route.app, route.path, stream=route.path in STREAM_ROUTES)
    return list(routes)


class _RouteName:
    def __init__(self, app: ASGIApp, template: str, *, stream: bool) -> None:
        self.app = app
        self.template = template
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope.get("root_path", "") + self.template
        tracing.rename_current(f"{scope['method']} {route}", {"http.route": route})
        if not self.stream:
            await self.app(scope, receive, send)
            return
        sent = 0

        async def counting(message: Message) -> None:
            nonlocal sent
            await send(message)
            if message["type"] == "http.response.body":
                sent += frames_in(message.get("body", b""))

        try:
            await self.app(scope, receive, counting)
        finally:
            tracing.annotate_current(
                {
                    "stepstream.stream.events_sent": sent,
                    "stepstream.stream.resumed": _resumed(scope),
                }
            )


def frames_in(chunk: bytes) -> int:
    """The SSE events in a chunk a stream sends (not comments, not the ``retry:`` frame): each
    has exactly one line starting with ``event:``, and its JSON data has no raw newline."""
    return chunk.count(b"\nevent: ") + chunk.startswith(b"event: ")


def _resumed(scope: Scope) -> bool:
    """The connection continues from a cursor (``Last-Event-ID``, or ``?after=``)."""
    if any(name == b"last-event-id" for name, _ in scope["headers"]):
        return True
    query: bytes = scope.get("query_string", b"")
    return query.startswith(b"after=") or b"&after=" in query
