"""The hub: a web process's sharded pub/sub subscriptions, fanned out to bounded subscriber
buffers.

The hub subscribes (``SSUBSCRIBE``) to a job's channel only while one of its streams watches
that job, and to the firehose's channels only while one of its streams is a firehose: a web
process with no viewers receives nothing, however busy the deployment. A stream registers first
(its buffer takes live frames from then on), then waits until Redis has confirmed the
subscription, and only then reads the log for what came before (``server/streams.py``): no
event falls between.

On a standalone server the hub holds ONE connection (``server/links.py``). On a cluster it
holds one per primary that serves a channel it needs, found through the slot map
(``server/shards.py``), and opened the first time such a channel is needed.

Each published event becomes a byte frame, encoded once and shared by every subscriber. A
subscriber whose buffer is full is dropped at once, never buffered without bound; it comes back
with ``Last-Event-ID`` and replays the log. If a pub/sub connection drops, the hub reconnects
with backoff (on a cluster, to whichever node serves the slots then), subscribes again to every
channel its streams need, and tells each of their subscribers to catch up from the log
(``RESYNC``) once its channel holds again: a Redis blip or a failover loses nothing. A channel
whose slot a server gives up (it unsubscribes it by itself) is subscribed again where it lives.

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

from stepstream._stream_id import StreamId
from stepstream.server.links import RECONNECT_BACKOFF, Link
from stepstream.server.protocol import chunked
from stepstream.server.shards import OneServer, Router
from stepstream.server.sse import HEARTBEAT, firehose_data, frame
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import TERMINAL_EVENTS, parse_stream_id

logger = logging.getLogger("stepstream.hub")

TICK_SECONDS = 0.5  # how often the timer looks for stuck sends and for a shutdown


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
    """One event as a stream sends it: from a job's channel, ``job_bytes`` (a job stream's
    frame) is set; from the firehose's, ``firehose_bytes``."""

    job_id: str
    owner: str | None
    subject: str | None
    type: str
    job_event_id: StreamId
    firehose_id: StreamId
    job_bytes: bytes
    firehose_bytes: bytes
    terminal: bool
    # The firehose partition it came from (its channel's index in ``Keys.firehose_channels``).
    partition: int = 0
    # The events in ``job_bytes``: several, once the fan-out joins a burst into one write.
    events: int = 1


QueueItem = Frame | bytes | _Marker
# Before every entry, 0-0 included: a stream that has sent nothing yet.
NOTHING_SENT: Final = StreamId(-1, -1)


