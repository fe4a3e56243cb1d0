"""The two kinds of SSE stream: one job's log, and the firehose of every job.

Resume without gaps or duplicates: (1) register with the hub, buffering live frames, and wait
until Redis confirms the subscription to the stream's channel; (2) read the backlog from the log
after the cursor; (3) send it; (4) drain the buffered live frames, skipping ids already sent.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from functools import partial
from typing import Any, Protocol, TypeVar, cast

from stepstream._stream_id import StreamId
from stepstream.server.hub import CLOSE, NOTHING_SENT, RESYNC, Frame, Hub, Subscriber
from stepstream.server.sse import HEARTBEAT, firehose_data, frame, json_data
from stepstream.tasks.models import TERMINAL_EVENTS, JobRecord, parse_stream_id
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore

T = TypeVar("T")


class DirectWriter(Protocol):
    """The response under a stream, letting the hub write a live frame straight to the client.

    ``try_write`` is synchronous: True when the bytes went to the connection at once, False
    when its write buffer is full (the write is then pending and ``flush`` completes it).
    """

    def try_write(self, chunk: bytes) -> bool: ...

    def direct_transport(self) -> Any: ...

    async def flush(self) -> None: ...


class SharedRead:
    """One read of Redis, shared by the streams that may use it.

    A thousand viewers connecting to one job at once (a deploy's reconnect storm) need one
    record read and one snapshot frame, or one read of the log after their common cursor, not
    a thousand. A stream may use a read only if it started after the stream registered with
    the hub: then every event the read lacks reaches the stream live. ``order`` numbers
    registrations and reads in one sequence; a read not sent yet is after every registration
    so far (``PENDING``), and any stream may join it. ``encoded`` keeps what the sharers would
    each encode from the result (the frames), computed once.
    """

    __slots__ = ("done", "encoded", "order")

    def __init__(self) -> None:
        self.order = PENDING
        # (the result,) once read; None if the read failed (each sharer then reads itself).
        self.done: asyncio.Future[tuple[Any] | None] = asyncio.get_running_loop().create_future()
        self.encoded: Any = None

    @classmethod
    async def after(
        cls, key: tuple[Hashable, ...], order: int, read: Callable[[], Awaitable[T]]
    ) -> tuple[SharedRead, T]:
        """``read()``'s result from a read started after ``order``: one in flight under
        ``key``, or a new one."""
        current = _READS.get(key)
        if current is not None and current.order > order:
            # Shielded: this stream's cancellation must not cancel the others' read.
            result = await asyncio.shield(current.done)
            if result is not None:
                return current, cast(T, result[0])
        shared = cls()
        _READS[key] = shared
        try:
            # Sent one turn of the loop later: the streams that get here in the same turn (a
            # storm's connects, woken together by the record read they shared) join it. Sent at
            # once, each read would have started before the next stream registered, and a
            # storm of N resumes would cost N round trips.
            await asyncio.sleep(0)
            shared.order = next(_ORDER)
            value = await read()
        except BaseException:
            shared.done.set_result(None)
            raise
        finally:
            if _READS.get(key) is shared:
                del _READS[key]
        shared.done.set_result((value,))
        return shared, value


_ORDER = itertools.count()
PENDING = sys.maxsize  # the order of a read not sent yet: after every registration so far
_READS: dict[tuple[Hashable, ...], SharedRead] = {}  # in flight, by what they read


async def shared_record(
    store: JobStore, job_id: str, order: int
) -> tuple[SharedRead, JobRecord | None]:
    """The job's record from a read started after ``order`` (-1: any read in flight)."""
    return await SharedRead.after(("record", id(store), job_id), order, lambda: store.get(job_id))


class JobStream:
    """One job's events, from a cursor (or a snapshot) to the terminal event."""

    __slots__ = (
        "cursor",
        "hub",
        "job_id",
        "registered",
        "settings",
        "store",
        "subscriber",
        "writer",
    )

    def __init__(
        self,
        store: JobStore,
        hub: Hub,
        settings: Settings,
        record: JobRecord,
        cursor: str | None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.settings = settings
        self.job_id = record.id  # the record itself is not kept: a stream may live for hours
        self.cursor = cursor
        self.subscriber: Subscriber  # registered when the stream starts (frames)
        self.registered = -1  # SharedRead's order at registration
        self.writer: DirectWriter | None = None

    # The stream's place is its subscriber's, which the hub's fan-out moves when it writes a
    # frame to the client itself (Hub._fan_out).

    @property
    def last(self) -> StreamId:
        """The id of the last frame sent."""
        return self.subscriber.last

    @last.setter
    def last(self, value: StreamId) -> None:
        self.subscriber.last = value

    @property
    def ended(self) -> bool:
        """The job's last frame is sent, or there is none to send."""
        return self.subscriber.ended

    @ended.setter
    def ended(self, value: bool) -> None:
        self.subscriber.ended = value

    def _direct(self, item: Frame | bytes, first: StreamId) -> bool:
        """Called by the hub while this stream waits with nothing queued, for what the hub does
        not write to the connection itself: a frame or a heartbeat while the connection's send
        buffer is not empty or the response does not take raw chunks (EventStream.try_write).
        This skips waking the stream's task, the generators and the queue. False leaves
        ``item`` to the queue (frames the backlog had: the task sorts them). ``item`` may be
        several frames joined, from ``first`` to ``item.job_event_id``, or a heartbeat's bytes.
        """
        if isinstance(item, bytes):
            chunk = item  # a heartbeat
        elif first <= self.last:
            return False
        else:
            self.last = item.job_event_id
            chunk = item.job_bytes
            if item.terminal:
                self.ended = True
        assert self.writer is not None
        if not self.writer.try_write(chunk):
            # The client's buffer is full: the task completes that write (bounded by the
            # send timeout) and takes every later frame from the queue (bounded by its
            # length); at the end, it ends the response once the write is done.
            self.subscriber.direct = None
            self.subscriber.wake()
            return True
        if self.ended:
            # The hub wakes the task to end the response once every viewer has the frame.
            self.subscriber.direct = None
        return True

    async def frames(self) -> AsyncIterator[bytes]:
        self.subscriber = self.hub.subscribe(self.job_id)
        self.registered = next(_ORDER)
        try:
            # The stream's first bytes, sent with its first frames: one write per connect
            # less (a reconnect storm's cost is mostly its writes), and still sent alone if
            # the start fails.
            retry = f"retry: {self.settings.sse_retry_ms}\n\n".encode()
            try:
                # Subscribed (confirmed by Redis) before the log is read: nothing falls between.
                await self.hub.joined(self.subscriber)
                async for chunk in self._start():
                    if retry:
                        chunk, retry = retry + chunk, b""
                    yield chunk
            except Exception:
                if retry:
                    yield retry
                raise
            if retry:
                yield retry
            chunk = b""  # the snapshot (a record's size) is not kept while the stream idles
            while not self.ended:
                if self.writer is not None:
                    self.subscriber.transport = self.writer.direct_transport()
                    self.subscriber.direct = self._direct
                try:
                    items = await self.subscriber.take()
                finally:
                    self.subscriber.direct = None
                    self.subscriber.transport = None
                if self.writer is not None:
                    await self.writer.flush()
                if self.subscriber.overflowed or self.ended:
                    return  # cut off, or the terminal frame went out directly
                # Everything pending goes out in one write: under load, fewer sends.
                out: list[bytes] = []
                for item in items:
                    if isinstance(item, Frame):
                        if item.job_event_id > self.last:
                            self.last = item.job_event_id
                            out.append(item.job_bytes)
                            if item.terminal:
                                self.ended = True
                                break
                    elif item is RESYNC:
                        # The subscription holds again from now: only a read started later
                        # may serve the catch-up (one from before could miss the outage's).
                        self.registered = next(_ORDER)
                        async for chunk in self._replay():
                            out.append(chunk)
                        if self.ended:
                            break
                    elif item is CLOSE:
                        self.ended = True
                        break
                    elif item is HEARTBEAT and not out:
                        out.append(HEARTBEAT)
                if out:
                    yield out[0] if len(out) == 1 else b"".join(out)
        finally:
            self.hub.unsubscribe(self.subscriber)

    async def _start(self) -> AsyncIterator[bytes]:
        job_id = self.job_id
        if self.settings.resume_delay_seconds:
            await asyncio.sleep(self.settings.resume_delay_seconds)  # tests widen the window
        if self.cursor is None:
            async for chunk in self._snapshot():
                yield chunk
            return
        self.last = parse_stream_id(self.cursor)
        first = None
        if self.cursor != "0":
            # The trim check and the first batch in one round trip, shared by the streams
            # resuming from this cursor together (a reconnect storm's viewers).
            batch = self.settings.replay_batch
            read, (info, rows) = await SharedRead.after(
                ("resume", id(self.store), job_id, self.cursor, batch),
                self.registered,
                partial(self.store.resume, job_id, self.cursor, batch),
            )
            if info is not None and info.trimmed_after(self.last):
                yield frame("reset", json_data({"reason": "events after the cursor expired"}))
                async for chunk in self._snapshot():
                    yield chunk
                return
            first = (read, rows)
        async for chunk in self._replay(first):
            yield chunk

    async def _snapshot(self) -> AsyncIterator[bytes]:
        read, record = await shared_record(self.store, self.job_id, self.registered)
        if record is None:
            self.ended = True
            return
        snapshot_id = record.last_event_id
        if snapshot_id is not None:
            self.last = parse_stream_id(snapshot_id)
        self.ended = record.state.terminal
        if read.encoded is None:  # the snapshot frame, encoded once for every sharer
            read.encoded = frame("snapshot", record.model_dump_json(), snapshot_id)
        snapshot: bytes = read.encoded
        yield snapshot

    async def _replay(
        self, first: tuple[SharedRead, list[tuple[str, str]]] | None = None
    ) -> AsyncIterator[bytes]:
        """The log after ``self.last``, in batches; ``first``: the first batch, read already."""
        batch = self.settings.replay_batch
        after = str(self.last) if self.last >= StreamId(0, 0) else "0"
        while not self.ended:
            if first is not None:
                (read, rows), first = first, None
            else:
                read, rows = await SharedRead.after(
                    ("events", id(self.store), self.job_id, after, batch),
                    self.registered,
                    partial(self.store.read_events, self.job_id, after, batch),
                )
            if read.encoded is None:  # each row's frame, encoded once for every sharer
                read.encoded = [
                    _replay_frame(event_id, event_json) for event_id, event_json in rows
                ]
            chunks: list[bytes] = []
            for event_id, type_, encoded in read.encoded:
                chunks.append(encoded)
                after = event_id
                if type_ in TERMINAL_EVENTS:
                    self.ended = True
                    break
            if rows:
                self.last = parse_stream_id(after)
                # One write per batch: a replay of thousands of events is one syscall per batch.
                yield b"".join(chunks)
            if len(rows) < batch:
                return


class FirehoseStream:
    """Every job's events (those the caller may see), live or from a firehose cursor.

    The cursor is a position in each partition's firehose (one on one server, its stream id;
    on a cluster one id per partition, joined by ``.``: tasks/partitioned_firehose.py). Every
    frame's id is the cursor just past it: with one partition the hub's shared bytes carry it;
    with several, each stream writes its own position in front of the hub's frame."""

    __slots__ = ("cursor", "hub", "owner", "position", "settings", "store", "subject", "subscriber")

    def __init__(
        self,
        store: JobStore,
        hub: Hub,
        settings: Settings,
        cursor: str | None,
        owner: str | None = None,
        subject: str | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.settings = settings
        self.owner = owner  # None: every owner's jobs (development without a key)
        self.subject = subject  # None: every subject's jobs
        self.position: list[StreamId] = [NOTHING_SENT] * store.partitions
        self.cursor = cursor
        self.subscriber: Subscriber

    @property
    def _cursor(self) -> str:
        return ".".join(map(str, self.position))

    async def frames(self) -> AsyncIterator[bytes]:
        start = "0"
        if self.cursor is None:
            # A fresh connect starts after the newest entries at this moment. Read before the
            # hub subscription; what lands in between is read back from the log below.
            start = await self.store.firehose_head()
            if self.settings.resume_delay_seconds:
                await asyncio.sleep(self.settings.resume_delay_seconds)  # tests widen the window
        self.subscriber = self.hub.subscribe(None, self.owner, self.subject)
        single = len(self.position) == 1
        try:
            yield f"retry: {self.settings.sse_retry_ms}\n\n".encode()
            await self.hub.joined(self.subscriber)  # before the log is read, as for a job
            if self.cursor is None:
                # An id with no data moves the client's cursor without an event, so a client
                # that drops before the first event resumes from here and misses nothing.
                self.position = self.store.firehose_position(start)
                yield f"id: {start}\n\n".encode()
                async for chunk in self._replay(check_trim=False):
                    yield chunk
            else:
                if self.settings.resume_delay_seconds:
                    await asyncio.sleep(self.settings.resume_delay_seconds)
                self.position = self.store.firehose_position(self.cursor)
                async for chunk in self._replay(check_trim=self.cursor != "0"):
                    yield chunk
            position = self.position
            while True:
                items = await self.subscriber.take()
                if self.subscriber.overflowed:
                    return
                out: list[bytes] = []
                closing = False
                for item in items:
                    if isinstance(item, Frame):
                        part = item.partition
                        if item.firehose_id > position[part]:
                            position[part] = item.firehose_id
                            if single:
                                out.append(item.firehose_bytes)
                            else:
                                cursor = self._cursor.encode()
                                out.append(b"id: %s\n%s" % (cursor, item.firehose_bytes))
                    elif item is RESYNC:
                        async for chunk in self._replay(check_trim=True):
                            out.append(chunk)
                    elif item is CLOSE:
                        closing = True
                        break
                    elif item is HEARTBEAT and not out:
                        out.append(HEARTBEAT)
                if out:
                    yield out[0] if len(out) == 1 else b"".join(out)
                if closing:
                    return
        finally:
            self.hub.unsubscribe(self.subscriber)

    async def _replay(self, *, check_trim: bool) -> AsyncIterator[bytes]:
        if check_trim:
            trimmed = await self.store.firehose_trimmed(self.position)
            if trimmed:
                yield frame("reset", json_data({"reason": "events after the cursor expired"}))
                # Continue from the oldest entries kept; the client refetches GET /api/jobs.
                for part in trimmed:
                    self.position[part] = StreamId(0, 0)
        batch = self.settings.replay_batch
        after = self._cursor
        while True:
            rows, after, more = await self.store.read_firehose(
                after, batch, self.owner, self.subject
            )
            chunks: list[bytes] = []
            for entry_id, job_event_id, event_json in rows:
                type_ = _event_type(event_json)
                chunks.append(frame(type_, firehose_data(event_json, job_event_id), entry_id))
            read = self.store.firehose_position(after)
            self.position[:] = [max(a, b) for a, b in zip(self.position, read, strict=True)]
            if chunks:
                yield b"".join(chunks)
            if not more:
                return


def _replay_frame(event_id: str, event_json: str) -> tuple[str, str, bytes]:
    type_ = _event_type(event_json)
    return event_id, type_, frame(type_, event_json, event_id)


def _event_type(event_json: str) -> str:
    # Events are written by us with "type" right after "job_id": find it without a full parse.
    start = event_json.index('"type":"') + 8
    return event_json[start : event_json.index('"', start)]
