"""A small SSE reader for tests, with a deadline on every wait."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import connect_sse

from tests.support import http


@dataclass(frozen=True)
class Event:
    id: str | None
    type: str
    data: dict[str, Any]


def read_stream(
    url: str,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 30.0,
    stop: Callable[[Event], bool] | None = None,
    opened: Callable[[httpx.Response], None] | None = None,
) -> tuple[int, list[Event]]:
    """Read a stream to its end (or until ``stop`` says so); returns (status, events).
    ``opened`` is handed the response once its head is in."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    with (
        httpx.Client(timeout=httpx.Timeout(timeout), verify=http.TLS) as client,
        connect_sse(client, "GET", url, headers=headers or {}) as source,
    ):
        if opened is not None:
            opened(source.response)
        if source.response.status_code != 200:
            return source.response.status_code, events
        for sse in source.iter_sse():
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {url} still open after {timeout}s")
            if not sse.data and sse.event == "message":
                continue  # a frame with only `retry:`
            event = Event(sse.id or None, sse.event, json.loads(sse.data) if sse.data else {})
            events.append(event)
            if stop is not None and stop(event):
                break
    return 200, events


class StreamReader:
    """Reads a stream in a thread, so a test can act while it listens."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 60):
        self.url = url
        self.headers = headers
        self.timeout = timeout
        self.events: list[Event] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._stop = threading.Event()
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StreamReader:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.status, _ = read_stream(
                self.url,
                self.headers,
                timeout=self.timeout,
                stop=self._collect,
                opened=self._opened,
            )
        except BaseException as exc:  # surfaced by wait_* to the test
            if not self._stop.is_set():  # a read cut short by close() is no error
                self.error = exc
        finally:
            self._done.set()

    def _opened(self, response: httpx.Response) -> None:
        stream = response.extensions.get("network_stream")
        self._socket = stream.get_extra_info("socket") if stream is not None else None
        if self._stop.is_set():  # closed before it opened
            self._shut()

    def _shut(self) -> None:
        if self._socket is not None:
            # shutdown() wakes the reading thread at once, which close() from here would not;
            # the server sees the connection end as it would when a browser tab goes away.
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)

    def _collect(self, event: Event) -> bool:
        self.events.append(event)
        return self._stop.is_set()

    def wait_for(self, predicate: Callable[[list[Event]], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.events):
                return
            if self._done.is_set():
                if predicate(self.events):
                    return
                raise AssertionError(
                    f"stream ended ({self.status}, {self.error!r}) before the condition; "
                    f"got {[e.type for e in self.events]}"
                )
            time.sleep(0.02)
        raise TimeoutError(f"condition not met in {timeout}s; got {[e.type for e in self.events]}")

    def wait_closed(self, timeout: float = 30) -> list[Event]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"stream {self.url} did not end within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.events

    def close(self, timeout: float = 10) -> None:
        """End the stream now, from the client's side, and wait for the reader to finish."""
        self._stop.set()
        self._shut()
        if not self._done.wait(timeout):
            raise TimeoutError(f"stream {self.url} was not closed within {timeout}s")
