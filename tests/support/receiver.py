"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that records every request.

``answer(request)`` decides each status; it may block (a stalled receiver) on ``release``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    raw: bytes
    body: dict[str, Any]
    received_at: float  # time.monotonic()
    status: int = 0  # 0 while the answer is being decided

    @property
    def event_id(self) -> str:
        """The signed body's ``id``, as the docs tell receivers to de-duplicate on (the
        ``X-Stepstream-Event-Id`` header is a copy the signature does not cover)."""
        assert self.headers["X-Stepstream-Event-Id"] == self.body["id"]
        return str(self.body["id"])

    @property
    def job_id(self) -> str:
        return str(self.body["job_id"])

    def signed_with(self, secret: str) -> bool:
        """Whether the signature is the HMAC-SHA256 of "<timestamp>." + body, as documented."""
        timestamp = self.headers["X-Stepstream-Timestamp"]
        expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + self.raw, hashlib.sha256)
        given = self.headers.get("X-Stepstream-Signature", "")
        return hmac.compare_digest(given, f"sha256={expected.hexdigest()}")


Answer = Callable[[Delivery], int]


class Receiver:
    def __init__(self, answer: Answer | None = None) -> None:
        self.answer: Answer = answer or (lambda _: 200)
        self.deliveries: list[Delivery] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # a stalling ``answer`` waits for it
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                delivery = Delivery(
                    self.path, dict(self.headers), raw, json.loads(raw), time.monotonic()
                )
                with receiver.lock:
                    receiver.deliveries.append(delivery)
                status = receiver.answer(delivery)
                with receiver.lock:
                    delivery.status = status
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender is gone (a killed worker, a timed-out attempt)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def all(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)

    def accepted(self) -> list[Delivery]:
        """Deliveries answered with a 2xx (a receiver would have acted on each)."""
        return [d for d in self.all() if 200 <= d.status < 300]

    def for_job(self, job_id: str) -> list[Delivery]:
        return [d for d in self.all() if d.job_id == job_id]

    def stalled(self) -> int:
        return sum(1 for d in self.all() if d.status == 0)

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
