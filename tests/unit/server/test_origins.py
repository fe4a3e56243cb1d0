"""server/origins.py: a request from an origin CORS does not allow is logged, naming the
setting, at most once a minute per origin, with bounded memory; the server's own origin and an
allowed one are not."""

from __future__ import annotations

import logging

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from stepstream.server import origins
from stepstream.server.origins import RefusedOriginLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def ok(request: object) -> PlainTextResponse:
    return PlainTextResponse("ok")


def app(clock: Clock, allowed: tuple[str, ...] = ()) -> RefusedOriginLog:
    inner = Starlette(routes=[Route("/{path:path}", ok)])
    return RefusedOriginLog(inner, allowed=allowed, clock=clock)


def get(target: RefusedOriginLog, path: str, headers: dict[str, str]) -> None:
    async def call() -> None:
        transport = httpx.ASGITransport(app=target)
        async with httpx.AsyncClient(transport=transport, base_url="http://stepstream.test") as c:
            assert (await c.get(path, headers=headers)).status_code == 200

    anyio.run(call)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_foreign_origin_is_logged_once_a_minute_naming_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "stepstream.web")
    clock = Clock()
    target = app(clock)
    page = {"Origin": "https://app.example"}
    for _ in range(5):
        get(target, "/api/jobs/J/events", page)
    [line] = warnings(caplog)
    assert "STEPSTREAM_CORS_ORIGINS" in line and "'https://app.example'" in line, line
    assert "/api/jobs/J/events" in line and "CORS is off" in line, line
    # Another origin has its own minute; the first is said again once its minute is over.
    get(target, "/api/jobs/J/events", {"Origin": "https://other.example"})
    clock.now += 59
    get(target, "/api/jobs/J/events", page)
    assert len(warnings(caplog)) == 2
    clock.now += 2
    get(target, "/api/jobs/J/events", page)
    assert len(warnings(caplog)) == 3


def test_own_allowed_and_public_requests_are_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "stepstream.web")
    target = app(Clock(), allowed=("https://app.example",))
    get(target, "/api/jobs", {"Origin": "http://stepstream.test"})  # the dashboard's own POSTs
    get(target, "/api/jobs", {"Origin": "https://app.example"})
    proxied = {"Origin": "https://proxied.example", "X-Forwarded-Host": "proxied.example"}
    get(target, "/api/jobs", proxied)
    get(target, "/api/jobs", {})
    get(target, "/stepstream.js", {"Origin": "https://elsewhere.example"})  # public, for any page
    assert warnings(caplog) == []
    get(target, "/api/jobs", {"Origin": "https://elsewhere.example"})
    [line] = warnings(caplog)
    assert "it lists https://app.example" in line, line
    # "*" allows every origin: nothing to say.
    caplog.clear()
    get(app(Clock(), allowed=("*",)), "/api/jobs", {"Origin": "https://elsewhere.example"})
    assert warnings(caplog) == []


def test_the_origins_remembered_are_bounded(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(origins, "ORIGINS_KEPT", 3)
    caplog.set_level(logging.WARNING, "stepstream.web")
    target = app(Clock())
    for n in range(10):
        get(target, "/api/jobs", {"Origin": f"https://site{n}.example"})
    assert len(target.logged_at) == 3
    assert list(target.logged_at) == [f"https://site{n}.example" for n in (7, 8, 9)]
    assert len(warnings(caplog)) == 10
