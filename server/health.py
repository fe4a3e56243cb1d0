"""Liveness, readiness and queue statistics.

``/api/stats`` stays cheap however many jobs Redis holds: the jobs that have not finished are
read from a bounded scan of arq's queue (a running job stays in it until it ends), the ones
that finished come from counters the workers keep per 15-minute window, the durations from a
capped list per task, and the workers from their heartbeats (see ``tasks/heartbeat.py``).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from stepstream.server.bodies import (
    Alive,
    Counts,
    Ready,
    Stats,
    Unready,
    WebhookAgreement,
    WebhooksUnknown,
    json_response,
)
from stepstream.server.state import AppState
from stepstream.tasks import heartbeat, outbox, transitions, webhook_settings
from stepstream.tasks.models import JobState
from stepstream.tasks.queue import job_of_entry
from stepstream.tasks.store import JobStore

# The most queue entries one request reads. Past it, counts by state are of the oldest entries
# (running jobs and the longest waiting sort first) and ``scan_truncated`` says so.
STATS_SCAN = 5_000
ACTIVE = (
    JobState.scheduled.value,
    JobState.queued.value,
    JobState.running.value,
    JobState.retrying.value,
)
WAITING = (JobState.queued.value, JobState.retrying.value)


async def healthz(request: Request) -> Response:
    return json_response(Alive(status="ok"))


async def readyz(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    try:
        await state.store.ping()
    except Exception as exc:
        unready = Unready(status="unavailable", redis=f"unreachable: {type(exc).__name__}")
        return json_response(unready, 503)
    return json_response(
        Ready(
            status="ready",
            redis="ok",
            hub="connected" if state.hub.connected.is_set() else "reconnecting",
            webhooks=await webhooks_view(state),
        )
    )


async def webhooks_view(state: AppState) -> WebhookAgreement | WebhooksUnknown:
    """Whether the live processes agree on their webhook settings, and how many deliveries a
    worker's settings hold. Names and a count only: ``/readyz`` answers anyone, so the values
    and the reasons are for ``stepstream doctor``. Not a readiness failure: this process
    serves requests either way."""
    keys = state.store.keys
    try:
        announced = await webhook_settings.read(state.redis, keys)
        held = await outbox.held_count(state.store.redis, keys)
    except Exception as exc:
        return WebhooksUnknown(settings=f"unknown: {type(exc).__name__}")
    differing = [d.setting for d in webhook_settings.disagreements(announced)]
    return WebhookAgreement(
        settings="differ" if differing else "agree",
        differing=differing,
        processes=len(announced),
        held=held,
    )


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)


@dataclass
class QueueSnapshot:
    """The jobs that have not finished, from arq's queue."""

    active: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    oldest_age: dict[str, float] = field(default_factory=dict)  # task → s, runnable jobs only
    size: int = 0  # entries in arq's queue (waiting and running)
    scanned: int = 0

    @property
    def truncated(self) -> bool:
        return self.scanned < self.size

    @property
    def depth(self) -> int:
        """Jobs waiting for a worker (queued or retrying), whether due now or later."""
        seen = sum(c[s] for c in self.active.values() for s in WAITING)
        return seen + (self.size - self.scanned)  # entries past the scan are waiting ones

    @property
    def oldest(self) -> float | None:
        return max(self.oldest_age.values(), default=None)


async def read_queue(store: JobStore, now: float | None = None) -> QueueSnapshot:
    now_ms = (time.time() if now is None else now) * 1000
    async with store.queue.pipeline(transaction=False) as pipe:  # arq's queue: the queue plane
        pipe.zcard(store.keys.queue)
        pipe.zrange(store.keys.queue, 0, STATS_SCAN - 1, withscores=True)
        size, rows = await pipe.execute()
    snap = QueueSnapshot(size=size, scanned=len(rows))
    if not rows:
        return snap
    async with store.redis.pipeline(transaction=False) as pipe:
        for entry_id, _ in rows:
            pipe.hmget(store.keys.job(job_of_entry(entry_id)), ["task", "state"])
        fields = await pipe.execute()
    for (_, score), (task_raw, state_raw) in zip(rows, fields, strict=True):
        if task_raw is None or state_raw is None:
            continue  # the record expired; arq drops the entry when it next picks it up
        task, job_state = json.loads(task_raw), json.loads(state_raw)
        snap.active[task][job_state] += 1
        # arq scores an entry with the time it may run: a job due in the past is waiting for
        # a worker, and how long it has waited is the queue's health.
        if job_state in WAITING and score <= now_ms:
            age = (now_ms - score) / 1000
            snap.oldest_age[task] = max(age, snap.oldest_age.get(task, 0.0))
    return snap


