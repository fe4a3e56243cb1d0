"""A parent's view of its children (tasks/children.py): ``child`` events and rolled-up progress.

A child's end is counted into its parent's counts hash by the append script that writes the
end (tasks/store.py), as a batch's child is. Then the child's writer shows it here: one
``child`` event on the parent's log per counted end not shown yet, in the order they were
counted, each carrying the child's outcome and the counts so far, with the parent's record's
``children``, ``progress`` and ``message`` in the same append. No task code is involved.

Showing takes no lock: the counts hash is read under ``WATCH`` and the parent's append goes in a
``MULTI`` that also moves ``#shown``, so of two writers showing at once one appends and the
other finds nothing left; the events are in counting order and the counts never go back. A
writer that dies before showing leaves the end counted: the next child's end shows it.

Cost per child: its end's one script call (which counts it), one ``child`` event appended to
the parent when it starts and one when it ends (shown in pages when ends come together), and the
reads of the show (the counts hash, a page of the ended list, the parent and the children's
records). A child's own ``progress`` events cost the parent nothing: a running child's fraction
is not written to the parent's record. A read of the parent adds it (``with_running``): the
set of its running children (kept by the start and end appends above, no extra write) and each
one's ``progress``, one round trip per read, its size the children running at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from redis.exceptions import RedisError, WatchError

from stepstream.tasks.batches import child_report, summary_message
from stepstream.tasks.commands import Command
from stepstream.tasks.models import JobRecord, JobState
from stepstream.tasks.store import JobStore, appended_from, new_event

logger = logging.getLogger("stepstream.children")

SHOW_PAGE = 200
SHOW_SECONDS = 30.0
# A parent's states in which its children's events are shown (not once it has ended).
SHOWN_IN = (JobState.waiting, JobState.queued, JobState.running, JobState.retrying)
COUNTED = ("size", "done", "completed", "failed", "cancelled")


def counts_of(raw: dict[str, str]) -> dict[str, int]:
    """A counts hash's numbers as the record shows them: size, done, completed, failed,
    cancelled (every child of the parent so far)."""
    return {name: int(raw.get(f"#{name}") or 0) for name in COUNTED}


def spent(raw: dict[str, str]) -> dict[str, Any]:
    """What the ended children spent on LLM calls, as the append script sums it into the counts
    hash at each child's first end: ``cost`` and ``usage`` (none when nothing was spent)."""
    usage = {
        name: int(raw.get(f"#{name}") or 0) for name in ("calls", "input_tokens", "output_tokens")
    }
    if not any(usage.values()) and not raw.get("#cost"):
        return {}
    return {"cost": round(float(raw.get("#cost") or 0), 9), "usage": usage}


def fanout_progress(
    raw: dict[str, str], counts: dict[str, int], running: float = 0.0
) -> tuple[float | None, str]:
    """The parent's progress and message for ``counts``: the fraction of the current fan-out's
    children that ended (plus ``running``: the sum of the running ones' fractions), inside the
    step it runs in (``#step``: "index/count"), and "k of n done". None when the fan-out runs
    in no step."""
    base = int(raw.get("#base") or 0)
    size = counts["size"] - base
    done = max(0, counts["done"] - base)
    message = summary_message({**counts, "done": done}, size)
    fraction = 1.0 if size <= 0 else min(1.0, (done + running) / size)
    step = raw.get("#step")
    if not step:
        return None, message
    index, count = (int(part) for part in step.split("/"))
    return round(((index - 1) + fraction) / count, 4), message


async def child_started(store: JobStore, child: JobRecord) -> None:
    """A ``child`` event on the parent's log as ``child`` first starts (only the first attempt:
    a retry is the child's own business)."""
    if child.parent is None or child.attempt != 1:
        return
    report = {"id": child.id, "index": child.parent_index, "task": child.task, "state": "running"}
    running = store.keys.children_running(child.parent)
    try:
        await store.append(
            child.parent,
            new_event(child.parent, "child", 0, child=report),
            {},
            owner=child.owner,
            expect=SHOWN_IN,
            then=[
                Command("SADD", [running], (child.id,)),
                Command("EXPIRE", [running], (store.settings.retention_seconds,)),
            ],
        )
    except RedisError:  # the start is the child's; the parent's view of it can do without
        logger.warning("could not show the start of job %s on its parent", child.id)


async def child_finished(store: JobStore, child: JobRecord) -> None:
    """Show the ended ``child`` (and any counted end not shown yet) on its parent's log."""
    if child.parent is not None:
        await show(store, child.parent)


