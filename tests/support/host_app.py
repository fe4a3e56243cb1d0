"""Host apps with their own routes and their own logging that mount Stepstream at ``/progress``.

Run with ``uvicorn --factory tests.support.host_app:fastapi_host`` (or ``:starlette_host``).
Each configures its logging the way an application does before Stepstream is built, so a
test can tell the host's lines, uvicorn's and Stepstream's apart.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from stepstream.server import create_app

HOST_FORMAT = "host-log %(levelname)s %(name)s | %(message)s"
logger = logging.getLogger("host")


def _configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=HOST_FORMAT, force=True)


def _logging_state() -> dict[str, Any]:
    """What the host's logging looks like now, as a test reads it over HTTP."""
    root = logging.getLogger()
    return {
        "root_formats": [
            getattr(h.formatter, "_fmt", None) for h in root.handlers if h.formatter is not None
        ],
        "root_handlers": len(root.handlers),
        "uvicorn_handlers": {
            name: len(logging.getLogger(name).handlers) for name in ("uvicorn", "uvicorn.access")
        },
        "uvicorn_propagates": {
            name: logging.getLogger(name).propagate for name in ("uvicorn", "uvicorn.access")
        },
    }


def fastapi_host() -> FastAPI:
    """The shortest form: ``FastAPI(lifespan=progress.lifespan)``."""
    _configure_logging()
    progress = create_app()
    app = FastAPI(lifespan=progress.lifespan)

    @app.get("/", response_class=PlainTextResponse)
    async def home() -> str:
        logger.info("host home served")
        return "the host's own home page"

    @app.get("/logging")
    async def logging_state() -> dict[str, Any]:
        return _logging_state()

    app.mount("/progress", progress)
    return app


def starlette_host() -> Starlette:
    """A host with its own lifespan, which runs Stepstream's inside it."""
    _configure_logging()
    progress = create_app()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        logger.info("host starting")
        async with progress.lifespan(app):
            yield
        logger.info("host stopped")

    async def home(request: Request) -> PlainTextResponse:
        logger.info("host home served")
        return PlainTextResponse("the host's own home page")

    async def logging_state(request: Request) -> JSONResponse:
        return JSONResponse(_logging_state())

    return Starlette(
        routes=[
            Route("/", home),
            Route("/logging", logging_state),
            Mount("/progress", app=progress),
        ],
        lifespan=lifespan,
    )
