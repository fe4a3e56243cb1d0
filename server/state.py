"""What the web process holds for its lifetime: settings, Redis, the store, the hub, arq."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

from stepstream.server.auth import Authenticator
from stepstream.server.hub import Hub
from stepstream.tasks.runtime import RUN_JOB
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore


@dataclass
class AppState:
    settings: Settings
    redis: Redis
    store: JobStore
    hub: Hub
    arq: ArqRedis
    auth: Authenticator
    # Open streams of this process, in all and by what they count against (server/guards.py).
    open_streams: int = 0
    streams_by_holder: Counter[str] = field(default_factory=Counter)
    streams_refused: Counter[str] = field(default_factory=Counter)  # by limit: key, token, process

    def enqueue_commands(
        self, job_id: str, run_at: datetime | None = None
    ) -> list[list[str | bytes | int]]:
        """The arq enqueue of a job created a moment ago, as commands for the create script;
        with ``run_at``, deferred until then (arq's ``_defer_until``).

        arq's ``enqueue_job`` spends three round trips (WATCH, EXISTS, MULTI) guarding against
        an arq job of the same id; a job whose record the same script creates has none, so the
        two writes ride along with the create: the record, its ``queued`` event and the queue
        entry appear together or not at all. Payload, score and expiry are arq's own
        (``serialize_job``, ``expires_extra_ms`` past the time it is due).
        """
        now_ms = int(time.time() * 1000)
        due_ms = now_ms if run_at is None else max(now_ms, int(run_at.timestamp() * 1000))
        payload = serialize_job(
            RUN_JOB, (job_id,), {}, None, now_ms, serializer=self.arq.job_serializer
        )
        expires_ms = due_ms - now_ms + self.arq.expires_extra_ms
        return [
            ["PSETEX", job_key_prefix + job_id, expires_ms, payload],
            ["ZADD", self.store.keys.queue, due_ms, job_id],
        ]

    async def enqueue(self, job_id: str) -> None:
        # The arq job id is the Stepstream job id: enqueueing the same job twice is a no-op.
        await self.arq.enqueue_job(
            RUN_JOB, job_id, _job_id=job_id, _queue_name=self.store.keys.queue
        )
