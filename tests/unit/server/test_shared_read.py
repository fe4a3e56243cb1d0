"""server/streams.py's SharedRead: which streams may use a read of Redis another stream asked for.

A stream may use a read only if the read was sent after the stream registered with the hub
(every event the read lacks then reaches the stream live). A read is sent one turn of the loop
after it is asked for, so the streams that register in that turn (a reconnect storm's) share it;
a stream registered once it was sent reads for itself.
"""

from __future__ import annotations

import asyncio
import itertools

from stepstream.server import streams
from stepstream.server.streams import SharedRead


def register() -> int:
    """A stream's registration with the hub, as JobStream.frames numbers it."""
    return next(streams._ORDER)


def test_a_read_serves_the_streams_registered_before_it_is_sent_and_no_later_one() -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        key = ("events", "test", next(itertools.count()))
        sent = asyncio.Event()
        release = asyncio.Event()
        calls = itertools.count(1)
        sent_at: list[int] = []  # each read's number, as Redis would answer it

        async def read() -> int:
            number = next(calls)
            sent_at.append(number)
            sent.set()
            await release.wait()
            return number

        first = asyncio.ensure_future(SharedRead.after(key, register(), read))
        await asyncio.sleep(0)  # the first stream asked for the read; it is not sent yet
        # A stream registering now: the read, sent later, holds everything before it.
        joined = asyncio.ensure_future(SharedRead.after(key, register(), read))
        await asyncio.wait_for(sent.wait(), timeout=5)
        # A stream registering once the read was sent: the read may lack an event this stream
        # gets neither live (published before it registered) nor from the read.
        late = asyncio.ensure_future(SharedRead.after(key, register(), read))
        release.set()
        results = await asyncio.wait_for(asyncio.gather(first, joined, late), timeout=5)
        return [value for _, value in results], sent_at

    values, sent_at = asyncio.run(scenario())
    assert values == [1, 1, 2], "the read sent after both registrations serves both; not the last"
    assert sent_at == [1, 2]


def test_a_failed_read_leaves_each_stream_that_joined_it_to_read_for_itself() -> None:
    async def scenario() -> list[str]:
        key = ("events", "test-failed", next(itertools.count()))
        calls = itertools.count(1)

        async def read() -> str:
            if next(calls) == 1:
                raise ConnectionError("Redis went away")
            return "read again"

        first = asyncio.ensure_future(SharedRead.after(key, register(), read))
        await asyncio.sleep(0)
        joined = asyncio.ensure_future(SharedRead.after(key, register(), read))
        done = await asyncio.wait_for(
            asyncio.gather(first, joined, return_exceptions=True), timeout=5
        )
        return [repr(r) if isinstance(r, BaseException) else r[1] for r in done]

    first, joined = asyncio.run(scenario())
    assert "Redis went away" in first
    assert joined == "read again"
