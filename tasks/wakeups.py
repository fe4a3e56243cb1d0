"""What ends an idle worker's wait between queue polls: a queue entry announced on the queue's
wake-up channel (tasks/queue.py), one of the worker's own job slots coming free, or the poll
delay running out.

The announcements are a shortcut, not the record. The queue (arq's sorted set) is the record, and
the timed poll finds whatever no message announced: an entry due later, an arq retry, a message
published while this worker was not subscribed. A lost message costs at most one poll delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis

logger = logging.getLogger("stepstream.worker")

# After losing the subscription (the client's own retries gave up): wait this long before
# subscribing again. The timed poll goes on meanwhile.
RESUBSCRIBE_SECONDS = 1.0


class Wakeups:
    def __init__(self, channel: str, poll_delay: float) -> None:
        self.channel = channel
        self.poll_delay = poll_delay
        self._event = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        """Until a wake-up (one that came since the last wait counts) or ``poll_delay``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), self.poll_delay)
        self._event.clear()

    def listen(self, redis: Redis) -> None:
        """Subscribe to the channel on a connection of its own, in the background."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(redis), name="queue-wakeups")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    async def _listen(self, redis: Redis) -> None:
        while True:
            pubsub = redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                async for _ in pubsub.listen():
                    # An announcement, or Redis confirming the subscription (the first time, or
                    # again after the client reconnected): what was announced while this worker
                    # was not subscribed went to nobody, so a poll is due either way.
                    self.wake()
            except Exception:
                logger.warning(
                    "lost the queue's wake-ups; polling every %g s until they are back",
                    self.poll_delay,
                    exc_info=True,
                )
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RESUBSCRIBE_SECONDS)