async def show(store: JobStore, parent_id: str) -> None:
    """Show every counted end of ``parent_id``'s children not shown yet. Its resumed run does
    too, before it reads the results: the last end's writer may not have shown it yet, and
    after the parent has ended nothing would."""
    deadline = time.monotonic() + SHOW_SECONDS
    while not await _show_some(store, parent_id):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {parent_id} kept changing")
        await asyncio.sleep(0)


async def _show_some(store: JobStore, parent_id: str) -> bool:
    """One round of showing: True when nothing is left to show."""
    counts_key = store.keys.batch_counts(parent_id)
    async with store.transaction(counts_key) as pipe:
        await pipe.watch(counts_key)
        raw: dict[str, str] = await pipe.hgetall(counts_key)  # type: ignore[misc]
        shown = int(raw.get("#shown") or 0)
        entries: list[str] = await pipe.lrange(  # type: ignore[misc]
            store.keys.batch_ended(parent_id), shown, shown + SHOW_PAGE - 1
        )
        if not entries:
            return True
        ids = [entry.split(" ")[0] for entry in entries]
        parent, *children = await store.get_many([parent_id, *ids])
        if parent is None or parent.state not in SHOWN_IN:
            return True
        counts = {**counts_of({}), **json.loads(raw.get("#shown_counts") or "{}")}
        counts["size"] = int(raw.get("#size") or 0)
        events: list[dict[str, Any]] = []
        progress: float | None = None
        message = ""
        for entry, child in zip(entries, children, strict=True):
            child_id, outcome, prev = entry.split(" ")
            counts[outcome] += 1
            if prev:  # ended before, then retried by hand: its count moves
                counts[prev] -= 1
            else:
                counts["done"] += 1
            report: dict[str, Any] = (
                {"id": child_id, "index": None, "state": outcome}
                if child is None
                else child_report(
                    child,
                    outcome,
                    child.result,
                    None if child.error is None else child.error.model_dump(),
                )
            )
            if child is not None:
                report["index"] = child.parent_index
                report["task"] = child.task
            progress, message = fanout_progress(raw, counts)
            rolled: dict[str, Any] = {"progress": progress} if progress is not None else {}
            events.append(
                new_event(
                    parent_id,
                    "child",
                    parent.attempt,
                    child=report,
                    counts=dict(counts),
                    message=message,
                    **rolled,
                )
            )
        fields: dict[str, Any] = {"children": {**counts, **spent(raw)}}
        if progress is not None and parent.state != JobState.running:
            # A running parent writes its own progress: the roll-up only fills in while it
            # waits (or is queued to resume).
            fields["progress"] = progress
            fields["message"] = message
        pipe.multi()  # type: ignore[no-untyped-call]
        pending = await store.queue_append(
            pipe,
            parent_id,
            events,
            fields,
            owner=parent.owner,
            expect=SHOWN_IN,
            then=[
                Command(
                    "HSET",
                    [counts_key],
                    ("#shown", shown + len(entries), "#shown_counts", json.dumps(counts)),
                ),
                Command("SREM", [store.keys.children_running(parent_id)], ids),
            ],
        )
        try:
            (reply,) = await pipe.execute()
        except WatchError:
            return False
    if not appended_from(reply).ok:
        return True
    await store.after(parent_id, pending)
    return False


async def show_quietly(store: JobStore, child: JobRecord) -> None:
    """``child_finished`` for a writer whose own write is done whatever happens here (a
    cancel from the web): a failure is logged; the next end shows it."""
    try:
        await child_finished(store, child)
    except (RedisError, OSError, TimeoutError):
        logger.warning("could not show job %s on its parent %s", child.id, child.parent)


async def with_running(store: JobStore, record: JobRecord) -> JobRecord:
    """``record`` as a read shows it: a parent waiting for its children gets their running
    fractions added to its progress ("23 done plus 4 half way": 25 of 50), and ``children``
    gets ``running`` (how many run) and ``running_progress`` (the sum of their fractions)."""
    if record.children is None or record.state != JobState.waiting:
        return record
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.smembers(store.keys.children_running(record.id))
        pipe.hgetall(store.keys.batch_counts(record.id))
        running, raw = await pipe.execute()
    if not running:
        return record
    async with store.redis.pipeline(transaction=False) as pipe:
        for child_id in running:
            pipe.hget(store.keys.job(child_id), "progress")
        fractions = [float(json.loads(v)) for v in await pipe.execute() if v is not None]
    partial = round(sum(fractions), 4)
    counts: dict[str, Any] = {
        **counts_of(raw),
        **spent(raw),
        "running": len(fractions),
        "running_progress": partial,
    }
    progress, _ = fanout_progress(raw, counts, partial)
    update: dict[str, Any] = {"children": counts}
    if progress is not None:
        update["progress"] = progress
    return record.model_copy(update=update)