class Subscriber:
    """A bounded buffer of items for one stream, and the one future its reader waits on.

    Lighter than an ``asyncio.Queue`` (no getter/putter deques, no unfinished-task count), and
    the reader takes everything pending at once, so a burst goes out in one write.
    """

    __slots__ = (
        "direct",
        "ended",
        "items",
        "job_id",
        "last",
        "maxsize",
        "overflowed",
        "owner",
        "subject",
        "transport",
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
        self.direct: Callable[[Frame | bytes, StreamId], bool] | None = None
        # A job stream's place, which the fan-out reads and moves when it writes for the
        # stream: the id of the last frame sent, and whether it was the job's last.
        self.last = NOTHING_SENT
        self.ended = False
        # Set while a job stream waits with nothing queued and its connection takes raw chunks
        # (EventStream.direct_transport): the hub writes a frame or a heartbeat there itself.
        self.transport: Any = None

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


class Ending(Protocol):
    """A stream's end at a time (a token's expiry, server/guards.py), as the timer sees it."""

    deadline: float  # loop time

    def expire(self) -> None: ...


class Hub:
    def __init__(
        self,
        redis: Redis | None,
        keys: Keys,
        *,
        queue_size: int,
        heartbeat_seconds: float,
        subscribe_delay_seconds: float = 0.0,
        router: Router | None = None,
    ) -> None:
        # Where channels live: the one server of ``redis``, or a cluster's primaries.
        if router is None:
            if redis is None:
                raise ValueError("a hub needs a Redis client or a router")
            router = OneServer(redis)
        self.router: Router = router
        self.keys = keys
        self.firehose_channels = keys.firehose_channels
        self._firehose_set = frozenset(self.firehose_channels)
        self._firehose_partition = {c: p for p, c in enumerate(self.firehose_channels)}
        # The job each job channel here is for: on a cluster a channel's name starts with its
        # partition's tag, so the job cannot be cut out of it at fixed offsets.
        self._channel_jobs: dict[str, str] = {}
        self.hub_channel = keys.hub_channel
        self.queue_size = queue_size
        self.heartbeat_seconds = heartbeat_seconds
        self.subscribe_delay_seconds = subscribe_delay_seconds  # a test hook (Settings)
        self.by_job: dict[str, set[Subscriber]] = {}
        # Firehose subscribers by the (owner, subject) they see: an event is offered to the four
        # groups that may see it, not filtered against every firehose subscriber.
        self.firehose: dict[tuple[str | None, str | None], set[Subscriber]] = {}
        self.senders: set[Sender] = set()
        self.endings: set[Ending] = set()
        self.connected = asyncio.Event()
        self.closing = False
        self.dropped_slow = 0
        # SSE events written to job streams past the ``send`` chain (server/events.py), added
        # to stepstream_sse_events_delivered at each scrape.
        self.frames_written_directly = 0
        self.send_timeouts = 0
        self.reconnects = 0
        # Every channel some stream needs, with the confirmation of its subscription: done once
        # Redis has confirmed the SSUBSCRIBE in force on the current connection.
        self._ready: dict[str, asyncio.Future[None]] = {}
        # Channels whose streams were told they held, then lost (a connection dropped, a slot
        # moved): their streams catch up from the log once they hold again.
        self._lost: set[str] = set()
        self.links: dict[str, Link] = {}  # by server address
        self._routes: dict[str, Link] = {}  # each channel's link
        self._unrouted: set[str] = set()  # channels waiting for the slot map
        self._rerouter: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._closed = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._timer(), name="hub-timer")]
        standing = self.router.standing_address
        # Not needed for correctness (streams wait for their own subscriptions), but a process
        # that cannot reach Redis yet says so in its log.
        try:
            if standing is not None:
                self._link(standing)  # a standalone server's one connection, held from now on
            else:
                await asyncio.wait_for(self.router.refresh(), timeout=10)
                self._update_connected()
            await asyncio.wait_for(self.connected.wait(), timeout=10)
        except Exception as exc:
            logger.warning("hub: Redis pub/sub not connected yet (%r); retrying later", exc)

    async def stop(self) -> None:
        self.close_streams()
        tasks = [*self._tasks, *([self._rerouter] if self._rerouter is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(link.stop() for link in list(self.links.values())))

    def close_streams(self) -> None:
        """End every stream (shutdown); clients reconnect elsewhere with their cursor."""
        if not self.closing:
            self.closing = True
            if self._closed is not None and not self._closed.done():
                self._closed.set_result(None)  # streams waiting for a subscription stop waiting
            self._broadcast(CLOSE, force=True)

    # -- subscribers ----------------------------------------------------------------------

    def subscribe(
        self, job_id: str | None, owner: str | None = None, subject: str | None = None
    ) -> Subscriber:
        """Register a stream: its buffer takes live frames from now on. Its channel is
        subscribed to if no other stream here needs it; ``joined`` waits for Redis to confirm."""
        subscriber = Subscriber(job_id, owner, self.queue_size, subject)
        if self.closing:
            subscriber.items.append(CLOSE)
        if job_id is None:
            if not self.firehose:
                for channel in self.firehose_channels:
                    self._join(channel)
            self.firehose.setdefault((owner, subject), set()).add(subscriber)
        else:
            group = self.by_job.get(job_id)
            if group is None:
                group = self.by_job[job_id] = set()
                channel = self.keys.job_channel(job_id)
                self._channel_jobs[channel] = job_id
                self._join(channel)
            group.add(subscriber)
        return subscriber

    async def joined(self, subscriber: Subscriber) -> None:
        """Return once Redis has confirmed the subscriptions to ``subscriber``'s channels: every
        event published from then on reaches its buffer, so the log may be read for the events
        before (the resume order). Returns at once when the server shuts down: the stream's
        buffer holds CLOSE."""
        if subscriber.job_id is None:
            channels = self.firehose_channels
        else:
            channels = (self.keys.job_channel(subscriber.job_id),)
        while self._closed is not None and not self._closed.done():
            pending = [
                ready
                for channel in channels
                if (ready := self._ready.get(channel)) is not None and not ready.done()
            ]
            if not pending:
                return  # confirmed, or dropped already (its buffer says so)
            # asyncio.wait cancels no future when this stream is cancelled: others share them.
            await asyncio.wait((*pending, self._closed), return_when=asyncio.FIRST_COMPLETED)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber.job_id is None:
            scope = (subscriber.owner, subscriber.subject)
            group = self.firehose.get(scope)
            if group is not None:
                group.discard(subscriber)
                if not group:
                    del self.firehose[scope]
                    if not self.firehose:
                        for channel in self.firehose_channels:
                            self._leave(channel)
            return
        subscribers = self.by_job.get(subscriber.job_id)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self.by_job[subscriber.job_id]
                channel = self.keys.job_channel(subscriber.job_id)
                del self._channel_jobs[channel]
                self._leave(channel)

    @property
    def subscriber_count(self) -> int:
        groups = [*self.firehose.values(), *self.by_job.values()]
        return sum(len(group) for group in groups)

    @property
    def channels(self) -> list[str]:
        """The channels this hub's streams need now (besides its own ``hub_channel``)."""
        return list(self._ready)

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
            if isinstance(item, bytes) and not subscriber.items:
                # A heartbeat: written straight to idle streams, as the fan-out writes frames.
                transport = subscriber.transport
                if _takes_a_write(transport):
                    transport.write(chunked(item))
                    continue
                direct = subscriber.direct
                if direct is not None and direct(item, StreamId(0, 0)):
                    continue
            self._offer(subscriber, item)

    # -- subscriptions --------------------------------------------------------------------

    def _join(self, channel: str) -> None:
        """The first stream here needs ``channel``: subscribe (or wait for the reconnection)."""
        self._ready[channel] = asyncio.get_running_loop().create_future()
        self._route(channel)

    def _route(self, channel: str) -> None:
        try:
            address = self.router.address(channel)
        except LookupError:  # no slot map yet: the rerouter reads it and comes back
            self._unrouted.add(channel)
            self._reroute_soon()
            return
        link = self._link(address)
        self._routes[channel] = link
        link.join(channel, self._ready[channel])

    def _leave(self, channel: str) -> None:
        """The last stream here needing ``channel`` is gone."""
        del self._ready[channel]
        self._lost.discard(channel)
        self._unrouted.discard(channel)
        link = self._routes.pop(channel, None)
        if link is not None:
            link.leave(channel)

    def _link(self, address: str) -> Link:
        link = self.links.get(address)
        if link is None:
            standing = address == self.router.standing_address
            link = self.links[address] = Link(self, self.router, address, standing=standing)
            link.start()
        return link

    def _reroute_soon(self) -> None:
        if self._rerouter is None and not self.closing:
            self._rerouter = asyncio.create_task(self._reroute_unrouted(), name="hub-reroute")

    async def _reroute_unrouted(self) -> None:
        """Read the slot map again and subscribe to the channels that had no place."""
        failures = 0
        try:
            while self._unrouted:
                try:
                    await self.router.refresh()
                except Exception as exc:
                    logger.warning("hub: could not read the cluster's slot map (%s)", exc)
                else:
                    for channel in list(self._unrouted):
                        self._unrouted.discard(channel)
                        if channel in self._ready:
                            self._route(channel)  # back in _unrouted if still unknown
                    self._update_connected()
                if self._unrouted:
                    failures += 1
                    await asyncio.sleep(RECONNECT_BACKOFF.delay(failures))
        finally:
            self._rerouter = None

    def _update_connected(self) -> None:
        """Connected: every channel has its place and no connection that was up is down."""
        if not self._unrouted and all(
            link.up or not (link.was_up or link.standing or link.recovering)
            for link in self.links.values()
        ):
            self.connected.set()
        else:
            self.connected.clear()

    # -- what the links say (LinkOwner) ---------------------------------------------------

    def ready(self, channel: str) -> asyncio.Future[None]:
        return self._ready[channel]

    def confirmed(self, channel: str) -> None:
        if channel in self._lost:
            # Its streams were told it held, then it was lost: they catch up from the log.
            self._lost.discard(channel)
            if channel in self._firehose_set:
                for group in self.firehose.values():
                    for subscriber in list(group):
                        self._offer(subscriber, RESYNC)
            else:
                job_id = self._channel_jobs.get(channel)
                for subscriber in list(self.by_job.get(job_id, ())) if job_id else []:
                    self._offer(subscriber, RESYNC)

    def link_up(self, link: Link) -> None:
        if link.was_up or link.recovering:
            link.recovering = False
            self.reconnects += 1
            logger.info("hub: reconnected; subscribers catch up from the log")
        self._update_connected()

    def link_down(self, link: Link) -> None:
        """A connection is gone: none of its subscriptions holds until the next one confirms it."""
        loop = asyncio.get_running_loop()
        for channel in link.channels:
            if self._ready[channel].done():
                self._ready[channel] = loop.create_future()
                self._lost.add(channel)
        self._update_connected()

    def moved(self, link: Link, channel: str) -> None:
        """``link``'s server no longer serves ``channel``: subscribe where it lives now."""
        self._routes.pop(channel, None)
        if self._ready[channel].done():
            self._ready[channel] = asyncio.get_running_loop().create_future()
            self._lost.add(channel)
        self._unrouted.add(channel)
        self._update_connected()
        self._reroute_soon()

    async def reroute(self, link: Link) -> None:
        """Before ``link`` connects again: move its channels to the servers that hold them now
        (on a cluster, a replica may have taken over the slots of a dead primary)."""
        await self.router.refresh()
        for channel in list(link.channels):
            try:
                address = self.router.address(channel)
            except LookupError:
                address = None
            if address != link.address:
                link.release(channel)
                self._routes.pop(channel, None)
                if address is None:
                    self._unrouted.add(channel)
                    self._reroute_soon()
                else:
                    self._route(channel)
                    taker = self.links[address]
                    # Its coming up is this connection's coming back.
                    taker.recovering = link.was_up and not taker.up
        self._update_connected()

    def link_ended(self, link: Link) -> None:
        if self.links.get(link.address) is link:
            del self.links[link.address]
        self._update_connected()

    # -- the listener ---------------------------------------------------------------------

    def parse(self, payload: str, *, firehose: bool = False, partition: int = 0) -> Frame:
        """One published message as the frame its streams share (encoded once): a job
        stream's, or with ``firehose`` the firehose's, from ``partition``. A partitioned
        firehose's frame has no id: each stream writes its own cursor in front of it."""
        message: dict[str, Any] = json.loads(payload)
        event: dict[str, Any] = message["event"]
        type_: str = event["type"]
        job_event_id: str = message["job_event_id"]
        firehose_id: str = message["firehose_id"]
        # The stored event json, byte for byte as in the log: slice it out rather than re-encode.
        event_json = payload[payload.index(',"event":') + 9 : -1]
        if firehose:
            job_bytes = b""
            data = firehose_data(event_json, job_event_id)
            one = len(self.firehose_channels) == 1
            firehose_bytes = frame(type_, data, firehose_id if one else None)
        else:
            job_bytes = frame(type_, event_json, job_event_id)
            firehose_bytes = b""
        return Frame(
            job_id=event["job_id"],
            owner=message.get("owner"),
            subject=message.get("subject"),
            type=type_,
            job_event_id=parse_stream_id(job_event_id),
            firehose_id=parse_stream_id(firehose_id),
            job_bytes=job_bytes,
            firehose_bytes=firehose_bytes,
            terminal=type_ in TERMINAL_EVENTS,
            partition=partition,
        )

    def dispatch_many(self, messages: list[tuple[str, str]]) -> None:
        """Fan out (channel, payload) messages read together: under load, one write per
        subscriber for all."""
        by_job: dict[str, list[Frame]] = {}
        firehose: list[Frame] = []
        for channel, payload in messages:
            try:
                if channel in self._firehose_set:
                    if self.firehose:
                        part = self._firehose_partition[channel]
                        firehose.append(self.parse(payload, firehose=True, partition=part))
                elif channel in self._ready:  # not a job whose last viewer just left
                    item = self.parse(payload)
                    by_job.setdefault(item.job_id, []).append(item)
            except Exception:
                logger.exception("hub: could not parse a message")
        for job_frames in by_job.values():
            self._fan_out(job_frames)
        for item in firehose:
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
        direct_item: Frame | None
        if len(frames) == 1:
            direct_item = frames[0]
        elif any(f.terminal for f in frames[:-1]):
            direct_item = None  # events after a terminal one: each stream's task sorts them
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
                terminal=last.terminal,
                events=len(frames),
            )
        first_id = frames[0].job_event_id
        full: list[Subscriber] = []
        written = 0
        if direct_item is not None:
            straight = chunked(direct_item.job_bytes)  # framed once for every viewer
            last_id = direct_item.job_event_id
            terminal = direct_item.terminal
        # Subscriber.offer inlined: this loop runs once per subscriber per event.
        for subscriber in subscribers:
            if direct_item is not None and not subscriber.items:
                transport = subscriber.transport
                if subscriber.last < first_id and _takes_a_write(transport):
                    # The common case, in as few steps as it takes: a caught-up stream with an
                    # empty send buffer. A frame its catch-up may have had goes through the
                    # stream, which sorts it.
                    transport.write(straight)
                    subscriber.last = last_id
                    written += 1
                    if terminal:
                        # Its task, woken below, ends the response.
                        subscriber.ended = True
                        subscriber.transport = subscriber.direct = None
                    continue
                direct = subscriber.direct
                if direct is not None and direct(direct_item, first_id):
                    continue  # written (or being written) to the client by the stream
            items = subscriber.items
            if len(items) + len(frames) > subscriber.maxsize:
                full.append(subscriber)
                continue
            items.extend(frames)
            waiter = subscriber.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if direct_item is not None:
            self.frames_written_directly += written * direct_item.events
        if direct_item is not None and direct_item.terminal:
            # The end of the job: its streams' tasks end their responses, woken only now so
            # that every viewer has the terminal frame before any of that work runs.
            for subscriber in subscribers:
                subscriber.wake()
        for subscriber in full:
            self._drop(subscriber)

    async def _timer(self) -> None:
        # One timer for every stream, instead of a ping task, a send timeout and a token expiry
        # per connection.
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
            for ending in [e for e in self.endings if e.deadline <= now]:
                ending.expire()
            if now >= next_heartbeat:
                next_heartbeat = now + self.heartbeat_seconds
                self._broadcast(HEARTBEAT)


def _takes_a_write(transport: Any) -> bool:
    """A waiting stream's connection (``Subscriber.transport``) takes a write from the hub
    now: there is one, its send buffer is empty and it is open. A buffer not empty goes through
    the stream, whose writer knows the high-water mark."""
    return (
        transport is not None
        and not transport.get_write_buffer_size()
        and not transport.is_closing()
    )


def _server_exiting() -> bool:
    """Whether uvicorn was told to exit (found through its SIGTERM handler, never patched).

    uvicorn waits for every open response before it runs the lifespan shutdown, so streams have
    to notice the signal themselves; otherwise a stop takes the whole graceful timeout.
    """
    handler: Any = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    return bool(getattr(server, "should_exit", False))
