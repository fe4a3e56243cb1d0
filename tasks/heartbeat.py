"""What workers tell the web processes through Redis: heartbeats, and job counters.

Workers have no HTTP port. Instead of each exposing its own ``/metrics`` (a port per worker to
allocate, firewall and discover), they write to Redis and every web process reads it back:

- a **heartbeat** per worker: a key with a short TTL holding the worker's identity and the ids
  of the jobs it is running, plus a sorted set of worker ids by last beat, so readers find the
  workers without scanning the keyspace. A stopped worker deletes its key; a killed one's key
  expires after three missed beats.
- **counters** in one hash (``Keys.metrics``): submissions (written by the web), completions,
  failures, retries and cancellations by task, and a job duration histogram. Counting happens
  after the terminal event was appended (the append is a compare-and-set, so it succeeds once
  per job): each outcome is counted once. A process that dies between the append and the count
  loses that one count; the job record is unaffected.
- **windows** of 15 minutes with the same outcomes, expiring after a day, for "completed and
  failed in the last 24 h", and a capped list of recent durations per task for p50/p95.

Nothing here changes the job store's append script; all of it is best effort and never fails
a job: a Redis error while counting is logged and dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

from stepstream.tasks.keys import Keys
from stepstream.tasks.models import JobRecord, utcnow
from stepstream.tasks.store import JobStore

logger = logging.getLogger("stepstream.heartbeat")
job_logger = logging.getLogger("stepstream.worker")

# Histogram bucket upper bounds in seconds (Prometheus style; +Inf is implied).
DURATION_BUCKETS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200,
)  # fmt: skip
WINDOW_SECONDS = 15 * 60
DAY_SECONDS = 24 * 3600
DURATION_SAMPLES = 1_000  # per task, for p50/p95
OUTCOMES = ("completed", "failed", "retried", "cancelled")


def window_start(at: float) -> int:
    return int(at // WINDOW_SECONDS) * WINDOW_SECONDS


def day_windows(now: float) -> list[int]:
    """The windows that cover the last 24 h (the oldest one may start up to 15 min earlier)."""
    last = window_start(now)
    first = window_start(now - DAY_SECONDS)
    return list(range(first, last + 1, WINDOW_SECONDS))


def _bucket_label(seconds: float) -> str:
    for bound in DURATION_BUCKETS:
        if seconds <= bound:
            return f"{bound:g}"
    return "+Inf"


# -- counters -------------------------------------------------------------------------------


async def count_outcome(
    redis: Redis,
    keys: Keys,
    task: str,
    outcome: str,
    duration: float | None = None,
    *,
    now: float | None = None,
) -> None:
    """Count one outcome (``OUTCOMES``) of a job; ``duration`` (seconds) for terminal ones."""
    now = time.time() if now is None else now
    window = keys.stats_window(window_start(now))
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(keys.metrics, f"{outcome}|{task}", 1)
            pipe.hincrby(window, f"{outcome}|{task}", 1)
            # A window is read for a day after it closes, then it is of no use.
            pipe.expire(window, DAY_SECONDS + 2 * WINDOW_SECONDS)
            if duration is not None and outcome in ("completed", "failed"):
                duration = max(0.0, duration)
                label = _bucket_label(duration)
                pipe.hincrby(keys.metrics, f"duration_bucket|{task}|{outcome}|{label}", 1)
                pipe.hincrby(keys.metrics, f"duration_count|{task}|{outcome}", 1)
                pipe.hincrbyfloat(keys.metrics, f"duration_sum|{task}|{outcome}", duration)
                if outcome == "completed":
                    samples = keys.durations(task)
                    pipe.lpush(samples, f"{int(now * 1000)} {duration:.6f}")
                    pipe.ltrim(samples, 0, DURATION_SAMPLES - 1)
                    pipe.expire(samples, DAY_SECONDS + WINDOW_SECONDS)
            await pipe.execute()
    except Exception:
        logger.warning("could not count outcome %s of %s", outcome, task, exc_info=True)


async def job_finished(
    store: JobStore, record: JobRecord, outcome: str, error: Mapping[str, Any] | None = None
) -> None:
    """Log and count a job's end, after its terminal event was appended."""
    duration = seconds_since(record.started_at) if outcome != "cancelled" else None
    fields: dict[str, Any] = {"job_id": record.id, "task": record.task, "outcome": outcome}
    if duration is not None:
        fields["duration_s"] = round(duration, 6)
    if error is not None:
        fields["error_type"] = error.get("type")
        fields["error_step"] = error.get("step")
    if outcome == "failed":
        message = error.get("message") if error is not None else None
        job_logger.warning("job failed: %s", message, extra=fields)
    else:
        job_logger.info("job %s", outcome, extra=fields)
    await count_outcome(store.redis, store.keys, record.task, outcome, duration)


@dataclass
class Histogram:
    buckets: dict[str, int] = field(default_factory=dict)  # label → count in that bucket only
    count: int = 0
    sum: float = 0.0

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: each bound with the count of observations at or below it."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound in DURATION_BUCKETS:
            label = f"{bound:g}"
            running += self.buckets.get(label, 0)
            out.append((label, running))
        out.append(("+Inf", self.count))
        return out


