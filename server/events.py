"""The SSE endpoints: one job's events, and the firehose."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from server.auth import FIREHOSE_SCOPE
from server.errors import ApiError
from server.guards import guarded, open_stream
from server.jobs import load_job
from server.state import AppState
from server.streams import FirehoseStream, JobStream
from tasks.models import parse_stream_id

SSE_HEADERS = {"Cache-Control": "no-cache"}


def read_cursor(request: Request) -> str | None:
    """``Last-Event-ID`` wins over ``?after=``: EventSource keeps its first URL on reconnect."""
    raw = request.headers.get("last-event-id") or request.query_params.get("after")
    if raw is None or raw == "":
        return None
    try:
        parse_stream_id(raw)
    except ValueError:
        raise ApiError(
            400, "bad_cursor", f"{raw!r} is not an event id (`0` or `<ms>-<seq>`)"
        ) from None
    return raw


def sse_response(state: AppState, body: AsyncIterator[bytes]) -> Response:
    return EventSourceResponse(
        body,
        ping=0,  # the hub sends one heartbeat for all streams
        send_timeout=state.settings.send_timeout_seconds,
        headers=SSE_HEADERS,
    )


async def job_events(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    principal = await state.auth.authenticate(request, allow_token=True)
    cursor = read_cursor(request)
    record = await load_job(request, principal)
    if cursor is not None and record.state.terminal and cursor == record.last_event_id:
        return Response(status_code=204)  # the standard's "stop reconnecting"
    open_stream(state, principal)
    stream = JobStream(state.store, state.hub, state.settings, record, cursor)
    return sse_response(state, guarded(state, principal, stream.frames()))


async def firehose(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    principal = await state.auth.authenticate(request, allow_token=True)
    if principal.token_scope not in (None, FIREHOSE_SCOPE):
        raise ApiError(401, "token_scope", "this token opens one job's stream, not the firehose")
    cursor = read_cursor(request)
    open_stream(state, principal)
    stream = FirehoseStream(state.store, state.hub, state.settings, cursor, principal.owner)
    return sse_response(state, guarded(state, principal, stream.frames()))
