"""A real local HTTP server that speaks the chat-completions protocol, scripted by a test.

It listens on 127.0.0.1 in a thread (http.server). Each request takes the next scripted answer
(a status with headers, a reply, a pause); when the script runs out it answers ``default``.
Every request is recorded with the time it arrived, so tests can check what the worker sent
and when.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    status: int = 200
    body: Any = None  # JSON-ready, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    pause: float = 0.0  # seconds before answering (a slow server, a timeout)


def reply(
    content: str, prompt_tokens: int = 100, completion_tokens: int = 20, **message: Any
) -> Answer:
    """A 200 chat completion with ``content`` and the given usage."""
    return Answer(
        body={
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": "test-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, **message},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


def error(status: int, message: str = "error", code: str | None = None, **headers: str) -> Answer:
    return Answer(
        status=status,
        body={"error": {"message": message, "type": "error", "code": code}},
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


@dataclass
class Request:
    at: float  # time.time() when it arrived
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class ChatServer:
    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.default: Answer = reply('{"summary": "default", "words": 1}')
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"raw": raw.decode(errors="replace")}
                with server._lock:
                    server.requests.append(
                        Request(time.time(), self.path, dict(self.headers), body)
                    )
                    answer = server.script.pop(0) if server.script else server.default
                if answer.pause:
                    time.sleep(answer.pause)
                payload = (
                    answer.body
                    if isinstance(answer.body, bytes)
                    else json.dumps(answer.body).encode()
                )
                try:
                    self.send_response(answer.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The base URL a provider is configured with (``/v1``, like OpenAI's)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def reset(self, *script: Answer, default: Answer | None = None) -> None:
        with self._lock:
            self.script = list(script)
            self.requests = []
            if default is not None:
                self.default = default

    def start(self) -> ChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def chat_server() -> Iterator[ChatServer]:
    server = ChatServer().start()
    try:
        yield server
    finally:
        server.stop()
