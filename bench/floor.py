"""The floor: the least a server can do to deliver a job's events over SSE, on this machine.

No framework, no Redis client, no per-stream task: one uvloop process, one raw RESP connection
subscribed to each watched job's channel (the channel Stepstream's append script publishes to),
and for each published message one frame, sliced out of the payload and written to every
socket with ``transport.write``. A terminal event's frame is written, then the socket closed.
It has no replay, no auth, no limits, no heartbeats: it measures the cost of the machine
(pub/sub delivery, the syscalls, the client), not of a design.

``python -m bench.floor --port P`` (``bench.fanout`` starts it, next to Stepstream and the
lean recipe, for the same client and the same worker).

- ``GET /events/{job_id}``: the job's live events; ``retry:`` is sent once the subscription to
  its channel is confirmed (the stream is live from then on).
- ``GET /readyz``: 200 once the Redis connection is up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from typing import cast
from urllib.parse import urlsplit

import uvloop

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("STEPSTREAM_PREFIX", "stepstream:")
TERMINAL = (b'"type":"completed"', b'"type":"failed"', b'"type":"cancelled"')
HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"connection: close\r\n\r\n"
)
READY = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class Floor:
    def __init__(self) -> None:
        self.viewers: dict[bytes, list[asyncio.Transport]] = {}  # channel -> sockets, live
        self.waiting: dict[bytes, list[asyncio.Transport]] = {}  # channel -> not confirmed yet
        self.redis: asyncio.Transport | None = None

    def watch(self, job_id: str, transport: asyncio.Transport) -> None:
        channel = f"{PREFIX}job:{{{job_id}}}:live".encode()
        transport.write(HEAD)
        if channel in self.viewers:
            self.viewers[channel].append(transport)
            transport.write(b"retry: 2000\n\n")
            return
        pending = self.waiting.get(channel)
        if pending is None:
            self.waiting[channel] = [transport]
            assert self.redis is not None
            self.redis.write(b"*2\r\n$10\r\nSSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(channel), channel))
        else:
            pending.append(transport)

    def confirmed(self, channel: bytes) -> None:
        transports = self.waiting.pop(channel, [])
        self.viewers.setdefault(channel, []).extend(transports)
        for transport in transports:
            transport.write(b"retry: 2000\n\n")

    def message(self, channel: bytes, payload: bytes) -> None:
        # {"job_event_id":"<id>","firehose_id":...,"event":{...,"type":"<t>",...}}
        id_start = payload.index(b'"job_event_id":"') + 16
        event_id = payload[id_start : payload.index(b'"', id_start)]
        event = payload[payload.index(b',"event":') + 9 : -1]
        type_start = event.index(b'"type":"') + 8
        type_ = event[type_start : event.index(b'"', type_start)]
        chunk = b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id, type_, event)
        transports = self.viewers.get(channel, ())
        for transport in transports:
            transport.write(chunk)
        if any(marker in event for marker in TERMINAL):
            for transport in transports:
                transport.close()
            self.viewers.pop(channel, None)


class RespSubscriber(asyncio.Protocol):
    """Reads sharded pub/sub pushes: ``*3 $smessage $<channel> $<payload>`` and ``ssubscribe``
    replies."""

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            parsed = self._one()
            if parsed is None:
                return
            kind, channel, payload = parsed
            if kind == b"smessage":
                self.floor.message(channel, payload)
            elif kind == b"ssubscribe":
                self.floor.confirmed(channel)

    def _one(self) -> tuple[bytes, bytes, bytes] | None:
        buf = self.buffer
        if not buf:
            return None
        pos = buf.find(b"\r\n")
        if pos < 0:
            return None
        count = int(buf[1:pos])
        parts: list[bytes] = []
        for _ in range(count):
            start = pos + 2
            end = buf.find(b"\r\n", start)
            if end < 0:
                return None
            if buf[start : start + 1] == b":":
                parts.append(bytes(buf[start + 1 : end]))
                pos = end
                continue
            size = int(buf[start + 1 : end])
            if len(buf) < end + 2 + size + 2:
                return None
            parts.append(bytes(buf[end + 2 : end + 2 + size]))
            pos = end + 2 + size
        del buf[: pos + 2]
        return parts[0], parts[1], parts[2] if len(parts) > 2 else b""


class Viewer(asyncio.Protocol):
    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.head = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small frames go out at once, as uvicorn's do
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.head is None:
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        path = self.head.split(b" ", 2)[1].decode()
        self.head = None  # type: ignore[assignment]
        assert self.transport is not None
        if path.startswith("/events/"):
            self.floor.watch(path[len("/events/") :], self.transport)
        elif path == "/readyz":
            self.transport.write(READY)
            self.transport.close()
        else:
            self.transport.write(NOT_FOUND)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for group in (*self.floor.viewers.values(), *self.floor.waiting.values()):
            if self.transport in group:
                group.remove(self.transport)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    floor = Floor()
    url = urlsplit(REDIS_URL)
    floor.redis, _ = await loop.create_connection(
        lambda: RespSubscriber(floor), url.hostname or "127.0.0.1", url.port or 6379
    )
    server = await loop.create_server(lambda: Viewer(floor), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
