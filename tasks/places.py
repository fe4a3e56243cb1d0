"""An owner's places under its limits on a cluster (docs/scaling.md, "Per-owner limits on a
cluster").

On one server the append script checks and takes an owner's places itself. On a cluster the
owner's jobs are in many partitions, so its unfinished jobs and its submissions per second are
counted in one partition, the owner's home (``Keys.owner_home``): a create first takes its
places there (tasks/scripts/reserve.lua), in one atomic call that every concurrent submission of
the owner passes through. A job's end gives its place back after its own script, through the
queue outbox (tasks/planes.py), so the count may be one too high for a moment, never too low.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from stepstream.tasks import lua
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import JobState
from stepstream.tasks.settings import Settings

# A place taken this long ago whose job has no record, or has ended, is dropped when the limit
# refuses: its create never came (the process died), or its end's release is late.
GRACE_SECONDS = 60


class Places:
    """The owners' places on a cluster's log plane."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._reserve = lua.Script(redis, lua.reserve())

    def unfinished(self, owner: str | None) -> str:
        """The owner's set of unfinished jobs, in its home partition."""
        return self.keys.owner_home(owner).owner_unfinished(owner)

    async def take(
        self,
        owner: str | None,
        ids: Sequence[str],
        take: int,
        rate: tuple[int, int] | None,
        score: str,
    ) -> tuple[str, int] | None:
        """Count a submission (``rate``: its limit and unix second), find ``take`` places free
        and give them to ``ids``, atomically; the refusal (``"rate"``, submitted; ``"limit"``,
        held) or None. A refusal by the limit is tried once more after dropping stale
        places (the submission counted once)."""
        keys = [self.unfinished(owner)]
        if rate is not None:
            keys.append(self.keys.owner_home(owner).submissions(owner, rate[1]))
        named: dict[str, Any] = {
            "limit": self.settings.max_unfinished_per_owner,
            "take": take,
            "rate": rate[0] if rate is not None else False,
            "score": score,
        }
        for attempt in range(2):
            reply = await self._reserve(keys=keys, args=[json.dumps(named), *ids])
            named["rate"] = False  # counted once: the same submission
            if reply[0] == "":
                return None
            if reply[0] == "limit" and attempt == 0 and await self.drop_stale(owner):
                continue
            break
        return str(reply[0]), int(reply[1])

    async def release(self, owner: str | None, ids: Sequence[str]) -> None:
        """Give back the places of creates that were refused."""
        await self.redis.zrem(self.unfinished(owner), *ids)

    async def drop_stale(self, owner: str | None) -> int:
        """Drop the places taken over ``GRACE_SECONDS`` ago whose job has no record (its create
        never came, or its record expired) or has ended (its release is late); how many."""
        key = self.unfinished(owner)
        horizon = (time.time() - GRACE_SECONDS) * 1_000_000
        ids: list[str] = await self.redis.zrangebyscore(key, "-inf", f"{horizon:.0f}")
        if not ids:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self.keys.job(job_id), "state")
            states: list[str | None] = await pipe.execute()
        gone = [
            job_id
            for job_id, state in zip(ids, states, strict=True)
            if state is None or JobState(json.loads(state)).terminal
        ]
        if gone:
            await self.redis.zrem(key, *gone)
        return len(gone)
