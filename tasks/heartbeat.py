"""What workers tell the web processes through Redis: heartbeats, and job run times.

Workers have no HTTP port. Instead of each exposing its own ``/metrics`` (a port per worker to
allocate, firewall and discover), they write to Redis and every web process reads it back:

- a **heartbeat** per worker: a key with a short TTL holding the worker's identity and the ids
  of the jobs it is running, plus a sorted set of worker ids by last beat, so readers find the
  workers without scanning the keyspace. A stopped worker deletes its key; a killed one's key
  expires after three missed beats.
- **run times**: a duration histogram per task and outcome (``Keys.duration_histogram``) and a
  capped list of recent durations per task for p50/p95, written by the worker after a job's
  terminal event was appended (``job_finished``). This is best effort: a process that dies
  between the append and this write loses one observation, and a Redis error here is logged and
  dropped, never failing the job.

The job counters are not written here: every transition (submitted, started, retried, waiting,
completed, failed, cancelled) is counted by the job store's append script as it is written
(tasks/transitions.py), so no process can miss or double one. This module reads them back, with
the run times, for /metrics and /api/stats.
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

from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import JobRecord, utcnow
from stepstream.tasks.store import JobStore
from stepstream.tasks.transitions import COUNTERS, DAY_SECONDS, WINDOW_SECONDS, day_windows

logger = logging.getLogger("stepstream.heartbeat")
job_logger = logging.getLogger("stepstream.worker")

# Histogram bucket upper bounds in seconds (Prometheus style; +Inf is implied).
DURATION_BUCKETS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200,
)  # fmt: skip
DURATION_SAMPLES = 1_000  # per task, for p50/p95
TIMED = ("completed", "failed")  # the outcomes with a run time


def _bucket_label(seconds: float) -> str:
    for bound in DURATION_BUCKETS:
        if seconds <= bound:
            return f"{bound:g}"
    return "+Inf"


# -- run times ------------------------------------------------------------------------------


async def observe_duration(
    redis: Redis,
    keys: Keys,
    task: str,
    outcome: str,
    duration: float,
    *,
    now: float | None = None,
) -> None:
    """Record the run time (seconds) of a job that ended ``outcome`` (``TIMED``)."""
    now = time.time() if now is None else now
    duration = max(0.0, duration)
    histogram = keys.duration_histogram(task, outcome)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(histogram, _bucket_label(duration), 1)
            pipe.hincrby(histogram, "count", 1)
            pipe.hincrbyfloat(histogram, "sum", duration)
            if outcome == "completed":
                samples = keys.durations(task)
                pipe.lpush(samples, f"{int(now * 1000)} {duration:.6f}")
                pipe.ltrim(samples, 0, DURATION_SAMPLES - 1)
                pipe.expire(samples, DAY_SECONDS + WINDOW_SECONDS)
            await pipe.execute()
    except Exception:
        logger.warning("could not record the run time of a job of %s", task, exc_info=True)


async def job_finished(
    store: JobStore, record: JobRecord, outcome: str, error: Mapping[str, Any] | None = None
) -> None:
    """Log a job's end and record its run time, after its terminal event was appended (which
    counted it)."""
    duration = seconds_since(record.started_at) if outcome in TIMED else None
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
    if duration is not None:
        await observe_duration(store.redis, store.keys, record.task, outcome, duration)


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
    """The cluster-wide counters: transitions by task, and run times by task and outcome."""

    by_task: dict[str, dict[str, int]] = field(default_factory=dict)  # task → counter → n
    durations: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # (task, outcome)

    def get(self, task: str, counter: str) -> int:
        return self.by_task.get(task, {}).get(counter, 0)


def _by_task(
    names: Iterable[str], hashes: Iterable[Mapping[str, str]]
) -> dict[str, dict[str, int]]:
    """Counter hashes (one per name in ``names``, task → n) as task → name → n, summed."""
    out: dict[str, dict[str, int]] = {}
    for name, raw in zip(names, hashes, strict=True):
        for task, value in raw.items():
            counts = out.setdefault(task, {})
            counts[name] = counts.get(name, 0) + int(value)
    return out


async def read_counters(redis: Redis, keys: Keys) -> Counters:
    """The transition counters, summed over the log plane's partitions (one on one server),
    and the run-time histograms."""
    names = [name for _ in keys.every_partition() for name in COUNTERS]
    async with redis.pipeline(transaction=False) as pipe:
        for part in keys.every_partition():
            for name in COUNTERS:
                pipe.hgetall(part.transitions(name))
        totals = await pipe.execute()
    out = Counters(by_task=_by_task(names, totals))
    timed = [(task, outcome) for task in sorted(out.by_task) for outcome in TIMED]
    async with redis.pipeline(transaction=False) as pipe:
        for task, outcome in timed:
            pipe.hgetall(keys.duration_histogram(task, outcome))
        histograms = await pipe.execute()
    for (task, outcome), raw in zip(timed, histograms, strict=True):
        if not raw:
            continue
        count, total = int(raw.pop("count", 0)), float(raw.pop("sum", 0.0))
        buckets = {label: int(n) for label, n in raw.items()}
        out.durations[(task, outcome)] = Histogram(buckets, count, total)
    return out


async def read_day(
    redis: Redis, keys: Keys, tasks: Iterable[str], now: float | None = None
) -> tuple[dict[str, dict[str, int]], dict[str, list[float]]]:
    """Transitions by task over the last 24 h, and the durations of completed jobs in that
    time."""
    now = time.time() if now is None else now
    names = list(tasks)
    parts = keys.every_partition()  # summed over the partitions (one on one server)
    windows = [
        (part, counter, bucket)
        for part in parts
        for bucket in day_windows(now)
        for counter in COUNTERS
    ]
    async with redis.pipeline(transaction=False) as pipe:
        for part, counter, bucket in windows:
            pipe.hgetall(part.transitions_window(counter, bucket))
        for task in names:
            pipe.lrange(keys.durations(task), 0, DURATION_SAMPLES - 1)
        results = await pipe.execute()
    counts, samples = results[: len(windows)], results[len(windows) :]
    outcomes = _by_task((counter for _, counter, _ in windows), counts)
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
    # One GET each, not MGET: on a cluster the keys are in many slots.
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.get(keys.worker(worker_id))
        values: list[str | None] = await pipe.execute()
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
