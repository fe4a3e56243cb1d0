"""What the web process holds for its lifetime: settings, Redis, the store, the hub, arq."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from arq.connections import ArqRedis
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

    async def enqueue(self, job_id: str) -> None:
        # The arq job id is the Stepstream job id: enqueueing the same job twice is a no-op.
        await self.arq.enqueue_job(
            RUN_JOB, job_id, _job_id=job_id, _queue_name=self.store.keys.queue
        )
