"""A light load generator: thousands of HTTP/SSE connections per process, no task per connection.

Run by the benchmarks as a separate process (``python -m bench.loadgen MODE ...``); it talks to
its parent through stdout, one JSON object per line:

- ``sse``: open ``--count`` streams to ``--path`` (``Connection: close``, so a stream that ends
  closes its socket). Prints ``{"ready": ...}`` once every stream has its first frame (the
  ``retry:`` field, or ``--ready-marker``) or was closed without it (a refusal: its status is in
  the result), then reads until every stream closed or ``--deadline`` passed, and prints the
  result. Each ``data_received`` only records ``(time, bytes)``; frames are parsed after the
  run, so parsing never delays receipt. With ``--tokens-file``, stream ``i`` adds
  ``token=<line i>`` to the path's query (one stream token per viewer).
- ``poll``: ``--count`` keep-alive connections each GET ``--path`` every ``--interval`` seconds
  (random phase) for ``--duration`` seconds; records ``(time, last_event_id)`` per response.
- ``post``: ``--concurrency`` keep-alive connections POST ``--body`` to ``--path`` back to back
  for ``--duration`` seconds; records each request's latency.

Every timestamp is ``time.time()`` (the same clock as the ``at`` field of events, same machine).
Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import resource
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import uvloop

HOST = "127.0.0.1"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- SSE -------------------------------------------------------------------------------------


class SseClient(asyncio.Protocol):
    __slots__ = ("chunks", "closed", "marker", "on_close", "on_ready", "ready", "transport")

    def __init__(self, on_ready: Any, on_close: Any, marker: bytes) -> None:
        self.marker = marker
        self.chunks: list[tuple[float, bytes]] = []
        self.ready = False
        self.closed = False
        self.on_ready = on_ready
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.chunks.append((time.time(), data))
        if not self.ready and self.marker in data:
            self.ready = True
            self.on_ready()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.on_close(self.ready)


_at_cache: dict[bytes, float] = {}


def at_epoch(raw: bytes) -> float:
    value = _at_cache.get(raw)
    if value is None:
        value = datetime.fromisoformat(raw.decode().replace("Z", "+00:00")).timestamp()
        _at_cache[raw] = value
    return value


def parse_frames(
    chunks: list[tuple[float, bytes]],
) -> tuple[int, list[tuple[float, str | None, str, bytes]]]:
    """HTTP status and every SSE frame as (time its last byte arrived, id, event, data)."""
    # Imported here, after the run: the client's modules (pydantic) cost the run nothing.
    from stepstream._sse import decode_frame

    raw = b"".join(data for _, data in chunks)
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        return 0, []
    status = int(raw[9:12])
    head = raw[:head_end].lower()
    body_start = head_end + 4
    # Map every body byte offset back to the time its chunk arrived.
    ends: list[tuple[int, float]] = []
    offset = 0
    for t, data in chunks:
        offset += len(data)
        ends.append((offset, t))
    body = raw[body_start:]
    if b"transfer-encoding: chunked" in head:
        # Keep offsets: decode chunk by chunk, remembering where each payload byte came from.
        payload = bytearray()
        origin: list[tuple[int, int]] = []  # (payload offset, raw offset of its end)
        pos = 0
        while True:
            line_end = body.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(body[pos:line_end].split(b";")[0] or b"0", 16)
            if size == 0:
                break
            start = line_end + 2
            piece = body[start : start + size]
            payload += piece
            origin.append((len(payload), body_start + start + len(piece)))
            pos = start + size + 2
    else:
        # Not chunked (a body closed by the connection's end): payload offset = body offset.
        payload = bytearray(body)
        origin = []

    frames: list[tuple[float, str | None, str, bytes]] = []
    src = bytes(payload)
    crlf = b"\r\n" in src  # sse-starlette separates lines with CRLF, we use LF
    sep = b"\r\n\r\n" if crlf else b"\n\n"
    pos = 0
    oi = 0
    ei = 0
    while True:
        end = src.find(sep, pos)
        if end < 0:
            break
        frame_end = end + len(sep)
        if origin:
            while oi < len(origin) and origin[oi][0] < frame_end:
                oi += 1
            raw_end = origin[min(oi, len(origin) - 1)][1]
        else:
            raw_end = body_start + frame_end
        while ei < len(ends) and ends[ei][0] < raw_end:
            ei += 1
        t = ends[min(ei, len(ends) - 1)][1]
        sse = decode_frame(src[pos:end].decode().replace("\r\n", "\n").split("\n"))
        if sse is not None and (sse.data or sse.event != "message"):
            frames.append((t, sse.id or None, sse.event, sse.data.encode()))
        pos = frame_end
    return status, frames


def event_at(data: bytes) -> float | None:
    key = data.find(b'"at":')
    if key < 0:
        return None
    start = data.index(b'"', key + 5) + 1  # compact JSON or json.dumps' ": "
    return at_epoch(data[start : data.index(b'"', start)])


def read_tokens(path: str, count: int) -> list[str]:
    tokens = Path(path).read_text(encoding="ascii").split()
    if len(tokens) < count:
        raise SystemExit(f"{path} holds {len(tokens)} tokens for {count} streams")
    return tokens


async def run_sse(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    clients: list[SseClient] = []
    ready = 0
    open_count = 0
    all_ready = asyncio.Event()
    all_closed = asyncio.Event()

    failed = 0
    closed_early = 0

    def settled() -> None:
        if ready + closed_early + failed >= args.count:
            all_ready.set()

    def on_ready() -> None:
        nonlocal ready
        ready += 1
        settled()

    def on_close(was_ready: bool) -> None:
        nonlocal open_count, closed_early
        open_count -= 1
        if not was_ready:
            closed_early += 1  # refused (e.g. 429) or cut off: it will never be ready
            settled()
        if open_count <= 0 and len(clients) >= args.count:
            all_closed.set()

    headers = "".join(f"{h}\r\n" for h in args.header)
    tokens = read_tokens(args.tokens_file, args.count) if args.tokens_file else None

    def request(index: int) -> bytes:
        path = args.path
        if tokens is not None:
            path += ("&" if "?" in path else "?") + "token=" + tokens[index]
        return (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n"
            f"Connection: close\r\n{headers}\r\n"
        ).encode()

    gate = asyncio.Semaphore(args.connect_concurrency)
    marker = args.ready_marker.encode()

    async def connect_one(index: int) -> None:
        nonlocal open_count, failed
        async with gate:
            for attempt in range(3):
                try:
                    transport, client = await asyncio.wait_for(
                        loop.create_connection(
                            lambda: SseClient(on_ready, on_close, marker), HOST, args.port
                        ),
                        timeout=10,
                    )
                    break
                except (OSError, TimeoutError):
                    if attempt == 2:
                        failed += 1
                        return
                    await asyncio.sleep(0.2)
            open_count += 1
            clients.append(client)
            transport.write(request(index))

    started = time.time()
    await asyncio.gather(*(connect_one(i) for i in range(args.count)))
    connected = time.time()
    settled()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_ready.wait(), timeout=args.ready_timeout)
    emit(
        {
            "ready": ready,
            "failed": failed,
            "closed_early": closed_early,
            "connect_s": connected - started,
            "ready_s": time.time() - started,
        }
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_closed.wait(), timeout=args.deadline)
    still_open = sum(1 for c in clients if not c.closed)
    for client in clients:
        if client.transport is not None and not client.closed:
            client.transport.abort()

    latencies: list[float] = []
    by_type: dict[str, list[float]] = {}
    per_stream: list[int] = []
    samples: list[list[str]] = []
    statuses: dict[int, int] = {}
    for client in clients:
        status, frames = parse_frames(client.chunks)
        statuses[status] = statuses.get(status, 0) + 1
        n = 0
        for t, _id, event, data in frames:
            if args.by_type and event != "snapshot":
                at = event_at(data)
                if at is not None:
                    by_type.setdefault(event, []).append(round((t - at) * 1000, 3))
            if event == args.expect_type and args.token_times:
                # Each word of the event's text is the time its token was written (bench.output).
                for word in json.loads(data).get("text", "").split():
                    latencies.append(round((t - float(word)) * 1000, 3))
                    n += 1
            elif event == args.expect_type:
                at = event_at(data)
                if at is not None:
                    latencies.append(round((t - at) * 1000, 3))
                    n += 1
        per_stream.append(n)
        if len(samples) < 4:
            samples.append([f"{event}:{event_id}" for _, event_id, event, _ in frames])
    emit(
        {
            "latencies_ms": latencies,
            "latencies_by_type": by_type,
            "per_stream": per_stream,
            "statuses": statuses,
            "still_open": still_open,
            "samples": samples,
        }
    )


# -- a reconnect storm -------------------------------------------------------------------------

_ID = re.compile(rb"(?:^|\n)id: ([0-9]+-[0-9]+)\n")
_RETRY = re.compile(rb"(?:^|\n)retry: ([0-9]+)\n")


class StormClient(asyncio.Protocol):
    """One viewer's connection; the bytes it got, and when its first event id arrived."""

    __slots__ = ("chunks", "first_id_at", "index", "marker", "on_lost", "on_ready", "transport")

    def __init__(self, index: int, on_lost: Any, on_ready: Any, marker: bytes) -> None:
        self.index = index
        self.on_lost = on_lost
        self.on_ready = on_ready  # None once called, or for a second connection
        self.marker = marker
        self.chunks: list[bytes] = []
        self.first_id_at: float | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.first_id_at is None and b"id: " in data:
            self.first_id_at = time.time()
        if self.on_ready is not None and self.marker in data:
            self.on_ready()
            self.on_ready = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(self)


