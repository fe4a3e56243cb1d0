"""Cached results: a task declared with ``@task(..., cache_ttl=seconds)`` reuses the result of a
completed job for the same input (and the same owner) for that many seconds.

The worker stores the result with the job's ``completed`` event; the web process looks it up
when a job is submitted and, on a hit, records a completed job marked ``cached: true`` without
running it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from redis.asyncio import Redis

from stepstream.tasks.commands import Command
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.registry import TaskSpec


def input_digest(task: str, owner: str | None, raw_input: dict[str, Any]) -> str:
    """The same task, owner and input (keys in any order) give the same digest. Owners never
    share a cache: one owner's result is not another's to read."""
    body = json.dumps(
        {"task": task, "owner": owner, "input": raw_input},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(body.encode()).hexdigest()


def result_commands(
    keys: Keys,
    spec: TaskSpec,
    owner: str | None,
    raw_input: dict[str, Any],
    job_id: str,
    result: Any,
) -> list[Command]:
    """The cache entry of a completed job, as commands for its ``completed`` append: written in
    the same script, so a client that sees the job completed and submits the same input again
    finds the result (written after, there was a moment when it ran the job a second time)."""
    if not spec.cache_ttl:
        return []
    key = keys.result_cache(spec.name, input_digest(spec.name, owner, raw_input))
    value = json.dumps({"job_id": job_id, "result": result}, separators=(",", ":"))
    return [Command("SET", [key], (value, "PX", max(1, int(spec.cache_ttl * 1000))))]


async def lookup(
    redis: Redis, keys: Keys, spec: TaskSpec, owner: str | None, raw_input: dict[str, Any]
) -> dict[str, Any] | None:
    """``{"job_id", "result"}`` of a completed job with this input, while it is cached."""
    if not spec.cache_ttl:
        return None
    raw = await redis.get(keys.result_cache(spec.name, input_digest(spec.name, owner, raw_input)))
    if raw is None:
        return None
    value = json.loads(raw)
    return value if isinstance(value, dict) else None
