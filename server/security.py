"""Response headers that keep the dashboard safe, the development/production decision, CORS."""

from __future__ import annotations

import signal
from typing import Any

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stepstream.server.origins import RefusedOriginLog
from stepstream.tasks.settings import Settings

# No inline script or style anywhere: the dashboard is plain files from /static.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Adds the security headers to every HTTP response (a pure ASGI middleware: it does not
    buffer, so streams pass straight through)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The raw list, as MutableHeaders.setdefault would leave it, without decoding
                # and encoding every name on every response.
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def middleware(settings: Settings) -> list[Middleware]:
    origins = settings.cors_origins
    # A page on an origin not listed here gets "network error" and nothing more: say why in
    # the log, where whoever runs the server can read it.
    stack = [Middleware(SecurityHeaders), Middleware(RefusedOriginLog, allowed=origins)]
    if origins:  # CORS is off unless origins are configured
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
                expose_headers=["Location", "Retry-After"],
            )
        )
    return stack


def bound_host() -> str | None:
    """The host uvicorn was told to bind, found through its signal handler (None if unknown)."""
    handler: Any = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    config = getattr(server, "config", None)
    host = getattr(config, "host", None)
    return host if isinstance(host, str) else None


def is_production(settings: Settings) -> bool:
    return settings.is_production(bound_host())
