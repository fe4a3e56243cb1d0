"""A job's arq queue entry, written as commands that ride along with a store script.

arq's ``enqueue_job`` spends three round trips (WATCH, EXISTS, MULTI) guarding against an arq
job of the same id. A job whose record the same script creates (or moves back to ``queued``)
has none, so the two writes go with it: the record, its event and the queue entry appear
together or not at all. Payload, score and expiry are arq's own (``serialize_job``,
``expires_extra_ms`` past the time the job is due).
"""

from __future__ import annotations

import time
from datetime import datetime

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job

RUN_JOB = "stepstream.run_job"  # the one arq function every Stepstream job runs as

Command = list[str | bytes | int]


def enqueue_commands(
    arq: ArqRedis, queue: str, job_id: str, run_at: datetime | None = None
) -> list[Command]:
    """The arq enqueue of ``job_id`` as commands for a store script; with ``run_at``,
    deferred until then (arq's ``_defer_until``: its queue is a sorted set scored by due time,
    so a deferred entry survives restarts and no worker takes it early)."""
    now_ms = int(time.time() * 1000)
    due_ms = now_ms if run_at is None else max(now_ms, int(run_at.timestamp() * 1000))
    payload = serialize_job(RUN_JOB, (job_id,), {}, None, now_ms, serializer=arq.job_serializer)
    expires_ms = due_ms - now_ms + arq.expires_extra_ms
    return [
        ["PSETEX", job_key_prefix + job_id, expires_ms, payload],
        ["ZADD", queue, due_ms, job_id],
    ]