async def run_storm(args: argparse.Namespace) -> None:
    """``--count`` viewers of ``--path`` on ``--port``; when a connection drops, the viewer
    reconnects to ``--port2`` with ``Last-Event-ID`` at once, as Stepstream's clients do after a
    stream that worked (``--wait-retry``: after the stream's ``retry:`` times a random 0.8-1.0,
    as they do when that first try finds nothing listening); a reconnect refused or closed
    before its first event is tried again with the clients' backoff. Prints ``{"ready"}`` once
    every first connection has its ``--ready-marker``, then, once every viewer's last
    connection closed or ``--deadline`` passed, each viewer's event ids in order and when its
    first connection to ``--port2`` that delivered got its first event id."""
    loop = asyncio.get_running_loop()
    ids: list[list[str]] = [[] for _ in range(args.count)]
    relive_at: list[float | None] = [None] * args.count
    lost_at: list[float | None] = [None] * args.count
    failures = [0] * args.count  # reconnects that ended before their first event
    retry_ms = [2000] * args.count  # the stream's retry: field, as last seen
    give_up_at = time.time() + args.deadline - 5
    statuses: dict[str, int] = {}
    ready = 0
    all_ready = asyncio.Event()
    done = 0
    all_done = asyncio.Event()
    marker = args.ready_marker.encode()
    gate = asyncio.Semaphore(args.connect_concurrency)
    headers = "".join(f"{h}\r\n" for h in args.header)

    def request(last_id: str | None) -> bytes:
        resume = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
        return (
            f"GET {args.path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n"
            f"Connection: close\r\n{resume}{headers}\r\n"
        ).encode()

    def on_lost(client: StormClient) -> None:
        nonlocal done
        index = client.index
        raw = b"".join(client.chunks)
        status = raw[9:12].decode() if raw.startswith(b"HTTP/") else "none"
        statuses[status] = statuses.get(status, 0) + 1
        ids[index] += [m.group(1).decode() for m in _ID.finditer(raw)]
        retry = _RETRY.search(raw)
        if retry:
            retry_ms[index] = int(retry.group(1))
        first = lost_at[index] is None
        if first:  # the first connection: the server went away
            lost_at[index] = time.time()
        elif client.first_id_at is None and time.time() < give_up_at:
            # Refused or closed before its first event: tried again, as Stepstream's clients do
            # (the stream's retry, doubled per failure up to 30 s, at least any Retry-After).
            failures[index] += 1
            head = raw.split(b"\r\n\r\n", 1)[0].lower()
            after = re.search(rb"\nretry-after: ([0-9]+)", head)
            backoff = min(30.0, retry_ms[index] / 1000 * 2 ** (failures[index] - 1))
            wait = max(backoff * random.uniform(0.8, 1.0), int(after.group(1)) if after else 0)
            last = ids[index][-1] if ids[index] else None
            loop.call_later(wait, lambda: loop.create_task(connect(index, last)))
            return
        if first:
            # A stream that worked: Stepstream's clients come back at once (Reconnector.dropped,
            # static/stepstream.js Backoff.dropped). --wait-retry: that first try found nothing
            # listening (a lone process restarting in place), so they wait retry: x 0.8-1.0.
            delay = retry_ms[index] / 1000 * random.uniform(0.8, 1.0) if args.wait_retry else 0.0
            last = ids[index][-1] if ids[index] else None
            loop.call_later(delay, lambda: loop.create_task(connect(index, last)))
            return
        relive_at[index] = client.first_id_at
        done += 1
        if done >= args.count:
            all_done.set()

    def on_ready() -> None:
        nonlocal ready
        ready += 1
        if ready >= args.count:
            all_ready.set()

    async def connect(index: int, last_id: str | None) -> None:
        first = lost_at[index] is None
        port = args.port if first else args.port2
        signal_ready = on_ready if first else None
        async with gate:
            for attempt in range(20):
                try:
                    transport, _ = await asyncio.wait_for(
                        loop.create_connection(
                            lambda: StormClient(index, on_lost, signal_ready, marker),
                            HOST,
                            port,
                        ),
                        timeout=10,
                    )
                    break
                except (OSError, TimeoutError):
                    if attempt == 19:
                        return
                    await asyncio.sleep(0.2)
            transport.write(request(last_id))

    await asyncio.gather(*(connect(i, None) for i in range(args.count)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_ready.wait(), timeout=args.ready_timeout)
    emit({"ready": ready})
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_done.wait(), timeout=args.deadline)
    emit(
        {
            "ids": ids,
            "lost_at": lost_at,
            "relive_at": relive_at,
            "statuses": statuses,
            "done": done,
        }
    )


