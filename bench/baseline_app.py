"""The baseline: the common recipe for progress over SSE, written the way tutorials write it.

One sse-starlette ``EventSourceResponse`` per client, and in its generator one Redis pub/sub
connection per client, listening to the job's channel our store publishes to (sharded:
``SSUBSCRIBE``); every client decodes every message and encodes its own frame. It reads the
same Redis as Stepstream, so both serve the same events from the same worker.

``uvicorn bench.baseline_app:app`` (the benchmarks start it themselves).

- ``GET /events/{job_id}``: live events of one job (the common recipe has no replay).
- ``POST /jobs``: the common recipe's submit: enqueue an arq job, answer its id (no record,
  no log), for the throughput benchmark.
- ``GET /replay/{job_id}``: the naive replay, for the resume benchmark: ``XRANGE`` after
  ``Last-Event-ID`` and one ``ServerSentEvent`` (one encode, one send) per event.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("STEPSTREAM_PREFIX", "stepstream:")
TERMINAL = {"completed", "failed", "cancelled"}

redis: Redis
arq: ArqRedis


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global redis, arq
    redis = Redis.from_url(REDIS_URL, decode_responses=True)
    arq = await create_pool(RedisSettings.from_dsn(REDIS_URL))
    try:
        yield
    finally:
        await arq.aclose()
        await redis.aclose()


async def submit(request: Request) -> Response:
    body = json.loads(await request.body())
    job = await arq.enqueue_job("baseline_task", body, _queue_name=f"{PREFIX}baseline-queue")
    assert job is not None
    return JSONResponse({"id": job.job_id}, status_code=202)


async def job_events(request: Request) -> Response:
    job_id = request.path_params["job_id"]

    async def events() -> AsyncIterator[Any]:
        pubsub = redis.pubsub()
        # redis-py's asyncio PubSub (5.x) has no ssubscribe(): the command and its pushes raw.
        await pubsub.execute_command("SSUBSCRIBE", f"{PREFIX}job:{{{job_id}}}:live")
        try:
            await pubsub.parse_response(block=True)  # the subscription's confirmation
            yield ServerSentEvent(retry=2000)
            while True:
                kind, _, data = await pubsub.parse_response(block=True)
                if kind != "smessage":
                    continue
                payload = json.loads(data)
                event = payload["event"]
                yield ServerSentEvent(
                    data=json.dumps(event), event=event["type"], id=payload["job_event_id"]
                )
                if event["type"] in TERMINAL:
                    return
        finally:
            await pubsub.aclose()

    return EventSourceResponse(events(), send_timeout=10)


async def replay(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    after = request.headers.get("last-event-id", "0")
    key = f"{PREFIX}job:{{{job_id}}}:events"

    async def events() -> AsyncIterator[Any]:
        cursor = after
        yield ServerSentEvent(retry=2000)
        while True:
            rows = await redis.xrange(key, min=f"({cursor}", max="+", count=1000)
            for entry_id, fields in rows:
                event = json.loads(fields["e"])
                yield ServerSentEvent(data=json.dumps(event), event=event["type"], id=entry_id)
                cursor = entry_id
                if event["type"] in TERMINAL:
                    return
            if len(rows) < 1000:
                return

    return EventSourceResponse(events(), send_timeout=10)


async def readyz(request: Request) -> Response:
    await redis.ping()
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/events/{job_id}", job_events),
        Route("/replay/{job_id}", replay),
        Route("/jobs", submit, methods=["POST"]),
        Route("/readyz", readyz),
    ],
    lifespan=lifespan,
)