async def read_workers(
    store: JobStore, may_read: Callable[[str | None, str], bool] | None = None
) -> list[dict[str, Any]]:
    """Live workers with their running jobs (task, state, step and attempt from the records).

    A job ``may_read`` refuses (another owner's) shows only its task and state, no id.
    """
    workers = await heartbeat.read_workers(store.queue, store.keys)
    job_ids = [job_id for w in workers for job_id in w.get("running", [])]
    details: dict[str, dict[str, Any]] = {}
    if job_ids:
        async with store.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(store.keys.job(job_id), ["task", "state", "step", "attempt", "owner"])
            rows = await pipe.execute()
        for job_id, row in zip(job_ids, rows, strict=True):
            task, job_state, step, attempt, owner = (
                json.loads(v) if v is not None else None for v in row
            )
            if may_read is not None and not may_read(owner, job_id):
                details[job_id] = {"job_id": None, "task": task, "state": job_state}
                continue
            details[job_id] = {
                "job_id": job_id,
                "task": task,
                "state": job_state,
                "step": step,
                "attempt": attempt,
            }
    for worker in workers:
        worker["running"] = [
            details.get(job_id, {"job_id": job_id}) for job_id in worker.get("running", [])
        ]
    return workers


async def stats(request: Request) -> Response:
    """Per task: jobs by state now (queued, running, retrying) and over the last 24 h
    (completed, failed, cancelled), queue depth and oldest wait, p50/p95 run time and failure
    rate; the workers alive with their running jobs; this process's open streams."""
    state: AppState = request.app.state.stepstream
    # Counts are of the whole deployment; running job ids only of the caller's own jobs.
    principal = await state.auth.authenticate(request)
    store = state.store
    now = time.time()
    queue = await read_queue(store, now)
    registered = [spec.name for spec in state.registry.tasks()]
    outcomes, durations = await heartbeat.read_day(store.redis, store.keys, registered, now)
    workers = await read_workers(store, principal.may_read)
    if principal.owner is not None:
        # A key sees its own jobs only: the machines they run on are the operator's business.
        workers = [_without_machine(worker) for worker in workers]
    names = list(dict.fromkeys([*registered, *queue.active, *outcomes]))

    def summary(
        active: Counter[str],
        done: dict[str, int],
        ds: list[float],
        oldest: float | None,
        waiting_extra: int = 0,
    ) -> Counts:
        counts = {s.value: active.get(s.value, 0) for s in JobState}
        for outcome in ("completed", "failed", "cancelled"):
            counts[outcome] = done.get(outcome, 0)
        finished = counts["completed"] + counts["failed"]
        return Counts(
            counts=counts,
            duration_p50=_percentile(ds, 50),
            duration_p95=_percentile(ds, 95),
            failure_rate=round(counts["failed"] / finished, 4) if finished else None,
            retried=done.get("retried", 0),
            queue_depth=sum(active.get(s, 0) for s in WAITING) + waiting_extra,
            oldest_queued_age=_round(oldest),
        )

    tasks: dict[str, Counts] = {}
    all_active: Counter[str] = Counter()
    all_done: Counter[str] = Counter()
    for name in names:
        active = queue.active.get(name, Counter())
        done = outcomes.get(name, {})
        tasks[name] = summary(active, done, durations.get(name, []), queue.oldest_age.get(name))
        all_active.update(active)
        all_done.update(done)
    total = summary(
        all_active,
        dict(all_done),
        [d for ds in durations.values() for d in ds],
        queue.oldest,
        queue.size - queue.scanned,
    )
    return json_response(
        Stats(
            tasks=tasks,
            total=total,
            queue_depth=queue.depth,
            oldest_queued_age=_round(queue.oldest),
            workers_alive=len(workers),
            workers=workers,
            streams_open=state.hub.subscriber_count,
            window_seconds=transitions.DAY_SECONDS,
            scanned_jobs=queue.scanned,
            scan_truncated=queue.truncated,
        )
    )


MACHINE_FIELDS = frozenset({"host", "pid"})


def _without_machine(worker: dict[str, Any]) -> dict[str, Any]:
    """A worker as an owner's key sees it: no host name or pid, and an id that names neither
    (the heartbeat's id is ``<host>-<pid>-<random>``) but stays the same for that worker."""
    shown = {k: v for k, v in worker.items() if k not in MACHINE_FIELDS}
    if isinstance(worker.get("id"), str):
        shown["id"] = "worker-" + hashlib.sha256(worker["id"].encode()).hexdigest()[:12]
    return shown


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