# -- polling ---------------------------------------------------------------------------------


class HttpClient(asyncio.Protocol):
    """One keep-alive connection, one request at a time, Content-Length responses only."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:head_end]).lower()
        at = head.find(b"content-length: ")
        length = int(head[at + 16 : head.find(b"\r\n", at)]) if at >= 0 else 0
        total = head_end + 4 + length
        if len(self.buffer) >= total:
            response = bytes(self.buffer[:total])
            del self.buffer[:total]
            if not self.waiter.done():
                self.waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    async def request(self, raw: bytes) -> bytes:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await asyncio.wait_for(self.waiter, timeout=30)


async def open_http(port: int) -> HttpClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(HttpClient, HOST, port)
    return client


async def run_poll(args: argparse.Namespace) -> None:
    request = f"GET {args.path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def connect() -> HttpClient:
        async with gate:
            return await open_http(args.port)

    clients = await asyncio.gather(*(connect() for _ in range(args.count)))
    emit({"ready": len(clients)})
    start = time.time()
    end = start + args.duration
    observations: list[list[tuple[float, str]]] = [[] for _ in clients]
    errors = 0

    async def poll(index: int, client: HttpClient) -> None:
        nonlocal errors
        next_at = start + random.random() * args.interval
        while True:
            delay = next_at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.time() >= end:
                return
            try:
                response = await client.request(request)
            except (ConnectionError, TimeoutError):
                errors += 1
                return
            t = time.time()
            key = b'"last_event_id":"'
            at = response.find(key)
            if at >= 0:
                at += len(key)
                observations[index].append((t, response[at : response.index(b'"', at)].decode()))
            next_at += args.interval

    await asyncio.gather(*(poll(i, c) for i, c in enumerate(clients)))
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    emit({"observations": observations, "errors": errors, "elapsed_s": time.time() - start})


async def run_post(args: argparse.Namespace) -> None:
    body = args.body.encode()
    request = (
        f"POST {args.path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    clients = [await open_http(args.port) for _ in range(args.concurrency)]
    emit({"ready": len(clients)})
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    start = time.time()
    end = start + args.duration

    async def worker(client: HttpClient) -> None:
        while time.time() < end:
            t0 = time.perf_counter()
            try:
                response = await client.request(request)
            except (ConnectionError, TimeoutError):
                statuses["error"] = statuses.get("error", 0) + 1
                return
            latencies.append(round((time.perf_counter() - t0) * 1000, 3))
            status = response[9:12].decode()
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker(c) for c in clients))
    elapsed = time.time() - start
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    emit({"latencies_ms": latencies, "statuses": statuses, "elapsed_s": elapsed})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("mode", choices=["sse", "poll", "post", "storm"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--port2", type=int, help="storm: where the viewers reconnect")
    parser.add_argument("--path", required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument(
        "--tokens-file", help="one stream token a line; stream i sends `?token=<line i>`"
    )
    parser.add_argument("--expect-type", default="progress")
    parser.add_argument(
        "--by-type", action="store_true", help="also the latency of every event, by its type"
    )
    parser.add_argument(
        "--token-times",
        action="store_true",
        help="latency per word of the event's text, each a write time (bench.output)",
    )
    parser.add_argument(
        "--ready-marker",
        default="retry:",
        help="bytes that tell a stream is live (ours: its snapshot, read after registering)",
    )
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--connect-concurrency", type=int, default=256)
    parser.add_argument(
        "--wait-retry",
        action="store_true",
        help="storm: a dropped viewer waits retry: x 0.8-1.0 (its first try found nothing)",
    )
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--body", default="{}")
    args = parser.parse_args()
    raise_fd_limit()
    runner = {"sse": run_sse, "poll": run_poll, "post": run_post, "storm": run_storm}[args.mode]
    uvloop.run(runner(args))


if __name__ == "__main__":
    main()