@dataclass
class Counters:
    """The cluster-wide counters, as read from ``Keys.metrics``."""

    by_task: dict[str, dict[str, int]] = field(default_factory=dict)  # task → kind → n
    durations: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # (task, outcome)

    def get(self, task: str, kind: str) -> int:
        return self.by_task.get(task, {}).get(kind, 0)


def parse_counters(raw: dict[str, str]) -> Counters:
    out = Counters()
    for name, value in raw.items():
        kind, _, rest = name.partition("|")
        if kind == "duration_bucket":
            task_outcome, _, label = rest.rpartition("|")
            task, _, outcome = task_outcome.rpartition("|")
            hist = out.durations.setdefault((task, outcome), Histogram())
            hist.buckets[label] = int(value)
        elif kind in ("duration_count", "duration_sum"):
            task, _, outcome = rest.rpartition("|")
            hist = out.durations.setdefault((task, outcome), Histogram())
            if kind == "duration_count":
                hist.count = int(value)
            else:
                hist.sum = float(value)
        elif rest:
            out.by_task.setdefault(rest, {})[kind] = int(value)
    return out


async def read_counters(redis: Redis, keys: Keys) -> Counters:
    raw: dict[str, str] = await redis.hgetall(keys.metrics)  # type: ignore[misc]
    return parse_counters(raw)


async def read_day(
    redis: Redis, keys: Keys, tasks: Iterable[str], now: float | None = None
) -> tuple[dict[str, dict[str, int]], dict[str, list[float]]]:
    """Outcomes by task over the last 24 h, and the durations of completed jobs in that time."""
    now = time.time() if now is None else now
    names = list(tasks)
    async with redis.pipeline(transaction=False) as pipe:
        for bucket in day_windows(now):
            pipe.hgetall(keys.stats_window(bucket))
        for task in names:
            pipe.lrange(keys.durations(task), 0, DURATION_SAMPLES - 1)
        results = await pipe.execute()
    windows, samples = results[: -len(names) or None], results[len(results) - len(names) :]
    outcomes: dict[str, dict[str, int]] = {}
    for raw in windows:
        for name, value in raw.items():
            kind, _, task = name.partition("|")
            task_counts = outcomes.setdefault(task, {})
            task_counts[kind] = task_counts.get(kind, 0) + int(value)
    since_ms = (now - DAY_SECONDS) * 1000
    durations: dict[str, list[float]] = {}
    for task, rows in zip(names, samples, strict=True):
        kept: list[float] = []
        for row in rows:
            finished_ms, _, seconds = row.partition(" ")
            if float(finished_ms) >= since_ms:
                kept.append(float(seconds))
        durations[task] = kept
    return outcomes, durations


# -- heartbeats -----------------------------------------------------------------------------


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Heartbeat:
    """Writes this worker's heartbeat every ``interval`` seconds until stopped."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        running: Callable[[], Iterable[str]],
        *,
        interval: float,
        max_jobs: int,
        worker_id: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.running = running
        self.interval = interval
        self.ttl = interval * 3  # three missed beats: gone
        self.worker_id = worker_id or new_worker_id()
        self.started_at = utcnow()
        self.max_jobs = max_jobs
        self._task: asyncio.Task[None] | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "last_seen": utcnow(),  # RFC 3339, like every time in the API
            "max_jobs": self.max_jobs,
            "running": sorted(self.running()),
        }

    async def beat(self) -> None:
        now_ms = int(time.time() * 1000)
        ttl_ms = max(1, int(self.ttl * 1000))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker(self.worker_id), json.dumps(self.payload()), px=ttl_ms)
            pipe.zadd(self.keys.workers, {self.worker_id: now_ms})
            # Ids of workers silent for much longer than any TTL are of no use to readers.
            pipe.zremrangebyscore(self.keys.workers, "-inf", now_ms - max(60_000, 10 * ttl_ms))
            await pipe.execute()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="stepstream-heartbeat")

    async def _loop(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception:  # a Redis blip: the next beat tries again
                logger.warning("could not write the worker heartbeat", exc_info=True)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(self.keys.worker(self.worker_id))
                pipe.zrem(self.keys.workers, self.worker_id)
                await pipe.execute()
        except Exception:  # it expires on its own
            logger.warning("could not remove the worker heartbeat", exc_info=True)


async def read_workers(redis: Redis, keys: Keys, limit: int = 1_000) -> list[dict[str, Any]]:
    """The workers whose heartbeat has not expired, oldest first."""
    ids: list[str] = await redis.zrevrange(keys.workers, 0, limit - 1)
    if not ids:
        return []
    values = await redis.mget([keys.worker(worker_id) for worker_id in ids])
    workers = [json.loads(value) for value in values if value]
    workers.sort(key=lambda w: (w.get("started_at") or "", w.get("id") or ""))
    return workers


def seconds_since(timestamp: str | None, now: float | None = None) -> float | None:
    """Seconds from an RFC 3339 timestamp (as stored in job records) to now."""
    if not timestamp:
        return None
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    value = (time.time() if now is None else now) - then
    return value if math.isfinite(value) else None
