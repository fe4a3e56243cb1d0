"""Limits around a stream: token expiry and the number of streams an owner holds open."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from stepstream.server.auth import Principal
from stepstream.server.errors import ApiError
from stepstream.server.sse import frame, json_data
from stepstream.server.state import AppState


def open_stream(state: AppState, principal: Principal) -> None:
    """Count a stream against its owner's limit (per web process), or refuse it with 429."""
    if state.streams_by_owner[principal.owner] >= state.settings.max_streams_per_owner:
        raise ApiError(
            429,
            "too_many_streams",
            f"this owner already holds {state.settings.max_streams_per_owner} open streams",
            {"limit": state.settings.max_streams_per_owner},
            headers={"Retry-After": "5"},
        )
    state.streams_by_owner[principal.owner] += 1


async def guarded(
    state: AppState, principal: Principal, frames: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """Yield ``frames`` until they end or the caller's token expires.

    At expiry the client gets a ``token_expired`` event (no id: it moves no cursor) and the
    stream ends; it fetches a new token and reconnects with its last event id.
    """
    try:
        if principal.expires_at is None:
            async for chunk in frames:
                yield chunk
            return
        while True:
            remaining = principal.expires_at - time.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                # Only the wait for the next frame is bounded, never a send to the client.
                chunk = await asyncio.wait_for(anext(frames), remaining)
            except StopAsyncIteration:
                return
            except TimeoutError:
                yield frame("token_expired", json_data({"reason": "the stream token expired"}))
                return
            yield chunk
    finally:
        state.streams_by_owner[principal.owner] -= 1
        if state.streams_by_owner[principal.owner] <= 0:
            del state.streams_by_owner[principal.owner]
        aclose = getattr(frames, "aclose", None)
        if aclose is not None:
            await aclose()
