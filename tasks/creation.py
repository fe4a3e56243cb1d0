"""Creating a job: the one way every path makes one (docs/ai-workloads.md, "Job creation").

A submission, a scheduled submission, a batch's children, a job's children (tasks/children.py),
a recurring tick and a cached result
all describe the job they want as a :class:`NewJob` and hand it here. :func:`plan` turns it into
one call of the store's append script: the record, the log's first events, the arq queue entry
(deferred to ``run_at`` for a scheduled job; none for a cached result, which is complete at
once); the script counts the submission itself (tasks/transitions.py). The owner's
unfinished-jobs places are checked and taken in the same script, so on every path all of it is
stored together or none of it is. A manual retry
(:func:`requeue`) moves a job back to ``queued`` the same way: state, event and queue entry in
one call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from arq.connections import ArqRedis

from stepstream.tasks import cache, idempotency, tracing
from stepstream.tasks.commands import Command
from stepstream.tasks.models import JobRecord, JobState, new_job_id, utcnow
from stepstream.tasks.queue import enqueue_commands, retry_entry
from stepstream.tasks.registry import TaskSpec
from stepstream.tasks.store import Appended, JobStore, ScriptCall, new_event


@dataclass(frozen=True)
class NewJob:
    """A job to create: a task, its input, and what the submitter chose about it."""

    task: TaskSpec
    input: dict[str, Any]
    owner: str | None = None
    run_at: datetime | None = None  # UTC; None: now (a scheduled job otherwise)
    budget: float | None = None
    callback_url: str | None = None
    subject: str | None = None
    batch_id: str | None = None  # a batch's child: its parent, and its place among the inputs
    batch_index: int | None = None
    # a job's child (tasks/children.py): its parent, its index, its depth and its fan-out's
    # concurrency limit
    parent: str | None = None
    parent_index: int | None = None
    parent_group: str | None = None
    parent_slots: int | None = None
    depth: int = 0
    note: Mapping[str, Any] = field(default_factory=dict)  # added to the `queued` event
    id: str = field(default_factory=new_job_id)
    # The submitter's trace (W3C headers of its request): the job's trace continues it.
    trace_parent: tracing.Carrier | None = None

    @property
    def run_at_text(self) -> str | None:
        return None if self.run_at is None else self.run_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Plan:
    """One job's create, as the store script takes it: the record, its first events (``queued``;
    then ``completed`` for a cached result) and the commands that run with it."""

    record: JobRecord
    events: tuple[dict[str, Any], ...]
    then: tuple[Command, ...]


@dataclass(frozen=True)
class Created:
    """A create's outcome: the record as stored (``last_event_id`` set), or, refused, as it
    would have been; ``appended.refused`` says why (``"limit"``: the owner's unfinished jobs)."""

    record: JobRecord
    appended: Appended


async def plan(
    store: JobStore, arq: ArqRedis, job: NewJob, trace: tracing.Carrier | None = None
) -> Plan:
    """The create of ``job``. A task with ``cache_ttl`` whose result for this input is cached
    (and a job that is not scheduled) is created completed with it, and never queued.
    ``trace``: the submit span's context, stored for the attempts to continue."""
    home = job.parent or job.batch_id
    if home is not None and store.keys.partition_of(job.id) != store.keys.partition_of(home):
        # A child lives in its parent's partition (a cluster's): its end is counted there.
        job = replace(job, id=store.new_job_id(parent=home))
    spec = job.task
    record = JobRecord(
        id=job.id,
        task=spec.name,
        owner=job.owner,
        subject=job.subject,
        state=JobState.scheduled if job.run_at is not None else JobState.queued,
        input=job.input,
        max_attempts=spec.max_attempts,
        created_at=utcnow(),
        budget=job.budget,
        run_at=job.run_at_text,
        callback_url=job.callback_url,
        batch_id=job.batch_id,
        batch_index=job.batch_index,
        trace=trace,
        parent=job.parent,
        parent_index=job.parent_index,
        parent_group=job.parent_group,
        parent_slots=job.parent_slots,
        depth=job.depth,
    )
    queued = new_event(job.id, "queued", 0, input=job.input, **job.note)
    hit = None
    if spec.cache_ttl and job.run_at is None:
        hit = await cache.lookup(store.redis, store.keys, spec, job.owner, job.input)
    if hit is not None:
        # A cached result: complete at once, in the same script. It never reaches a worker, so
        # it has no queue entry, and it holds no place among the owner's unfinished jobs.
        source = hit.get("job_id")
        result = hit.get("result")
        record.state = JobState.completed
        record.cached = True
        record.result = result
        record.progress = 1.0
        record.message = f"cached result of job {source}"
        record.finished_at = utcnow()
        queued["cached"] = True
        done = new_event(job.id, "completed", 0, result=result, cached=True, source=source)
        return Plan(record, (queued, done), ())
    if job.run_at is not None:
        queued["run_at"] = record.run_at
    # A scheduled job's entry is deferred: arq keeps it in its queue (a sorted set scored by
    # run time), so it survives restarts and no worker picks it up early.
    enqueue = enqueue_commands(arq, store.keys, job.id, job.run_at)
    return Plan(record, (queued,), tuple(enqueue))


async def create(
    store: JobStore,
    arq: ArqRedis,
    job: NewJob,
    *,
    take: int = 1,
    claim: idempotency.Claim | None = None,
    rate: tuple[int, int] | None = None,
) -> Created:
    """Create ``job`` in one store script call (see :func:`plan`). ``take``: places it needs
    free under its owner's unfinished-jobs limit (``JobStore.append``). ``claim``: the
    Idempotency-Key claimed for it, confirmed if and only if the job is created. ``rate``: the
    owner's submissions per second and the current unix second: the submission is counted
    there by the same script, and refused (``"rate"``) past the limit (``JobStore.create``)."""
    span = tracing.start_span(
        f"submit {job.task.name}",
        {
            "stepstream.job_id": job.id,
            "stepstream.task": job.task.name,
            "stepstream.owner": job.owner,
            "stepstream.subject": job.subject,
        },
        parent=job.trace_parent,
    )
    try:
        new = await plan(store, arq, job, span.carrier())
        then = [*new.then, *idempotency.confirmations(claim)]
        appended = await store.create(new.record, *new.events, then=then, take=take, rate=rate)
    except BaseException as exc:
        span.fail(exc)
        span.end()
        raise
    if appended.ok:
        new.record.last_event_id = appended.job_event_id
    else:
        span.set({"stepstream.refused": appended.refused})
    span.end(appended.job_event_id)
    return Created(new.record, appended)


def create_call(
    store: JobStore, new: Plan, *, requires: str | None = None, take: int = 0
) -> ScriptCall:
    """``new``'s create, prepared for ``JobStore.create_together`` (several jobs' creates in
    one ``MULTI``, such as a batch's children after their parent). ``take``: see ``create``."""
    return store.create_call(new.record, *new.events, then=new.then, requires=requires, take=take)


async def requeue(store: JobStore, arq: ArqRedis, record: JobRecord, spec: TaskSpec) -> Appended:
    """A manual retry of a failed or cancelled job: back to ``queued`` with a fresh budget of
    attempts, its old cancel request dropped and its queue entry written, in one script call
    (refused as its state if it is no longer failed or cancelled, or as ``"limit"``)."""
    return await store.append(
        record.id,
        new_event(record.id, "queued", record.attempt, input=record.input, reason="retry"),
        {
            "state": JobState.queued.value,
            "error": None,
            "result": None,
            "finished_at": None,
            "retry_at": None,
            "message": None,
            # A retry by hand gets a fresh budget of attempts on top of those already made.
            "max_attempts": record.attempt + spec.max_attempts,
        },
        owner=record.owner,
        expect=(JobState.failed, JobState.cancelled),
        take=1,  # unfinished again: it needs a place under the owner's limit
        then=[
            Command("DEL", [store.keys.job_cancel(record.id)]),
            *enqueue_commands(
                arq, store.keys, record.id, entry_id=retry_entry(record.id, record.attempt)
            ),
        ],
    )


async def count_submission(store: JobStore, owner: str | None, second: int) -> int:
    """Count a submission of ``owner`` in ``second`` (unix s): its submissions in that second
    so far, this one included, for the per-second limit (``STEPSTREAM_SUBMISSIONS_PER_SECOND``,
    answered by the HTTP layer). Their unfinished jobs are counted by the create itself."""
    key = store.keys.owner_home(owner).submissions(owner, second)  # as the creates count them
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.incr(key)
        pipe.expire(key, 2)
        submitted, _ = await pipe.execute()
    return int(submitted)
