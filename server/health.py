"""Liveness, readiness and queue statistics."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.state import AppState
from tasks.models import JobState
from tasks.registry import all_tasks

STATS_SCAN = 5_000


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    try:
        await state.redis.ping()
    except Exception as exc:
        return JSONResponse(
            {"status": "unavailable", "redis": f"unreachable: {type(exc).__name__}"},
            status_code=503,
        )
    return JSONResponse(
        {
            "status": "ready",
            "redis": "ok",
            "hub": "connected" if state.hub.connected.is_set() else "reconnecting",
        }
    )


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


async def stats(request: Request) -> Response:
    """Counts by state and durations over the most recent jobs (up to ``STATS_SCAN``)."""
    state: AppState = request.app.state.stepstream
    store = state.store
    job_ids = await store.redis.zrevrange(store.keys.jobs, 0, STATS_SCAN - 1)
    records = await store.get_many(job_ids)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    durations: dict[str, list[float]] = defaultdict(list)
    for record in records:
        if record is None:
            continue
        counts[record.task][record.state.value] += 1
        if record.state == JobState.completed:
            seconds = _seconds_between(record.started_at, record.finished_at)
            if seconds is not None:
                durations[record.task].append(seconds)
    queue_depth = await store.redis.zcard(store.keys.queue)

    def summary(task_counts: Counter[str], task_durations: list[float]) -> dict[str, Any]:
        return {
            "counts": {s.value: task_counts.get(s.value, 0) for s in JobState},
            "duration_p50": _percentile(task_durations, 50),
            "duration_p95": _percentile(task_durations, 95),
        }

    all_counts: Counter[str] = Counter()
    for task_counts in counts.values():
        all_counts.update(task_counts)
    all_durations = [d for ds in durations.values() for d in ds]
    return JSONResponse(
        {
            "tasks": {
                spec.name: summary(counts[spec.name], durations[spec.name]) for spec in all_tasks()
            },
            "total": summary(all_counts, all_durations),
            "queue_depth": queue_depth,
            "streams_open": state.hub.subscriber_count,
            "scanned_jobs": len(job_ids),
        }
    )
