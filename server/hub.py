"""The hub: ONE pub/sub connection per web process, fanned out to bounded subscriber queues.

Each published event becomes two byte frames (one for job streams, one for the firehose),
encoded once and shared by every subscriber. A subscriber whose queue is full is dropped at
once, never buffered without bound; it comes back with ``Last-Event-ID`` and replays the log.
If the pub/sub connection drops, the hub reconnects with backoff and tells every subscriber to
catch up from the log (``RESYNC``): a Redis blip loses nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis

from server.sse import HEARTBEAT, firehose_data, frame
from tasks.models import TERMINAL_EVENTS, parse_stream_id

logger = logging.getLogger("stepstream.hub")


class _Resync:
    """Marker queued to every subscriber after the pub/sub connection came back."""


RESYNC: Final = _Resync()


@dataclass(slots=True, frozen=True)
class Frame:
    job_id: str
    owner: str | None
    type: str
    job_event_id: tuple[int, int]
    firehose_id: tuple[int, int]
    job_bytes: bytes
    firehose_bytes: bytes
    terminal: bool


QueueItem = Frame | bytes | _Resync


class Subscriber:
    __slots__ = ("job_id", "overflowed", "owner", "queue")

    def __init__(self, job_id: str | None, owner: str | None, maxsize: int) -> None:
        self.job_id = job_id  # None: the firehose
        self.owner = owner  # firehose only: None sees every job
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue(maxsize)
        self.overflowed = False


class Hub:
    def __init__(
        self,
        redis: Redis,
        channel: str,
        *,
        queue_size: int,
        heartbeat_seconds: float,
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.queue_size = queue_size
        self.heartbeat_seconds = heartbeat_seconds
        self.by_job: dict[str, set[Subscriber]] = {}
        self.firehose: set[Subscriber] = set()
        self.connected = asyncio.Event()
        self.dropped_slow = 0
        self.reconnects = 0
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="hub-listen"),
            asyncio.create_task(self._heartbeat(), name="hub-heartbeat"),
        ]
        # Streams opened before the first subscription would miss live events: wait for it.
        try:
            await asyncio.wait_for(self.connected.wait(), timeout=10)
        except TimeoutError:
            logger.warning("hub: Redis pub/sub not connected yet; retrying in the background")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- subscribers ----------------------------------------------------------------------

    def subscribe(self, job_id: str | None, owner: str | None = None) -> Subscriber:
        subscriber = Subscriber(job_id, owner, self.queue_size)
        if job_id is None:
            self.firehose.add(subscriber)
        else:
            self.by_job.setdefault(job_id, set()).add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber.job_id is None:
            self.firehose.discard(subscriber)
            return
        subscribers = self.by_job.get(subscriber.job_id)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self.by_job[subscriber.job_id]

    @property
    def subscriber_count(self) -> int:
        return len(self.firehose) + sum(len(s) for s in self.by_job.values())

    def _offer(self, subscriber: Subscriber, item: QueueItem) -> None:
        try:
            subscriber.queue.put_nowait(item)
        except asyncio.QueueFull:
            # A consumer this far behind is cut off; it resumes from the log with its cursor.
            subscriber.overflowed = True
            self.dropped_slow += 1
            self.unsubscribe(subscriber)

    def _broadcast(self, item: QueueItem) -> None:
        for subscriber in list(self.firehose):
            self._offer(subscriber, item)
        for subscribers in list(self.by_job.values()):
            for subscriber in list(subscribers):
                self._offer(subscriber, item)

    # -- the listener ---------------------------------------------------------------------

    def dispatch(self, payload: str) -> None:
        message: dict[str, Any] = json.loads(payload)
        event: dict[str, Any] = message["event"]
        job_id: str = event["job_id"]
        type_: str = event["type"]
        job_event_id: str = message["job_event_id"]
        firehose_id: str = message["firehose_id"]
        # The stored event json, byte for byte as in the log: slice it out rather than re-encode.
        event_json = payload[payload.index(',"event":') + 9 : -1]
        item = Frame(
            job_id=job_id,
            owner=message.get("owner"),
            type=type_,
            job_event_id=parse_stream_id(job_event_id),
            firehose_id=parse_stream_id(firehose_id),
            job_bytes=frame(type_, event_json, job_event_id),
            firehose_bytes=frame(type_, firehose_data(event_json, job_event_id), firehose_id),
            terminal=type_ in TERMINAL_EVENTS,
        )
        for subscriber in list(self.by_job.get(job_id, ())):
            self._offer(subscriber, item)
        for subscriber in list(self.firehose):
            if subscriber.owner is None or subscriber.owner == item.owner:
                self._offer(subscriber, item)

    async def _listen(self) -> None:
        delay = 0.1
        first = True
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Only once Redis confirms the subscription is every later event sure
                        # to reach us; then subscribers may read the log for what came before.
                        if not first:
                            self.reconnects += 1
                            logger.info("hub: reconnected; subscribers catch up from the log")
                            self._broadcast(RESYNC)
                        first = False
                        delay = 0.1
                        self.connected.set()
                    elif message["type"] == "message":
                        try:
                            self.dispatch(message["data"])
                        except Exception:
                            logger.exception("hub: could not dispatch a message")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                logger.warning("hub: pub/sub connection lost (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except Exception:
                    logger.debug("hub: closing the pub/sub failed", exc_info=True)

    async def _heartbeat(self) -> None:
        # One timer for every stream, instead of a ping task per connection.
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            self._broadcast(HEARTBEAT)
