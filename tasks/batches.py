"""Batches: one parent job over many child jobs of one task (docs/ai-workloads.md).

The parent never reaches a worker. It is ``running`` from its creation; each child that ends
(whoever ends it: a worker, or the web process cancelling a child that had not started) reports
here, which counts the outcome atomically and appends a ``progress`` event to the parent ("23 of
50 done, 2 failed") carrying the child's result or error. The report that makes the count reach
the batch's size also appends the parent's ``completed`` with the final counts.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from stepstream.tasks.models import JobRecord, JobState, utcnow
from stepstream.tasks.store import JobStore, new_event

logger = logging.getLogger("stepstream.batches")

OUTCOMES = ("completed", "failed", "cancelled")

# Count one child's outcome. KEYS: the batch's counts hash. ARGV: child id, outcome, ttl.
# The hash maps each ended child to its outcome and keeps "#done" and "#<outcome>" counters, so
# a child reported twice (a redelivered report) counts once, and a child retried by hand after
# the batch moved its count from one outcome to the other. Returns done, completed, failed,
# cancelled, and whether this report changed anything.
_COUNT_LUA = """
local prev = redis.call('HGET', KEYS[1], ARGV[1])
local changed = 1
if prev == ARGV[2] then
  changed = 0
else
  if prev then
    redis.call('HINCRBY', KEYS[1], '#' .. prev, -1)
  else
    redis.call('HINCRBY', KEYS[1], '#done', 1)
  end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HINCRBY', KEYS[1], '#' .. ARGV[2], 1)
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
local counts = redis.call('HMGET', KEYS[1], '#done', '#completed', '#failed', '#cancelled')
return {tonumber(counts[1] or 0), tonumber(counts[2] or 0), tonumber(counts[3] or 0),
        tonumber(counts[4] or 0), changed}
"""


def summary_message(counts: dict[str, int], size: int) -> str:
    text = f"{counts['done']} of {size} done"
    extra = [f"{counts[k]} {k}" for k in ("failed", "cancelled") if counts.get(k)]
    return text + (f" ({', '.join(extra)})" if extra else "")


def empty_counts(size: int) -> dict[str, int]:
    return {"size": size, "done": 0, "completed": 0, "failed": 0, "cancelled": 0}


async def child_finished(
    store: JobStore,
    child: JobRecord,
    outcome: str,
    *,
    result: Any = None,
    error: dict[str, Any] | None = None,
) -> None:
    """Report a child's end to its batch. Never raises: the child has ended whatever happens
    here (a failure is logged)."""
    if child.batch_id is None:
        return
    try:
        await _report(store, child, outcome, result, error)
    except Exception:
        logger.warning(
            "could not report job %s to its batch %s", child.id, child.batch_id, exc_info=True
        )


_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@asynccontextmanager
async def _batch_lock(store: JobStore, batch_id: str) -> AsyncIterator[None]:
    key = store.keys.batch_lock(batch_id)
    token = secrets.token_hex(8)
    deadline = time.monotonic() + 10
    # The lock expires by itself (5 s) if its holder dies; a report never waits past 10 s.
    while not await store.redis.set(key, token, nx=True, px=5_000):
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} stayed locked")
        await asyncio.sleep(0.005)
    try:
        yield
    finally:
        await store.redis.eval(_RELEASE_LUA, 1, key, token)  # type: ignore[misc]


def _ends(parent: JobRecord, counts: dict[str, int], size: int) -> bool:
    """Every child is counted, and the parent still runs: its end is yet to be written."""
    return counts["done"] >= size and parent.state == JobState.running


async def _report(
    store: JobStore,
    child: JobRecord,
    outcome: str,
    result: Any,
    error: dict[str, Any] | None,
) -> None:
    batch_id = child.batch_id
    assert batch_id is not None
    parent = await store.get(batch_id)
    if parent is None or parent.batch is None:
        return
    size = int(parent.batch.get("size", 0))
    # Counting and reporting happen under the batch's lock: two children ending at the same
    # moment would otherwise append "12 of 12" before "11 of 12".
    async with _batch_lock(store, batch_id):
        done, completed, failed, cancelled, changed = await store.redis.eval(  # type: ignore[misc]
            _COUNT_LUA,
            1,
            store.keys.batch_counts(batch_id),
            child.id,
            outcome,
            str(store.settings.retention_seconds),
        )
        counts = {
            "size": size,
            "done": int(done),
            "completed": int(completed),
            "failed": int(failed),
            "cancelled": int(cancelled),
        }
        parent = await store.get(batch_id) or parent  # as other children's reports left it
        # Counted before (a repeated report): only what the parent has not shown yet is done
        # again, so a report cut off after the count (its worker killed) is completed here.
        shown = int((parent.batch or {}).get("done", 0))
        if not changed and (shown >= counts["done"] and not _ends(parent, counts, size)):
            return
        report = child_report(child, outcome, result, error)
        if changed or shown < counts["done"]:
            event, fields = _progress(parent, counts, report)
            await store.append(
                batch_id, event, fields, owner=parent.owner, expect=(JobState.running,)
            )
        if counts["done"] >= size:
            event, fields = _completion(parent, counts)
            await store.append(
                batch_id, event, fields, owner=parent.owner, expect=(JobState.running,)
            )


def child_report(
    child: JobRecord, outcome: str, result: Any, error: dict[str, Any] | None
) -> dict[str, Any]:
    """A child's end as its parent's ``progress`` event carries it."""
    report: dict[str, Any] = {"id": child.id, "index": child.batch_index, "state": outcome}
    if outcome == "completed":
        report["result"] = result
    elif error is not None:
        report["error"] = {k: v for k, v in error.items() if k != "traceback"}
    return report


def _progress(
    parent: JobRecord, counts: dict[str, int], report: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parent's ``progress`` event for one more child ended, and its record's fields."""
    size = counts["size"]
    message = summary_message(counts, size)
    event = new_event(
        parent.id,
        "progress",
        parent.attempt,
        current=counts["done"],
        total=size,
        message=message,
        counts=counts,
        child=report,
    )
    fields = {
        "progress": round(counts["done"] / size, 4) if size else 1.0,
        "message": message,
        "batch": counts,
    }
    return event, fields


