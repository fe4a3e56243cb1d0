"""The hub: ONE pub/sub connection per web process, fanned out to bounded subscriber buffers.

Each published event becomes two byte frames (one for job streams, one for the firehose),
encoded once and shared by every subscriber. A subscriber whose buffer is full is dropped at
once, never buffered without bound; it comes back with ``Last-Event-ID`` and replays the log.
If the pub/sub connection drops, the hub reconnects with backoff and tells every subscriber to
catch up from the log (``RESYNC``): a Redis blip loses nothing.

One timer serves every stream: heartbeats, the send timeout of stuck clients, and ending the
streams when the server shuts down (uvicorn waits for open responses before it stops).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from redis.asyncio import Redis

from stepstream.server.sse import HEARTBEAT, firehose_data, frame
from stepstream.tasks.models import TERMINAL_EVENTS, parse_stream_id

logger = logging.getLogger("stepstream.hub")

TICK_SECONDS = 0.5  # how often the timer looks for stuck sends and for a shutdown
MAX_BATCH = 100  # messages already received, fanned out together


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


RESYNC: Final = _Marker("RESYNC")  # the pub/sub connection came back: catch up from the log
CLOSE: Final = _Marker("CLOSE")  # the server is shutting down: end the stream


@dataclass(slots=True, frozen=True)
class Frame:
    job_id: str
    owner: str | None
    subject: str | None
    type: str
    job_event_id: tuple[int, int]
    firehose_id: tuple[int, int]
    job_bytes: bytes
    firehose_bytes: bytes
    terminal: bool


QueueItem = Frame | bytes | _Marker


class Subscriber:
    """A bounded buffer of items for one stream, and the one future its reader waits on.

    Lighter than an ``asyncio.Queue`` (no getter/putter deques, no unfinished-task count), and
    the reader takes everything pending at once, so a burst goes out in one write.
    """

    __slots__ = (
        "direct",
        "items",
        "job_id",
        "maxsize",
        "overflowed",
        "owner",
        "subject",
        "waiter",
    )

    def __init__(
        self, job_id: str | None, owner: str | None, maxsize: int, subject: str | None = None
    ) -> None:
        self.job_id = job_id  # None: the firehose
        self.owner = owner  # firehose only: None sees every owner's jobs
        self.subject = subject  # firehose only: None sees every subject's jobs
        self.maxsize = maxsize
        # A list, drained whole by take(): an empty one is 56 bytes, a deque's first block 600.
        self.items: list[QueueItem] = []
        self.waiter: asyncio.Future[None] | None = None
        self.overflowed = False
        # Set while the stream waits with nothing queued: writes a frame (maybe several as one,
        # starting at the given id) or a heartbeat straight to the client (True), or declines
        # it (False: queue it). See JobStream._direct.
        self.direct: Callable[[Frame | bytes, tuple[int, int]], bool] | None = None

    def offer(self, item: QueueItem) -> bool:
        """Queue ``item``; False (and nothing queued) when the buffer is full."""
        if len(self.items) >= self.maxsize:
            return False
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[QueueItem]:
        """Everything pending, waiting for an item, an overflow or a ``wake`` (maybe nothing)."""
        if not self.items and not self.overflowed:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items = self.items
        if items:
            self.items = []
        return items


class Sender(Protocol):
    """A response writing to a client, as the timer sees it (see ``server.events``)."""

    send_deadline: float  # loop time at which the send in progress is overdue; 0: not sending

    def send_timed_out(self) -> None: ...


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
        # Firehose subscribers by the (owner, subject) they see: an event is offered to the four
        # groups that may see it, not filtered against every firehose subscriber.
        self.firehose: dict[tuple[str | None, str | None], set[Subscriber]] = {}
        self.senders: set[Sender] = set()
        self.connected = asyncio.Event()
        self.closing = False
        self.dropped_slow = 0
        self.send_timeouts = 0
        self.reconnects = 0
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="hub-listen"),
            asyncio.create_task(self._timer(), name="hub-timer"),
        ]
        # Streams opened before the first subscription would miss live events: wait for it.
        try:
            await asyncio.wait_for(self.connected.wait(), timeout=10)
        except TimeoutError:
            logger.warning("hub: Redis pub/sub not connected yet; retrying in the background")

    async def stop(self) -> None:
        self.close_streams()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close_streams(self) -> None:
        """End every stream (shutdown); clients reconnect elsewhere with their cursor."""
        if not self.closing:
            self.closing = True
            self._broadcast(CLOSE, force=True)

    # -- subscribers ----------------------------------------------------------------------

    def subscribe(
        self, job_id: str | None, owner: str | None = None, subject: str | None = None
    ) -> Subscriber:
        subscriber = Subscriber(job_id, owner, self.queue_size, subject)
        if self.closing:
            subscriber.items.append(CLOSE)
        if job_id is None:
            self.firehose.setdefault((owner, subject), set()).add(subscriber)
        else:
            self.by_job.setdefault(job_id, set()).add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber.job_id is None:
            scope = (subscriber.owner, subscriber.subject)
            group = self.firehose.get(scope)
            if group is not None:
                group.discard(subscriber)
                if not group:
                    del self.firehose[scope]
            return
        subscribers = self.by_job.get(subscriber.job_id)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self.by_job[subscriber.job_id]

    @property
    def subscriber_count(self) -> int:
        groups = [*self.firehose.values(), *self.by_job.values()]
        return sum(len(group) for group in groups)

    def _offer(self, subscriber: Subscriber, item: QueueItem) -> None:
        if not subscriber.offer(item):
            self._drop(subscriber)

    def _drop(self, subscriber: Subscriber) -> None:
        # A consumer this far behind is cut off; it resumes from the log with its cursor.
        subscriber.overflowed = True
        subscriber.items.clear()
        self.dropped_slow += 1
        self.unsubscribe(subscriber)
        subscriber.wake()

    def _broadcast(self, item: QueueItem, *, force: bool = False) -> None:
        groups = [*self.firehose.values(), *self.by_job.values()]
        subscribers = [s for group in groups for s in group]
        for subscriber in subscribers:
            if force:
                subscriber.items.append(item)
                subscriber.wake()
                continue
            direct = subscriber.direct
            if (
                isinstance(item, bytes)  # a heartbeat: written straight to idle streams
                and direct is not None
                and not subscriber.items
                and direct(item, (0, 0))
            ):
                continue
            self._offer(subscriber, item)

    # -- the listener ---------------------------------------------------------------------

    def parse(self, payload: str) -> Frame:
        """One published message as the frames every subscriber shares (encoded once)."""
        message: dict[str, Any] = json.loads(payload)
        event: dict[str, Any] = message["event"]
        type_: str = event["type"]
        job_event_id: str = message["job_event_id"]
        firehose_id: str = message["firehose_id"]
        # The stored event json, byte for byte as in the log: slice it out rather than re-encode.
        event_json = payload[payload.index(',"event":') + 9 : -1]
        return Frame(
            job_id=event["job_id"],
            owner=message.get("owner"),
            subject=message.get("subject"),
            type=type_,
            job_event_id=parse_stream_id(job_event_id),
            firehose_id=parse_stream_id(firehose_id),
            job_bytes=frame(type_, event_json, job_event_id),
            firehose_bytes=frame(type_, firehose_data(event_json, job_event_id), firehose_id),
            terminal=type_ in TERMINAL_EVENTS,
        )

    def dispatch(self, payload: str) -> None:
        self.dispatch_many([payload])

    def dispatch_many(self, payloads: list[str]) -> None:
        """Fan out messages read together: under load, one write per subscriber for all."""
        frames: list[Frame] = []
        for payload in payloads:
            try:
                frames.append(self.parse(payload))
            except Exception:
                logger.exception("hub: could not parse a message")
        by_job: dict[str, list[Frame]] = {}
        for item in frames:
            by_job.setdefault(item.job_id, []).append(item)
        for job_frames in by_job.values():
            self._fan_out(job_frames)
        if self.firehose:
            for item in frames:
                # Who sees it: every owner's or its owner's jobs, of every subject or its own.
                for scope in {
                    (None, None),
                    (item.owner, None),
                    (None, item.subject),
                    (item.owner, item.subject),
                }:
                    group = self.firehose.get(scope)
                    if group:
                        for subscriber in list(group):
                            self._offer(subscriber, item)

    def _fan_out(self, frames: list[Frame]) -> None:
        """Frames of one job (in log order) to its streams."""
        subscribers = self.by_job.get(frames[0].job_id)
        if not subscribers:
            return
        if len(frames) == 1:
            direct_item = frames[0]
        else:
            # The batch as one frame for direct writes: one write per subscriber for all of it.
            last = frames[-1]
            direct_item = Frame(
                job_id=last.job_id,
                owner=last.owner,
                subject=last.subject,
                type=last.type,
                job_event_id=last.job_event_id,
                firehose_id=last.firehose_id,
                job_bytes=b"".join(f.job_bytes for f in frames),
                firehose_bytes=b"",
                terminal=any(f.terminal for f in frames),
            )
        first_id = frames[0].job_event_id
        full: list[Subscriber] = []
        # Subscriber.offer inlined: this loop runs once per subscriber per event.
        for subscriber in subscribers:
            direct = subscriber.direct
            if direct is not None and not subscriber.items and direct(direct_item, first_id):
                continue  # written straight to the client
            items = subscriber.items
            if len(items) + len(frames) > subscriber.maxsize:
                full.append(subscriber)
                continue
            items.extend(frames)
            waiter = subscriber.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        for subscriber in full:
            self._drop(subscriber)

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
                        # Take what else has arrived already: under load the fan-out writes
                        # several events to each client at once instead of one by one.
                        payloads = [message["data"]]
                        while len(payloads) < MAX_BATCH:
                            more = await pubsub.get_message(timeout=0)
                            if more is None:
                                break
                            if more["type"] != "message":
                                logger.warning("hub: unexpected %s message", more["type"])
                                continue
                            payloads.append(more["data"])
                        try:
                            self.dispatch_many(payloads)
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

    async def _timer(self) -> None:
        # One timer for every stream, instead of a ping task and a send timeout per connection.
        loop = asyncio.get_running_loop()
        next_heartbeat = loop.time() + self.heartbeat_seconds
        while True:
            await asyncio.sleep(min(TICK_SECONDS, self.heartbeat_seconds))
            now = loop.time()
            if not self.closing and _server_exiting():
                logger.info("hub: shutting down; ending %d streams", len(self.senders))
                self.close_streams()
            for sender in [s for s in self.senders if 0 < s.send_deadline < now]:
                self.send_timeouts += 1
                sender.send_timed_out()
            if now >= next_heartbeat:
                next_heartbeat = now + self.heartbeat_seconds
                self._broadcast(HEARTBEAT)


def _server_exiting() -> bool:
    """Whether uvicorn was told to exit (found through its SIGTERM handler, never patched).

    uvicorn waits for every open response before it runs the lifespan shutdown, so streams have
    to notice the signal themselves; otherwise a stop takes the whole graceful timeout.
    """
    handler: Any = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    return bool(getattr(server, "should_exit", False))
