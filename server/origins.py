"""Requests from origins CORS does not allow: logged, so a page that cannot watch is not silent.

A browser blocks the answer to a page on an origin ``STEPSTREAM_CORS_ORIGINS`` does not list,
and tells the page only "network error". The server is the one place that can say why: it logs
a warning naming the origin and the setting, at most once a minute per origin.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("stepstream.web")

# Once a minute per origin; the origins remembered are bounded, the oldest forgotten first (a
# forgotten one is logged again when it comes back, which is all it costs).
LOG_EVERY_SECONDS = 60.0
ORIGINS_KEPT = 1_000
# Public files any page may load, whatever its origin (server/app.py serves them with ``*``).
PUBLIC_SUFFIXES = ("/stepstream.js", "/stepstream.d.ts")


class RefusedOriginLog:
    """Logs a request whose ``Origin`` is neither the server's own nor an allowed one. It only
    logs; the answer is CORSMiddleware's (or, with no origins set, carries no CORS header)."""

    def __init__(
        self,
        app: ASGIApp,
        allowed: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.allowed = frozenset(allowed)
        self.clock = clock
        self.logged_at: OrderedDict[str, float] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            self._check(scope)  # in a call of its own: its locals do not live with a stream
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> None:
        # Most requests carry no Origin: found in the raw headers, without building Headers
        # (and raising its KeyError) on every request, a reconnect storm's thousands included.
        raw = next((value for name, value in scope["headers"] if name == b"origin"), None)
        if raw is None:
            return
        origin = raw.decode("latin-1")
        if origin not in self.allowed and not _own(origin, Headers(scope=scope)):
            path: str = scope.get("path", "")
            if not path.endswith(PUBLIC_SUFFIXES):
                self._log(origin, path)

    def _log(self, origin: str, path: str) -> None:
        now = self.clock()
        last = self.logged_at.get(origin)
        if last is not None and now - last < LOG_EVERY_SECONDS:
            return
        self.logged_at[origin] = now
        self.logged_at.move_to_end(origin)
        while len(self.logged_at) > ORIGINS_KEPT:
            self.logged_at.popitem(last=False)
        listed = ", ".join(sorted(self.allowed)) or "nothing: CORS is off"
        logger.warning(
            "a request to %s came from origin %r, which STEPSTREAM_CORS_ORIGINS does not allow "
            "(it lists %s): browsers will not let that page read the answer. If the page should "
            "watch jobs, add its origin to STEPSTREAM_CORS_ORIGINS (comma-separated). "
            "Said at most once a minute per origin.",
            path,
            origin,
            listed,
        )


def _own(origin: str, headers: Headers) -> bool:
    """The server's own origin (the dashboard's POSTs carry an Origin too), as the request's
    ``Host`` names it, or the host a proxy in front says it forwarded."""
    _, _, authority = origin.partition("://")
    authority = authority.lower()
    return any(
        authority == host.strip().lower()
        for name in ("host", "x-forwarded-host")
        for host in headers.get(name, "").split(",")
        if host.strip()
    )
