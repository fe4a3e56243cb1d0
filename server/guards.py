"""Limits around a stream: token expiry, and how many streams one web process holds open.

Three counts, per web process: every stream (``STEPSTREAM_MAX_STREAMS``, the memory guard);
the streams opened with one API key itself (``STEPSTREAM_MAX_STREAMS_PER_KEY``, or without
credentials in development); and those opened with one stream token
(``STEPSTREAM_MAX_STREAMS_PER_TOKEN``). A token's streams do not count against the key that
minted it: an app hands each viewer a token, and its viewers are bounded only by the process.
"""

from __future__ import annotations

import asyncio
import math
import resource
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from stepstream.server.api_errors import ApiError
from stepstream.server.auth import Principal
from stepstream.server.hub import Hub
from stepstream.server.revocation import KeyWatch
from stepstream.server.sse import frame, json_data
from stepstream.server.state import AppState

RETRY_AFTER_SECONDS = 5
# Files a web process needs besides its streams: Redis connections, logs, the listening socket.
FILE_MARGIN = 256


def raise_file_limit(max_streams: int) -> str | None:
    """Let this process open a file per stream it may hold, up to the hard limit.

    Each stream holds a socket, and the soft limit is often 1,024: past it, connections fail
    at ``accept``, before any 429 can be sent. Go's runtime raises it the same way. Returns a
    warning when even the hard limit is too low for ``max_streams``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_streams + FILE_MARGIN
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft >= needed:
        return None
    return (
        f"this web process may open {soft} files but STEPSTREAM_MAX_STREAMS is {max_streams}: "
        f"streams past about {max(soft - FILE_MARGIN, 0)} will fail to connect. Raise the "
        "limit (`ulimit -n`, systemd LimitNOFILE) or lower STEPSTREAM_MAX_STREAMS"
    )


def open_stream(state: AppState, principal: Principal) -> Callable[[], None]:
    """Count a stream against this process's limits, or refuse it with 429 naming the limit.

    Returns the release, which the response calls once, when it ends however it ends (a
    ``HEAD``, or a client gone before the first byte, never runs the stream's body).
    """
    settings = state.settings
    held = state.streams_by_holder[principal.holder]
    refusal = None
    if state.open_streams >= settings.max_streams:
        refusal = _too_many(
            "this web process", settings.max_streams, "process", "STEPSTREAM_MAX_STREAMS"
        )
    elif principal.token_scope is not None:
        if held >= settings.max_streams_per_token:
            refusal = _too_many(
                "this stream token",
                settings.max_streams_per_token,
                "token",
                "STEPSTREAM_MAX_STREAMS_PER_TOKEN",
            )
    elif held >= settings.max_streams_per_key:
        refusal = _too_many(
            "this API key" if principal.owner is not None else "callers without credentials",
            settings.max_streams_per_key,
            "key",
            "STEPSTREAM_MAX_STREAMS_PER_KEY",
        )
    if refusal is not None:
        state.streams_refused[refusal.details["per"]] += 1  # stepstream_sse_streams_refused
        raise refusal
    state.streams_by_holder[principal.holder] = held + 1
    state.open_streams += 1
    state.streams_accepted += 1  # stepstream_sse_streams_accepted
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        state.open_streams -= 1
        state.streams_by_holder[principal.holder] -= 1
        if state.streams_by_holder[principal.holder] <= 0:
            del state.streams_by_holder[principal.holder]

    return release


def _too_many(who: str, limit: int, per: str, setting: str) -> ApiError:
    return ApiError(
        429,
        "too_many_streams",
        f"{who} already holds {limit} open streams"
        f"{'' if per == 'process' else ' on this web process'} ({setting})",
        {"limit": limit, "per": per, "setting": setting},
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


EXPIRED = "the stream token expired"
REVOKED = "the API key that minted the stream token was revoked"


async def guarded(
    principal: Principal, frames: AsyncIterator[bytes], watch: KeyWatch, hub: Hub
) -> AsyncIterator[bytes]:
    """Yield ``frames`` until they end, the caller's token expires or its key is revoked.

    Then a token's stream gets a ``token_expired`` event (no id: it moves no cursor; its
    ``reason`` says which) and ends; the client fetches a new token and reconnects with its
    last event id. A stream opened with a key itself just ends: reconnecting is ``401``.
    The expiry is the hub's timer's to notice (within ``TICK_SECONDS``), not a timer per stream.
    """
    revoked = watch.watch(principal.key_digest)
    try:
        if principal.expires_at is None and revoked is None:
            async for chunk in frames:
                yield chunk
                del chunk  # not kept while the stream waits for its next frame
            return
        ending = _Ending(hub, principal.expires_at, revoked)
        try:
            while not ending.due():
                # Only the wait for the next frame is cut short, never a send to the client.
                ending.waiting = asyncio.current_task()
                try:
                    chunk = await anext(frames)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    task = ending.waiting
                    if not ending.cut or task is None or task.uncancel() > 0:
                        raise  # not (only) ours: the server's, or the send timeout's
                    break
                finally:
                    ending.waiting = None
                yield chunk
                del chunk
        finally:
            hub.endings.discard(ending)
        if principal.token_scope is not None:
            yield frame("token_expired", json_data({"reason": ending.reason}))
    finally:
        if revoked is not None and principal.key_digest is not None:
            watch.unwatch(principal.key_digest, revoked)
        aclose = getattr(frames, "aclose", None)
        if aclose is not None:
            await aclose()


class _Ending:
    """What ends a stream before its frames do: its token's expiry, its key's revocation.

    Held in ``hub.endings``, whose timer calls ``expire`` once ``deadline`` has passed: the wait
    for a frame in progress is cancelled (and the stream ends), or the stream ends before the
    next one. A revocation does the same at once.
    """

    __slots__ = ("cut", "deadline", "loop", "reason", "waiting")

    def __init__(
        self, hub: Hub, expires_at: float | None, revoked: asyncio.Future[None] | None
    ) -> None:
        self.loop = asyncio.get_running_loop()
        # In loop time, which the hub's timer uses; the token's expiry is wall-clock.
        self.deadline = (
            math.inf if expires_at is None else self.loop.time() + expires_at - time.time()
        )
        self.reason = EXPIRED
        self.waiting: asyncio.Task[Any] | None = None  # the task, while it waits for a frame
        self.cut = False
        if expires_at is not None:
            hub.endings.add(self)
        if revoked is not None:
            revoked.add_done_callback(self._revoked)

    def due(self) -> bool:
        return self.deadline <= self.loop.time()

    def expire(self) -> None:
        if self.waiting is not None and not self.cut:
            self.cut = True
            self.waiting.cancel()

    def _revoked(self, _: asyncio.Future[None]) -> None:
        self.reason = REVOKED
        self.deadline = self.loop.time()
        self.expire()
