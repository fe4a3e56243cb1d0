"""The ASGI app: ``uvicorn stepstream.server.app:app``, or mounted in a host app.

Standalone, the module's ``app`` also installs Stepstream's logging. Mounted, the host keeps
its own logging and runs the app's lifespan, which Starlette does not run for a mounted app::

    from fastapi import FastAPI
    from stepstream.server import create_app

    progress = create_app()
    app = FastAPI(lifespan=progress.lifespan)
    app.mount("/progress", progress)
"""

from __future__ import annotations

import gc
import importlib.resources
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from stepstream.server import answers, batch_api, events, handoff, health, jobs, openapi, traces
from stepstream.server.api_errors import (
    ApiError,
    api_error_handler,
    error_response,
    http_error_handler,
    redis_error_handler,
    server_error_handler,
)
from stepstream.server.auth import Authenticator
from stepstream.server.deadline import ResponseDeadline
from stepstream.server.guards import raise_file_limit
from stepstream.server.hub import Hub
from stepstream.server.metrics import WebMetrics
from stepstream.server.security import bound_host, is_production, middleware
from stepstream.server.shards import ClusterSlots
from stepstream.server.state import AppState
from stepstream.tasks import credentials, tracing
from stepstream.tasks.connection import arq_pool, connect, connect_cluster
from stepstream.tasks.credentials import ApiKeys
from stepstream.tasks.errors import ConfigurationError
from stepstream.tasks.heartbeat import new_worker_id
from stepstream.tasks.logs import setup_logging
from stepstream.tasks.registry import TaskRegistry, load_tasks
from stepstream.tasks.settings import Settings, get_settings
from stepstream.tasks.store import JobStore
from stepstream.tasks.webhook_settings import Announcer


def static_folder() -> Path:
    """The dashboard's files: the ``stepstream.static`` package, in site-packages for a wheel,
    ``static/`` in a checkout."""
    folder = importlib.resources.files("stepstream.static")
    # StaticFiles and FileResponse serve from disk: a wheel and a checkout both keep the files
    # there; an install that does not (a zip) cannot serve the dashboard.
    if not isinstance(folder, Path):
        raise RuntimeError(f"stepstream.static is not a folder on disk: {folder}")
    return folder


STATIC_DIR = static_folder()
logger = logging.getLogger("stepstream.web")
NO_KEYS = (
    "production mode and no API key: every API request will be refused (401). Create one with "
    "`stepstream keys create OWNER` (same REDIS_URL and STEPSTREAM_PREFIX; kept in Redis, no "
    "restart needed), or set STEPSTREAM_API_KEYS=owner:key"
)
# Start-up warnings about the process itself, given once per process however often the
# lifespan runs.
_said_once: dict[str, bool] = {}


