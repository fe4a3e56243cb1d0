"""Acme Reports: a small product that puts Stepstream behind its own origin.

What it shows, end to end:
- the backend holds the one Stepstream API key and submits jobs on behalf of its signed-in
  users, tagging each job with the user as its ``subject``;
- browsers never see the key: they ask this backend for short-lived stream tokens, which it
  mints only for the user's own jobs (or for the user's subject on the firehose);
- the page watches progress with Stepstream's browser client, ``/stepstream.js``, loaded from
  the Stepstream server on its own origin (CORS allows this product's origin).

Run it (see examples/host_app/README.md)::

    ACME_STEPSTREAM_URL=http://127.0.0.1:8000 ACME_STEPSTREAM_KEY=... \
        uvicorn examples.host_app.app:app --port 8080

The sign-in is a stand-in (a name, no password) for the product's real one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
USER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
COOKIE = "acme_user"


class Config:
    def __init__(self) -> None:
        # Where this backend reaches Stepstream, and where browsers reach it (often the same).
        self.stepstream_url = os.environ.get("ACME_STEPSTREAM_URL", "http://127.0.0.1:8000")
        self.browser_url = os.environ.get("ACME_STEPSTREAM_BROWSER_URL", self.stepstream_url)
        self.api_key = os.environ.get("ACME_STEPSTREAM_KEY", "")
        self.secret = os.environ.get("ACME_SECRET", "change-me").encode()


def _sign(config: Config, user: str) -> str:
    mac = hmac.new(config.secret, user.encode(), hashlib.sha256).hexdigest()
    return f"{user}.{mac}"


def _user(request: Request) -> str | None:
    config: Config = request.app.state.config
    user, _, mac = request.cookies.get(COOKIE, "").partition(".")
    if user and hmac.compare_digest(_sign(config, user), f"{user}.{mac}"):
        return user
    return None


def _stepstream(request: Request) -> httpx.AsyncClient:
    client: httpx.AsyncClient = request.app.state.stepstream
    return client


def _relay(response: httpx.Response) -> Response:
    """Stepstream's answer as this backend's own (errors keep their JSON and status)."""
    return Response(
        response.content,
        status_code=response.status_code,
        media_type="application/json",
        headers={k: v for k, v in response.headers.items() if k.lower() == "retry-after"},
    )


def _signed_out() -> JSONResponse:
    return JSONResponse({"error": "sign in first"}, status_code=401)


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def session(request: Request) -> Response:
    config: Config = request.app.state.config
    if request.method == "GET":
        return JSONResponse({"user": _user(request), "stepstream": config.browser_url})
    body: dict[str, Any] = await request.json()
    user = str(body.get("user", "")).strip().lower()
    if not USER_NAME.fullmatch(user):
        return JSONResponse({"error": "a name of letters and digits, please"}, status_code=422)
    response = JSONResponse({"user": user, "stepstream": config.browser_url})
    response.set_cookie(COOKIE, _sign(config, user), httponly=True, samesite="strict")
    return response


async def create_report(request: Request) -> Response:
    user = _user(request)
    if user is None:
        return _signed_out()
    body: dict[str, Any] = await request.json()
    job_input = {"text": str(body.get("text", "")), "pace": float(body.get("pace", 0))}
    answer = await _stepstream(request).post(
        "/api/jobs",
        json={"task": "analyze_document", "input": job_input, "subject": user},
    )
    return _relay(answer)


async def list_reports(request: Request) -> Response:
    user = _user(request)
    if user is None:
        return _signed_out()
    answer = await _stepstream(request).get("/api/jobs", params={"subject": user, "limit": 50})
    return _relay(answer)


async def report_token(request: Request) -> Response:
    """A stream token for one of the user's own reports, never anyone else's."""
    user = _user(request)
    if user is None:
        return _signed_out()
    job_id = request.path_params["job_id"]
    record = await _stepstream(request).get(f"/api/jobs/{job_id}")
    if record.status_code != 200 or record.json().get("subject") != user:
        return JSONResponse({"error": "no such report"}, status_code=404)
    return _relay(await _stepstream(request).post(f"/api/jobs/{job_id}/token"))


async def feed_token(request: Request) -> Response:
    """A firehose token that sees the user's jobs only (their subject)."""
    user = _user(request)
    if user is None:
        return _signed_out()
    return _relay(await _stepstream(request).post("/api/events/token", json={"subject": user}))


def create_app(config: Config | None = None) -> Starlette:
    config = config or Config()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            base_url=config.stepstream_url,
            headers={"Authorization": f"Bearer {config.api_key}"},
            timeout=10,
        ) as client:
            app.state.stepstream = client
            yield

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", page),
            Route("/session", session, methods=["GET", "POST"]),
            Route("/reports", create_report, methods=["POST"]),
            Route("/reports", list_reports, methods=["GET"]),
            Route("/reports/{job_id}/token", report_token, methods=["POST"]),
            Route("/feed/token", feed_token, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
    )
    app.state.config = config
    return app


app = create_app()