def _completion(parent: JobRecord, counts: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parent's ``completed`` event once every child has ended, and its record's fields.
    "completed" says the batch ran to its end; the counts say how its items fared (a batch
    with failed items still completes)."""
    summary = {k: counts[k] for k in ("size", "completed", "failed", "cancelled")}
    event = new_event(parent.id, "completed", parent.attempt, result=summary)
    fields = {
        "state": JobState.completed,
        "result": summary,
        "progress": 1.0,
        "message": summary_message(counts, counts["size"]),
        "batch": counts,
        "finished_at": utcnow(),
    }
    return event, fields


@dataclass(frozen=True)
class Opening:
    """What a new batch's create writes beyond its ``queued`` and ``started``: see
    ``opening``."""

    events: list[dict[str, Any]]
    fields: dict[str, Any]  # to apply to the parent's record before its create
    then: list[list[str | bytes | int]]


def opening(store: JobStore, parent: JobRecord, cached: Sequence[JobRecord]) -> Opening:
    """A new batch with its ``cached`` children (answered from the cache, created completed
    in the same ``MULTI``) already counted: a ``progress`` event for each (and the parent's
    ``completed`` when every child was), their outcomes in the counts hash. Written by the
    parent's create, so no report is left to make after the batch is stored."""
    counts = empty_counts(int((parent.batch or {})["size"]))
    events: list[dict[str, Any]] = []
    fields: dict[str, Any] = {}
    outcomes: list[str | bytes | int] = []
    for child in cached:
        counts = {**counts, "done": counts["done"] + 1, "completed": counts["completed"] + 1}
        event, fields = _progress(
            parent, counts, child_report(child, "completed", child.result, None)
        )
        events.append(event)
        outcomes += [child.id, "completed"]
    if not cached:
        return Opening([], {}, [])
    if counts["done"] >= counts["size"]:
        event, done = _completion(parent, counts)
        events.append(event)
        fields.update(done)
    key = store.keys.batch_counts(parent.id)
    then: list[list[str | bytes | int]] = [
        # In pieces: the script unpacks each command onto Lua's stack (8,000 slots).
        *(["HSET", key, *outcomes[i : i + 1_000]] for i in range(0, len(outcomes), 1_000)),
        ["HSET", key, "#done", counts["done"], "#completed", counts["completed"]],
        ["EXPIRE", key, store.settings.retention_seconds],
    ]
    return Opening(events, fields, then)
