"""Batches: one parent job over many child jobs of one task (docs/ai-workloads.md).

The parent never reaches a worker. It is ``running`` from its creation. A child's end is
counted into the batch by the append script that writes it (tasks/store.py), whoever writes
it (a worker, or the web process cancelling a child that had not started): the batch's counts
hash takes the child's outcome, and its ended list the child, in one call with the child's end,
so no end can be lost to its batch. Then the writer shows it (``child_finished``): it appends a
``progress`` event to the parent ("23 of 50 done, 2 failed") for each child counted and not
shown yet, in the order they were counted, carrying the child's result or error; the one that
shows the last child appends the parent's ``completed`` with the final counts too.

Showing needs no lock: it reads the parent and the counts under ``WATCH`` and appends in a
``MULTI``, so of two writers showing at once one appends and the other finds nothing left. A
writer that dies before showing leaves the child counted: the next child's writer shows it, and
so does arq's offer of the finished child again, or a cancel of the batch. A Redis error while
showing (Valkey restarting, a connection dropped while watching) is tried again for up to
``SHOW_SECONDS``; a worker that still could not show the end lets arq offer the child again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from redis.exceptions import RedisError, WatchError

from stepstream.tasks import creation, idempotency, tracing
from stepstream.tasks.commands import Command
from stepstream.tasks.models import JobRecord, JobState, utcnow
from stepstream.tasks.store import JobStore, appended_from, decode_record, new_event

logger = logging.getLogger("stepstream.batches")

PARENT_PREFIX = "batch:"  # a batch's parent's task: batch:<its children's task>
# Children ids per RPUSH into the batch's list: the script unpacks each command onto Lua's
# stack (8,000 slots).
LIST_PIECE = 1_000

SHOW_PAGE = 200  # children shown per append
# A writer that keeps losing the race, or meeting Redis errors, gives up after this long.
SHOW_SECONDS = 30.0
# The pause after a Redis error while showing: the first, and the longest it doubles up to.
SHOW_RETRY_SECONDS = (0.05, 1.0)


def summary_message(counts: dict[str, int], size: int) -> str:
    text = f"{counts['done']} of {size} done"
    extra = [f"{counts[k]} {k}" for k in ("failed", "cancelled") if counts.get(k)]
    return text + (f" ({', '.join(extra)})" if extra else "")


def empty_counts(size: int) -> dict[str, int]:
    return {"size": size, "done": 0, "completed": 0, "failed": 0, "cancelled": 0}


async def child_finished(store: JobStore, child: JobRecord) -> None:
    """Show the ended child ``child`` (and any other counted child not shown yet) in its
    batch's log. The child has ended and is counted whatever happens here; this raises only if
    showing failed for ``SHOW_SECONDS``, and a worker then lets arq offer the child again,
    whose next run only shows its end (tasks/runtime.py)."""
    if child.batch_id is not None:
        await show(store, child.batch_id)


async def show(store: JobStore, batch_id: str) -> None:
    """Append the batch's ``progress`` for every child counted and not shown yet, and its
    ``completed`` once every child is shown."""
    deadline = time.monotonic() + SHOW_SECONDS
    pause, longest = SHOW_RETRY_SECONDS
    while True:
        try:
            if await _show_some(store, batch_id):
                return
        except (RedisError, OSError):
            # The client's own retries gave up (Valkey restarting or loading its data), or a
            # connection dropped while watching (raised as WatchError before the MULTI).
            if time.monotonic() > deadline:
                raise
            logger.info("batch %s: could not show its children yet", batch_id, exc_info=True)
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} kept changing")


async def _show_some(store: JobStore, batch_id: str) -> bool:
    """One round of ``show``: True when nothing is left to show."""
    parent_key = store.keys.job(batch_id)
    counts_key = store.keys.batch_counts(batch_id)
    async with store.transaction(parent_key) as pipe:
        # Every count changes the counts hash, every report the parent: either one changing
        # after this read makes the MULTI apply nothing, and the round starts again.
        await pipe.watch(parent_key, counts_key)
        parent = decode_record(await pipe.hgetall(parent_key))  # type: ignore[misc]
        if parent is None or parent.batch is None or parent.state != JobState.running:
            return True
        shown = int(await pipe.hget(counts_key, "#shown") or 0)  # type: ignore[misc]
        entries: list[str] = await pipe.lrange(  # type: ignore[misc]
            store.keys.batch_ended(batch_id), shown, shown + SHOW_PAGE - 1
        )
        if not entries:
            return True
        children = await store.get_many([entry.split(" ")[0] for entry in entries])
        size = int(parent.batch.get("size", 0))
        counts = {**empty_counts(size), **{k: int(v) for k, v in parent.batch.items()}}
        events: list[dict[str, Any]] = []
        fields: dict[str, Any] = {}
        for entry, child in zip(entries, children, strict=True):
            child_id, outcome, prev = entry.split(" ")
            counts = {**counts, outcome: counts[outcome] + 1}
            if prev:  # ended before, then retried by hand: its count moves
                counts[prev] -= 1
            else:
                counts["done"] += 1
            event, fields = _progress(parent, counts, _report(child_id, child, outcome))
            events.append(event)
        if counts["done"] >= size:
            event, done = _completion(parent, counts)
            events.append(event)
            fields.update(done)
        pipe.multi()  # type: ignore[no-untyped-call]
        pending = await store.queue_append(
            pipe,
            batch_id,
            events,
            fields,
            owner=parent.owner,
            expect=(JobState.running,),
            then=[Command("HSET", [counts_key], ("#shown", shown + len(entries)))],
        )
        try:
            (reply,) = await pipe.execute()
        except WatchError:
            return False
    # Shown: look again for children counted meanwhile. Refused: the parent has ended.
    if not appended_from(reply).ok:
        return True
    await store.after(batch_id, pending)  # the batch's end releases nothing on one server
    return False


def _report(child_id: str, child: JobRecord | None, outcome: str) -> dict[str, Any]:
    if child is None:  # expired: its end is all the batch still knows
        return {"id": child_id, "index": None, "state": outcome}
    error = child.error.model_dump() if child.error is not None else None
    return child_report(child, outcome, child.result, error)


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
    then: list[Command]


def opening(store: JobStore, parent: JobRecord, cached: Sequence[JobRecord]) -> Opening:
    """A new batch with its ``cached`` children (answered from the cache, created completed
    in the same ``MULTI``) already shown: a ``progress`` event for each (and the parent's
    ``completed`` when every child was). Written by the parent's create, so nothing is left to
    show after the batch is stored; the children's creates, which follow it in the ``MULTI``,
    count themselves as they would any end."""
    counts = empty_counts(int((parent.batch or {})["size"]))
    events: list[dict[str, Any]] = []
    fields: dict[str, Any] = {}
    for child in cached:
        counts = {**counts, "done": counts["done"] + 1, "completed": counts["completed"] + 1}
        event, fields = _progress(
            parent, counts, child_report(child, "completed", child.result, None)
        )
        events.append(event)
    if not cached:
        return Opening([], {}, [])
    if counts["done"] >= counts["size"]:
        event, done = _completion(parent, counts)
        events.append(event)
        fields.update(done)
    key = store.keys.batch_counts(parent.id)
    then = [
        Command("HSET", [key], ("#shown", len(cached))),
        Command("EXPIRE", [key], (store.settings.retention_seconds,)),
    ]
    return Opening(events, fields, then)


async def create(
    store: JobStore,
    arq: ArqRedis,
    parent_id: str,
    task_name: str,
    children: Sequence[creation.NewJob],
    *,
    owner: str | None,
    subject: str | None,
    callback_url: str | None,
    trace: tracing.Carrier | None,
    claim: idempotency.Claim | None,
) -> creation.Created:
    """Create a batch: its parent ``parent_id`` over ``children`` (each with ``batch_id`` and
    ``batch_index`` set), confirming ``claim`` with it. The parent as stored, or as it would
    have been, refused (``"limit"``: nothing was written)."""
    size = len(children)
    now = utcnow()
    # Created running (its log says queued, then started): it runs from now until its last child
    # ends, and no worker ever holds it. Never queued, it holds no place among the owner's
    # unfinished jobs; its children do.
    parent = JobRecord(
        id=parent_id,
        task=PARENT_PREFIX + task_name,
        owner=owner,
        state=JobState.running,
        input={"task": task_name, "size": size},
        attempt=1,
        max_attempts=1,
        created_at=now,
        started_at=now,
        batch=empty_counts(size),
        message=summary_message(empty_counts(size), size),
        callback_url=callback_url,
        subject=subject,
        trace=trace,
    )
    # Each child's create: cached results are created completed (tasks/creation.py).
    plans = [await creation.plan(store, arq, child, trace) for child in children]
    child_ids = [plan.record.id for plan in plans]
    # Children answered from the cache are counted by the parent's own create.
    start = opening(store, parent, [p.record for p in plans if p.record.cached])
    parent = parent.model_copy(update=start.fields)
    children_key = [store.keys.batch_children(parent_id)]
    # The whole batch in one MULTI: the parent (with its cached children counted), the list of
    # its children and every child with its queue entry appear together or not at all, so a
    # web process dying here leaves no parent waiting for children that were never made. The
    # parent's create takes a place under the owner's unfinished-jobs limit for every input (a
    # cached child's is free again at once), and each child needs the parent: refused, the
    # batch writes nothing.
    calls = [
        store.create_call(
            parent,
            new_event(parent_id, "queued", 0, input=parent.input),
            new_event(parent_id, "started", 1, max_attempts=1),
            *start.events,
            then=[
                *(
                    Command("RPUSH", children_key, child_ids[i : i + LIST_PIECE])
                    for i in range(0, size, LIST_PIECE)
                ),
                Command("EXPIRE", children_key, (store.settings.retention_seconds,)),
                *start.then,
                *idempotency.confirmations(claim),
            ],
            take=size,
        ),
        *(creation.create_call(store, plan, requires=parent_id) for plan in plans),
    ]
    replies = await store.create_together(calls)
    if replies[0].ok:
        parent.last_event_id = replies[0].job_event_id
        if not all(reply.ok for reply in replies[1:]):
            # 120-bit ids collided: never expected.
            raise RuntimeError(f"batch {parent_id}: a job id exists already")
    return creation.Created(parent, replies[0])
