"""Cancelling jobs from outside a worker: one that has not started, and a batch's children,
or a job's (tasks/children.py), down the tree.

A running job's events are its worker's alone to write, so it is only asked to stop (its cancel
flag, which the worker watches). A job no worker has started is cancelled here, by a
compare-and-set against a worker starting it: whichever writes first wins.
"""

from __future__ import annotations

import logging

from stepstream.tasks import batches, rollup
from stepstream.tasks.models import JobRecord, JobState, utcnow
from stepstream.tasks.store import Appended, JobStore, new_event

# The states of a job no worker holds: cancelled at once, without asking a worker. A job
# waiting for input holds none either (tasks/inputs.py); this compare-and-set also races the
# answer that would queue it again.
UNSTARTED = (JobState.queued, JobState.retrying, JobState.scheduled, JobState.waiting)

logger = logging.getLogger("stepstream.batches")


async def _show_end(store: JobStore, child: JobRecord) -> None:
    """Show a cancelled child's end in its batch. The cancel has been written whatever happens
    here, so a failure is logged, not raised. The end is shown later by the next child's end, a
    cancel of the batch, or a worker taking the child's arq entry if it still has one."""
    await rollup.show_quietly(store, child)
    try:
        await batches.child_finished(store, child)
    except Exception:
        logger.warning(
            "could not report job %s to its batch %s", child.id, child.batch_id, exc_info=True
        )


async def cancel_unstarted(store: JobStore, record: JobRecord, reason: str) -> Appended:
    """Cancel ``record`` if no worker holds it (refused as its state otherwise: ``'"running"'``
    when a worker does), report the end to its batch or parent, and cancel its own children
    (a parent waiting for them holds no worker either)."""
    appended = await store.append(
        record.id,
        new_event(record.id, "cancelled", record.attempt, reason=reason),
        {
            "state": JobState.cancelled.value,
            "finished_at": utcnow(),
            "retry_at": None,
            "waiting_for": None,
        },
        owner=record.owner,
        expect=UNSTARTED,
        batch=record.counted_into,
    )
    if appended.ok:
        await _show_end(store, record)
        await cancel_children(store, record, "its parent was cancelled")
    return appended


async def cancel_children(
    store: JobStore, parent: JobRecord, reason: str = "the batch was cancelled"
) -> None:
    """Cancel every child of ``parent`` (a batch, or a job that started children) that has not
    ended (running ones are asked to stop, and cancel their own children as they stop); a
    batch ends when its last child does."""
    for child in await store.get_many(await store.child_ids(parent.id)):
        if child is None:
            continue
        if child.state.terminal:
            # Counted as it ended, and shown, normally (a no-op then); this shows an end whose
            # writer was killed before showing it, so the parent can end.
            await _show_end(store, child)
            continue
        if (await cancel_unstarted(store, child, reason)).ok:
            continue
        await store.request_cancel(child.id)  # running: the worker stops it
