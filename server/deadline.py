"""Every request answers within a bounded time once its body is in: ``503`` if the job store
does not answer in time.

A Redis that is gone answers at once (connection refused), but one that is frozen (a stalled
host, a partition, ``SIGSTOP``) accepts connections and never replies: without a bound, a
submit would hang for as long as the client waits. The clock starts when the request body has
arrived (at once for a request without one), so a slow upload is the body timeout's to judge
(``408``), not this. It stops when the response starts: a stream, once open, is not limited.

A request cut off here may or may not have been carried out (a create script that ran just
before the deadline): the answer says to retry, and an ``Idempotency-Key`` makes the retry
create the job exactly once.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stepstream.server.api_errors import error_response

RETRY_AFTER_SECONDS = 2
_BODILESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class ResponseDeadline:
    """A pure ASGI middleware: streams pass straight through once started."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = False

        async def receive_body() -> Message:
            message = await receive()
            body_done = message["type"] == "http.request" and not message.get("more_body")
            if body_done and not started:
                deadline.reschedule(loop.time() + self.seconds)
            return message

        async def send_response(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                deadline.reschedule(None)
            await send(message)

        # No dict of the headers: this frame lives as long as the response (a stream's hours).
        has_body = scope.get("method") not in _BODILESS and not any(
            name == b"content-length" and value == b"0" for name, value in scope["headers"]
        )
        try:
            async with asyncio.timeout(None if has_body else self.seconds) as deadline:
                await self.app(scope, receive_body, send_response)
        except TimeoutError:
            if started or not deadline.expired():
                raise
            response = error_response(
                503,
                "unavailable",
                f"the job store did not answer within {self.seconds:g} seconds; try again "
                "shortly (with the same Idempotency-Key, a submit runs once)",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
            await response(scope, receive, send)