async def index(request: object) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def browser_client(name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    """The browser client (``static/stepstream.js``) or its types, for pages on any origin: a
    public file, so ``*``; the API it calls is what CORS guards."""

    async def endpoint(request: Request) -> Response:
        headers = {"Cache-Control": "no-cache", "Access-Control-Allow-Origin": "*"}
        return FileResponse(STATIC_DIR / name, media_type=media_type, headers=headers)

    return endpoint


# Objects allocated between two young collections (CPython's default: 700).
YOUNG_COLLECTION_OBJECTS = 10_000


def tune_collector() -> None:
    """Fit the cyclic garbage collector to a process that holds thousands of streams.

    Each stream is some sixty long-lived objects, and a connect allocates many more short-lived
    ones: with CPython's defaults, a reconnect storm of 5,000 viewers spent 1.7 s of its CPU in
    the collector (full collections rescanning every stream held, each time the heap grew by a
    quarter), 0.6 s with these settings. The objects of the start-up (modules, the app) are
    frozen out of every later collection; young collections run every 10,000 allocations,
    which makes full ones (attempted every hundred young ones) rare.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_OBJECTS, middle, old)


class StepstreamApp(Starlette):
    """The app ``create_app`` builds: a Starlette app whose lifespan a host app can run, and
    which serves the tasks of its ``registry``."""

    def __init__(self, registry: TaskRegistry, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.registry = registry

    def lifespan(self, host: object = None) -> AbstractAsyncContextManager[None]:
        """Connects to Redis and starts the hub; stops them on exit.

        For a host app that mounts this one: ``FastAPI(lifespan=progress.lifespan)``, or
        ``async with progress.lifespan():`` inside the host's own lifespan. ``host`` is accepted
        so the method fits ``lifespan=``; the state goes on this app, whose routes read it.
        """
        # create_app's lifespan yields no state: Starlette types it as either kind.
        return cast("AbstractAsyncContextManager[None]", self.router.lifespan_context(self))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not hasattr(self.state, "stepstream"):
            # Mounted without its lifespan: one clear answer instead of a 500 on every route.
            response = error_response(
                500,
                "not_started",
                "Stepstream's lifespan has not run: a host app that mounts it must run "
                "`progress.lifespan` (e.g. FastAPI(lifespan=progress.lifespan))",
            )
            await response(scope, receive, send)
            return
        if scope["type"] == "http" and scope.get("method") == "GET" and not tracing.enabled():
            # A stream's body is sent from here, past the middleware stack (server/handoff.py).
            await handoff.through(super().__call__, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    registry: TaskRegistry | None = None,
    configure_logging: bool = False,
    owns_process: bool = False,
    clock: Callable[[], float] = time.time,
) -> StepstreamApp:
    """Stepstream's web app, to run alone or to mount in a host app (see the module doc).

    The app serves the tasks of ``registry``: submits, ``/api/tasks``, ``/openapi.json`` and
    ``/api/stats`` know those and no others. By default it is the default registry, with the
    configured task modules (``STEPSTREAM_TASK_MODULES``) imported.

    ``configure_logging`` installs Stepstream's log handler on the root logger and routes
    uvicorn's loggers through it (``STEPSTREAM_LOG_FORMAT``), as the standalone app does. Off,
    logging stays as the host configured it; Stepstream writes to its ``stepstream.*`` loggers.

    ``owns_process``: the app is the process's only app (``stepstream web``). It raises the
    process's open-file limit to hold ``STEPSTREAM_MAX_STREAMS`` streams, and in production
    says so, once, when even the hard limit is too low; it tunes the garbage collector
    (``tune_collector``). A host app's process is the host's.

    ``clock``: the time in seconds that picks the window of the per-second submission limit
    (``STEPSTREAM_SUBMISSIONS_PER_SECOND``); a test passes one it sets.
    """
    settings = settings or get_settings()
    if configure_logging:
        # Here rather than in the lifespan: uvicorn writes its first lines between the two.
        setup_logging("web", settings)
    tracing.configure(settings.tracing, "stepstream-web")
    served = (
        registry
        if registry is not None
        else load_tasks(settings.task_modules, demo=settings.loads_demo_tasks)
    )
    web_metrics = WebMetrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        production = is_production(settings)
        problem = settings.production_problem(bound_host())
        if problem:
            raise ConfigurationError(problem)
        logger.warning(
            "Stepstream in %s mode%s",
            "production" if production else "development",
            "" if production else ": the API is open to anyone who can reach this address",
        )
        if owns_process:
            file_problem = raise_file_limit(settings.max_streams)
            # Development's streams are a handful; there the warning would be noise.
            if file_problem and production and not _said_once.get("file_limit"):
                _said_once["file_limit"] = True
                logger.warning(file_problem)
        if any(name.upper() == "STEPSTREAM_MAX_STREAMS_PER_OWNER" for name in os.environ):
            logger.warning(
                "STEPSTREAM_MAX_STREAMS_PER_OWNER is deprecated: it now sets "
                "STEPSTREAM_MAX_STREAMS_PER_KEY (streams opened with an API key itself)"
            )
        # Patient: a request waits out a short Redis outage instead of failing.
        store = JobStore.open(settings, attempts=10)
        redis = store.queue  # API keys and announcements: REDIS_URL's, as the CLI reads them
        pubsub_redis = connect(settings, attempts=None)  # the hub reconnects by itself
        # Live events are published where the logs live: on a cluster, each on the primary of
        # its channel's slot, which the hub finds through its own client's slot map.
        router = ClusterSlots(connect_cluster(settings)) if settings.cluster_url else None
        arq = arq_pool(settings)  # enqueues ride along with store scripts (tasks/queue.py)
        hub = Hub(
            pubsub_redis,
            store.keys.at(0),  # a job's channel is its partition's whatever the view's
            queue_size=settings.subscriber_queue,
            heartbeat_seconds=settings.heartbeat_seconds,
            subscribe_delay_seconds=settings.subscribe_delay_seconds,
            router=router,
        )
        await hub.start()
        auth = Authenticator(
            production=production,
            secret=settings.secret,
            keys=ApiKeys(redis, store.keys, credentials.parse_configured(settings.api_keys)),
            token_ttl=settings.token_ttl_seconds,
        )
        auth.watch.start()  # ends the streams of revoked keys
        announcer = Announcer(
            redis,
            store.keys,
            settings,
            role="web",
            process_id=new_worker_id(),
            interval=settings.worker_heartbeat_seconds,
        )
        try:  # at start, so a disagreement with the workers is logged now
            await announcer.announce()
        except Exception:
            logger.warning("could not announce the webhook settings", exc_info=True)
        announcer.start()
        if production and not await auth.keys.any_key():
            logger.warning(NO_KEYS)
        app.state.stepstream = AppState(
            settings, redis, store, hub, arq, auth, served, webhook_settings=announcer, clock=clock
        )
        if owns_process:
            tune_collector()
        try:
            yield
        finally:
            await announcer.stop()
            await auth.watch.stop()
            await hub.stop()
            await arq.aclose()
            await pubsub_redis.aclose()
            if router is not None:
                await router.aclose()
            await store.aclose()

    routes = [
        Route("/api/jobs", jobs.submit_job, methods=["POST"]),
        Route("/api/jobs", jobs.list_jobs, methods=["GET"]),
        Route("/api/jobs/{job_id}", jobs.get_job, methods=["GET"]),
        Route("/api/jobs/{job_id}/events", events.job_events, methods=["GET"]),
        Route("/api/jobs/{job_id}/cancel", jobs.cancel_job, methods=["POST"]),
        Route("/api/jobs/{job_id}/retry", jobs.retry_job, methods=["POST"]),
        Route("/api/jobs/{job_id}/token", jobs.job_token, methods=["POST"]),
        Route("/api/jobs/{job_id}/input", answers.answer_input, methods=["POST"]),
        Route("/api/batches", batch_api.submit_batch, methods=["POST"]),
        Route("/api/batches/{job_id}", batch_api.get_batch, methods=["GET"]),
        Route("/api/batches/{job_id}/cancel", jobs.cancel_job, methods=["POST"]),
        Route("/api/events", events.firehose, methods=["GET"]),
        Route("/api/events/token", jobs.firehose_token, methods=["POST"]),
        Route("/api/tasks", jobs.list_tasks, methods=["GET"]),
        Route("/api/stats", health.stats, methods=["GET"]),
        Route("/metrics", web_metrics.endpoint, methods=["GET"]),
        Route("/openapi.json", openapi.openapi, methods=["GET"]),
        Route("/healthz", health.healthz, methods=["GET"]),
        Route("/readyz", health.readyz, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Route("/stepstream.js", browser_client("stepstream.js", "text/javascript")),
        Route("/stepstream.d.ts", browser_client("stepstream.d.ts", "application/typescript")),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
    ]
    routes = web_metrics.instrument(routes)  # counts submissions, streamed events; log tags
    # Outermost: a request's span covers the security headers, the deadline and the 4xx.
    spans = []
    if tracing.enabled():
        routes = traces.name_routes(routes)
        spans = [Middleware(traces.RequestSpans)]
    return StepstreamApp(
        served,
        routes=routes,
        # Innermost, so its 503 still gets the security and CORS headers.
        middleware=[
            *spans,
            *middleware(settings),
            Middleware(ResponseDeadline, seconds=settings.request_deadline_seconds),
        ],
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_error_handler,
            RedisConnectionError: redis_error_handler,
            RedisTimeoutError: redis_error_handler,
            Exception: server_error_handler,
        },
    )


def __getattr__(name: str) -> StepstreamApp:
    # ``uvicorn stepstream.server.app:app`` builds the app on first access, so importing this
    # module for its helpers does not read the environment. Run this way, the app owns the
    # process, and its logging with it.
    if name == "app":
        return create_app(configure_logging=True, owns_process=True)
    raise AttributeError(name)
