"""A web page on an origin of its own: a tiny static server, as a product's site would be."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlparse

from tests.support.processes import free_port

# path -> (content type, body, extra headers)
Pages = Mapping[str, tuple[str, str, Mapping[str, str]]]


class PageServer:
    """Serves fixed pages on 127.0.0.1 and a free port, in a thread, until closed (a POST gets
    the same answer as a GET)."""

    def __init__(self, pages: Pages) -> None:
        self.pages = pages
        self.port = free_port()
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlparse(self.path).path
                server.requests.append(path)
                page = server.pages.get(path)
                if page is None:
                    self.send_error(404)
                    return
                content_type, body, headers = page
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                """The same fixed answer (a product's backend minting a token, say)."""
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the test asserts what matters

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PageServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
