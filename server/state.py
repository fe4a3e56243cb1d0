"""What the web process holds for its lifetime: settings, Redis, the store, the hub, arq."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

from server.auth import Authenticator
from server.hub import Hub
from tasks.runtime import RUN_JOB
from tasks.settings import Settings
from tasks.store import JobStore


@dataclass
class AppState:
    settings: Settings
    redis: Redis
    store: JobStore
    hub: Hub
    arq: ArqRedis
    auth: Authenticator
    streams_by_owner: Counter[str | None] = field(default_factory=Counter)

    async def enqueue_new(self, job_id: str) -> None:
        """Enqueue a job created a moment ago, in one round trip.

        arq's ``enqueue_job`` spends three round trips (WATCH, EXISTS, MULTI) guarding against
        an arq job of the same id; a fresh 120-bit id has none, so its two writes go out in one
        MULTI. The payload and expiry are arq's own (``serialize_job``, ``expires_extra_ms``).
        """
        now_ms = int(time.time() * 1000)
        payload = serialize_job(
            RUN_JOB, (job_id,), {}, None, now_ms, serializer=self.arq.job_serializer
        )
        async with self.arq.pipeline(transaction=True) as pipe:
            pipe.psetex(job_key_prefix + job_id, self.arq.expires_extra_ms, payload)
            pipe.zadd(self.store.keys.queue, {job_id: now_ms})
            await pipe.execute()

    async def enqueue(self, job_id: str) -> None:
        # The arq job id is the Stepstream job id: enqueueing the same job twice is a no-op.
        await self.arq.enqueue_job(
            RUN_JOB, job_id, _job_id=job_id, _queue_name=self.store.keys.queue
        )
