"""What the web process holds for its lifetime: settings, Redis, the store, the hub, arq."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from arq.connections import ArqRedis
from redis.asyncio import Redis

from stepstream.server.auth import Authenticator
from stepstream.server.hub import Hub
from stepstream.tasks.queue import RUN_JOB, enqueue_commands
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
        """``job_id``'s queue entry as commands for a store script (tasks/queue.py)."""
        return enqueue_commands(self.arq, self.store.keys.queue, job_id, run_at)

    async def enqueue(self, job_id: str) -> None:
        # The arq job id is the Stepstream job id: enqueueing the same job twice is a no-op.
        await self.arq.enqueue_job(
            RUN_JOB, job_id, _job_id=job_id, _queue_name=self.store.keys.queue
        )
