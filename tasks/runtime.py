"""Running one job: the arq function, error classification, retries, cancellation.

arq delivers a job id; everything else (task, input, attempts) lives in the job record, so a
job is self-contained and any worker can pick it up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import traceback
from datetime import UTC, datetime, timedelta
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import Retry
from pydantic import BaseModel, ValidationError

from stepstream.tasks import (
    batches,
    cache,
    cancellation,
    children,
    heartbeat,
    inputs,
    logs,
    lua,
    rollup,
    tracing,
)
from stepstream.tasks.children import ChildrenSuspended
from stepstream.tasks.context import TaskContext
from stepstream.tasks.errors import (
    InputTimeout,
    JobCancelled,
    PermanentError,
    RetryAfter,
    StepTimeout,
    TaskTimeout,
)
from stepstream.tasks.inputs import InputSuspended
from stepstream.tasks.llm import Providers
from stepstream.tasks.models import ChildrenWait, InputRequest, JobRecord, JobState, utcnow
from stepstream.tasks.registry import TaskRegistry, TaskSpec
from stepstream.tasks.store import Appended, JobStore, new_event

logger = logging.getLogger("stepstream.worker")


ACTIVE_STATES = (JobState.scheduled, JobState.queued, JobState.retrying, JobState.running)


# A slot of a task's global concurrency limit: a sorted set of job ids scored by lease expiry.
# KEYS: the task's slots; ARGV: job id, now (ms), lease expiry (ms), limit.
_ACQUIRE_SLOT_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""
SLOT_WAIT_SECONDS = 0.5
STOP_WARNING_SECONDS = 10.0


class JobMonitor:
    """One loop per worker over the jobs it is running.

    It interrupts jobs whose cancel flag was raised (the task context also checks the flag at
    every event; this catches a task busy in a long await, within ``interval`` seconds), and it
    renews each running job's lease: arq's in-progress key, which it shortens from arq's "job
    timeout + 10 s" to ``lease_seconds``, so a killed worker's jobs are taken over quickly.
    """

    def __init__(self, store: JobStore, lease_seconds: float, interval: float = 0.25) -> None:
        self.store = store
        self.lease_ms = int(lease_seconds * 1000)
        self.interval = interval
        self.running: dict[str, asyncio.Task[Any]] = {}
        # job id → when the monitor interrupted its task (monotonic seconds)
        self.cancelled: dict[str, float] = {}
        self._reported: set[str] = set()  # jobs already reported as not stopping
        self.slots: dict[str, list[str]] = {}  # job id → the slots keys it holds a slot in
        # job id → the arq job running it, when not the job's own id (tasks/inputs.py)
        self.arq_ids: dict[str, str] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._acquire = lua.Script(store.redis, _ACQUIRE_SLOT_LUA)

    async def acquire_slot(self, job_id: str, key: str, limit: int) -> bool:
        """Take one of ``limit`` slots in ``key``, shared by every worker: the running jobs of
        a task (``Keys.task_slots``) or of one ``ctx.map`` (``Keys.fanout_slots``)."""
        now = int(time.time() * 1000)
        if await self._acquire(keys=[key], args=[job_id, now, now + self.lease_ms, limit]):
            self.slots.setdefault(job_id, []).append(key)
            return True
        return False

    async def release_slot(self, job_id: str) -> None:
        for key in self.slots.pop(job_id, []):
            await self.store.redis.zrem(key, job_id)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

    def task_ended(self, job_id: str) -> None:
        """The job's task has returned or raised: the runtime now records the outcome, which a
        cancel raised meanwhile must not interrupt (it has nothing left to stop)."""
        self.running.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        """The job's run here is over, its outcome recorded (or left to the next try)."""
        self.running.pop(job_id, None)
        self.cancelled.pop(job_id, None)
        self._reported.discard(job_id)

    async def take_lease(self, job_id: str) -> None:
        await self.store.queue.pexpire(self._lease_key(job_id), self.lease_ms)  # arq's key

    def _lease_key(self, job_id: str) -> str:
        return in_progress_key_prefix + self.arq_ids.get(job_id, job_id)

    async def _loop(self) -> None:
        renew_every = max(1, int(self.lease_ms / 1000 / 3 / self.interval))
        tick = 0
        while True:
            await asyncio.sleep(self.interval)
            tick += 1
            if not self.running:
                continue
            job_ids = list(self.running)
            try:
                store = self.store
                renew = tick % renew_every == 0
                # arq's in-progress keys are the queue plane's: in the same round trip on one
                # server, in one of their own beside a cluster.
                apart = renew and store.queue is not store.redis
                async with store.redis.pipeline(transaction=False) as pipe:
                    # One EXISTS each: on a cluster the flags are in many slots.
                    for job_id in job_ids:
                        pipe.exists(store.keys.job_cancel(job_id))
                    if renew:
                        expiry = int(time.time() * 1000) + self.lease_ms
                        for job_id in job_ids:
                            if not apart:
                                pipe.pexpire(self._lease_key(job_id), self.lease_ms)
                            for key in self.slots.get(job_id, []):
                                pipe.zadd(key, {job_id: expiry}, xx=True)
                    flags = (await pipe.execute())[: len(job_ids)]
                if apart:
                    async with store.queue.pipeline(transaction=False) as pipe:
                        for job_id in job_ids:
                            pipe.pexpire(self._lease_key(job_id), self.lease_ms)
                        await pipe.execute()
            except Exception:  # a Redis blip: the next round tries again
                logger.warning("job monitor could not reach Redis", exc_info=True)
                continue
            for job_id, flag in zip(job_ids, flags, strict=True):
                task = self.running.get(job_id)
                if flag and task is not None and job_id not in self.cancelled:
                    self.cancelled[job_id] = time.monotonic()
                    task.cancel()
            self._report_unstopped()

    def _report_unstopped(self) -> None:
        """Log, once, a job interrupted ``STOP_WARNING_SECONDS`` ago whose task has not ended,
        with where it waits. A task ends at its interruption unless it swallows it or waits in
        something that cannot be interrupted; meanwhile its lease keeps the job from others."""
        now = time.monotonic()
        for job_id, since in list(self.cancelled.items()):
            task = self.running.get(job_id)
            if task is None or job_id in self._reported or now - since < STOP_WARNING_SECONDS:
                continue
            self._reported.add(job_id)
            logger.warning(
                "job %s was interrupted by its cancel %.0fs ago and has not stopped; it waits in:"
                "\n%s",
                job_id,
                now - since,
                awaiting(task),
            )


def awaiting(task: asyncio.Task[Any]) -> str:
    """Where a suspended task waits: its chain of awaits, outermost first (``Task.get_stack``
    gives a suspended task's outermost frame only)."""
    lines = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            lines.append(f"  {awaited!r}"[:200])
            break
        code = frame.f_code
        lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return "\n".join(lines)


# arq drops an entry whose function raised anything but ``Retry``. Stepstream's job record
# would still say ``queued`` or ``running``, with no entry left to run it: a job waiting for
# ever. So the runtime's own failure to record an outcome (Redis away for longer than the
# clients' patience, a refused script) becomes a later try, as a killed worker's job would.
RECORD_RETRY_MAX_SECONDS = 30.0


async def run_job(ctx: dict[str, Any], job_id: str) -> None:
    """arq's function for a job: run its next attempt and record how it ended.

    Never lets arq drop the job while its record is unfinished: an error in recording is
    logged and the job is offered again, with a growing delay up to 30 s. The next try reads
    the record and goes on from there (from the checkpoints, or only to show an end that was
    written)."""
    try:
        await _run_job(ctx, job_id)
    except Retry:
        raise
    except Exception as exc:
        raise _offered_again(ctx, job_id, "record how its run went", exc) from exc


def _offered_again(ctx: dict[str, Any], job_id: str, what: str, exc: Exception) -> Retry:
    """The ``Retry`` that keeps an arq entry whose run failed in the worker's own writes, with
    a delay that grows with arq's count of tries (2 s, 4 s … 30 s); logged as an error."""
    delay = min(RECORD_RETRY_MAX_SECONDS, 2.0 ** int(ctx.get("job_try") or 1))
    logger.error(
        "job %s: the worker could not %s (%r); it is offered again in %.0fs",
        job_id,
        what,
        exc,
        delay,
        exc_info=True,
    )
    return Retry(defer=timedelta(seconds=delay))


async def _run_job(ctx: dict[str, Any], job_id: str) -> None:
    store: JobStore = ctx["store"]
    monitor: JobMonitor = ctx["job_monitor"]
    record = await store.get(job_id)
    if record is None:
        return  # expired: nothing to run
    if record.state.terminal:
        # Cancelled while queued, or ended by a worker killed before it showed the end in the
        # job's batch (arq offers the job again): show it now. Its end was counted as written.
        await _show_end(store, record)
        return
    resumable = _waits_for_children(record)
    if resumable and not await children.ready(store, job_id):
        return  # an earlier wait's entry: the entry of the wait it is in comes when it is ready
    registry: TaskRegistry = ctx["registry"]
    spec = registry.get_task(record.task)
    if spec is None:
        await _fail(store, record, None, "UnknownTask", f"no task named {record.task!r}")
        return

    slots = []
    if spec.concurrency is not None:
        slots.append((store.keys.task_slots(spec.name), spec.concurrency))
    if record.parent is not None and record.parent_group and record.parent_slots:
        # ctx.map(concurrency=n): a slot among its siblings too.
        slots.append(
            (store.keys.fanout_slots(record.parent, record.parent_group), record.parent_slots)
        )
    for key, limit in slots:
        if not await monitor.acquire_slot(job_id, key, limit):
            # Every slot is taken: the job stays queued and arq offers it again shortly.
            await monitor.release_slot(job_id)
            raise Retry(defer=timedelta(seconds=SLOT_WAIT_SECONDS * (0.5 + random.random())))
    arq_id = ctx.get("job_id", job_id)
    if arq_id != job_id:  # an answer's entry (tasks/inputs.py): its lease is its own
        monitor.arq_ids[job_id] = arq_id
    beat = ctx.get("heartbeat")
    try:
        await _run_attempt(
            store,
            monitor,
            spec,
            record,
            ctx["llm_providers"],
            arq=ctx.get("redis"),
            worker_id=beat.worker_id if beat is not None else None,
            registry=registry,
        )
    finally:
        monitor.arq_ids.pop(job_id, None)
        await monitor.release_slot(job_id)


async def _run_attempt(
    store: JobStore,
    monitor: JobMonitor,
    spec: TaskSpec,
    record: JobRecord,
    llm_providers: Providers,
    *,
    arq: ArqRedis | None = None,
    worker_id: str | None = None,
    registry: TaskRegistry | None = None,
) -> None:
    job_id = record.id
    attempt = record.attempt + 1
    # A child of the submit span stored with the job, whichever worker runs it and however
    # long after: the time queued or waiting is the gap before it.
    span = tracing.start_span(
        f"attempt {spec.name}",
        {
            "stepstream.job_id": job_id,
            "stepstream.task": spec.name,
            "stepstream.attempt": attempt,
            "stepstream.worker": worker_id,
        },
        parent=record.trace,
    )
    try:
        with span.current():
            await _attempt(
                store, monitor, spec, record, llm_providers, span, arq=arq, registry=registry
            )
    except BaseException as exc:
        if not span.ended and isinstance(exc, Exception) and not isinstance(exc, Retry):
            span.fail(exc)  # the runtime's own failure to record the outcome
        raise
    finally:
        span.end()  # a no-op once the outcome's event ended it


def _ended(
    span: tracing.Span,
    outcome: str,
    appended: Appended | None,
    context: TaskContext | None = None,
) -> None:
    """End the attempt's span (and its interrupted step's) with the event that ended the run."""
    event_id = appended.job_event_id if appended is not None else None
    span.set({"stepstream.outcome": outcome if appended is None or appended.ok else "refused"})
    if context is not None:
        context.end_step_span(event_id)
    span.end(event_id)


async def _attempt(
    store: JobStore,
    monitor: JobMonitor,
    spec: TaskSpec,
    record: JobRecord,
    llm_providers: Providers,
    span: tracing.Span,
    *,
    arq: ArqRedis | None = None,
    registry: TaskRegistry | None = None,
) -> None:
    job_id = record.id
    attempt = record.attempt + 1
    started_at = record.started_at or utcnow()
    started = await store.append(
        job_id,
        new_event(job_id, "started", attempt, max_attempts=record.max_attempts),
        {
            "state": JobState.running.value,
            "attempt": attempt,
            "started_at": started_at,
            "error": None,
            "retry_at": None,
            "waiting_for": None,  # a parent resumed by its children's last end
        },
        owner=record.owner,
        mode="update+cancel",
        # A parent whose children have all ended is started from its wait by their last end;
        # only from it: of two entries that found it ready, one starts it.
        expect=(JobState.waiting,) if _waits_for_children(record) else ACTIVE_STATES,
    )
    if started.refused == "cancel":
        cancelled = await _cancelled(store, record, attempt - 1, "cancelled before it started")
        _ended(span, "cancelled", cancelled)
        return
    if not started.ok:
        _ended(span, "refused", None)
        return
    record.attempt = attempt
    record.started_at = started_at  # job durations in metrics run from the first start
    context = TaskContext(store, spec, record, llm_providers, registry=registry, arq=arq)
    context.span = span
    await rollup.child_started(store, record)
    # Every log line of this job (this asyncio task) now says which job, attempt and step.
    logs.bind_job(job_id, spec.name, attempt, context)
    logger.info("job started: attempt %d of %d", attempt, record.max_attempts)

    current = asyncio.current_task()
    assert current is not None
    monitor.running[job_id] = current
    try:
        try:
            await monitor.take_lease(job_id)
            result = await _execute(spec, context, record.input)
            # The task's last progress and log events are in the log before ``completed``.
            await context.writer.flush()
        finally:
            # The task has ended: recording its outcome must not be interrupted by the
            # monitor, and comes after the events the task still has on their way.
            monitor.task_ended(job_id)
            await context.writer.settle()
    except JobCancelled as exc:
        cancelled = await _cancelled(store, record, attempt, exc.reason, context)
        _ended(span, "cancelled", cancelled, context)
    except InputSuspended as suspended:
        request = suspended.request
        span.event(
            "waiting",
            {
                "stepstream.input.name": request.name,
                "stepstream.input.timeout_at": request.timeout_at,
            },
        )
        _ended(span, "waiting", await _suspended(store, arq, record, context, suspended), context)
    except ChildrenSuspended as waiting_for_children:
        counts = waiting_for_children.counts
        span.event("waiting", {"stepstream.children.size": counts["size"]})
        waited = await _wait_for_children(store, arq, record, context, waiting_for_children)
        _ended(span, "waiting", waited, context)
    except asyncio.CancelledError:
        if job_id in monitor.cancelled:
            # Our monitor interrupted the task: the job is cancelled, the worker goes on.
            current.uncancel()
            cancelled = await _cancelled(store, record, attempt, "cancelled by request", context)
            _ended(span, "cancelled", cancelled, context)
        else:
            # The worker is shutting down: arq puts the job back in the queue; say so in the log.
            _ended(span, "handed_back", await _handed_back(store, record, context), context)
            raise
    except Exception as exc:
        span.fail(exc)
        await _handle_failure(store, spec, record, context, exc)
    else:
        done = await store.append(
            job_id,
            new_event(job_id, "completed", attempt, result=result),
            {
                "state": JobState.completed.value,
                "result": result,
                "progress": 1.0,
                "message": None,
                "finished_at": utcnow(),
            },
            owner=record.owner,
            expect=(JobState.running,),
            batch=record.counted_into,
            then=cache.result_commands(
                store.keys, spec, record.owner, record.input, job_id, result
            ),
        )
        _ended(span, "completed", done, context)
        if done.ok:
            await heartbeat.job_finished(store, record, "completed")
            await _show_end(store, record)
    finally:
        monitor.forget(job_id)


async def _execute(spec: TaskSpec, context: TaskContext, raw_input: dict[str, Any]) -> Any:
    try:
        data = spec.input_model.model_validate(raw_input)
    except ValidationError as exc:
        raise PermanentError(f"input is not valid for {spec.name}: {exc}") from exc
    try:
        async with asyncio.timeout(spec.timeout) as deadline:
            value = await spec.fn(context, data)
    except TimeoutError as exc:
        if not deadline.expired():
            raise  # a timeout of the task's own (a step's, a client's): classified as it is
        raise TaskTimeout(f"task timed out after {spec.timeout:g}s", spec.retry_timeouts) from exc
    try:
        output = (
            value
            if isinstance(value, spec.output_model)
            else spec.output_model.model_validate(value)
        )
    except ValidationError as exc:
        raise PermanentError(f"output is not valid for {spec.name}: {exc}") from exc
    assert isinstance(output, BaseModel)
    return output.model_dump(mode="json")


def classify(exc: BaseException) -> bool:
    """True when another attempt may succeed."""
    if isinstance(exc, PermanentError | ValidationError):
        return False
    if isinstance(exc, TaskTimeout | StepTimeout):
        return exc.retryable
    # TransientError, RetryAfter, timeouts and connection errors, and anything unexpected:
    # an unknown failure is worth another attempt within the task's max_attempts.
    return True


async def _handle_failure(
    store: JobStore,
    spec: TaskSpec,
    record: JobRecord,
    context: TaskContext,
    exc: Exception,
) -> None:
    retryable = classify(exc)
    step = context.current_step.name if context.current_step else None
    error = {
        "type": type(exc).__name__,
        "message": str(exc) or type(exc).__name__,
        "step": step,
        "retryable": retryable,
        "traceback": "".join(traceback.format_exception(exc, limit=-8))[-4000:],
    }
    attempt = record.attempt
    step_fields = context.mark_interrupted_step("failed")
    context.span.set({"stepstream.error.retryable": retryable})
    if retryable and attempt < record.max_attempts:
        if isinstance(exc, RetryAfter):
            delay = max(0.0, exc.seconds)
        else:
            delay = spec.backoff.delay(attempt)
        retry_at = (datetime.now(UTC) + timedelta(seconds=delay)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        public_error = {k: v for k, v in error.items() if k != "traceback"}
        appended = await store.append(
            record.id,
            new_event(
                record.id,
                "retrying",
                attempt,
                error=public_error,
                max_attempts=record.max_attempts,
                retry_at=retry_at,
            ),
            {
                "state": JobState.retrying.value,
                "error": error,
                "retry_at": retry_at,
                "message": f"Attempt {attempt} of {record.max_attempts} failed; retrying",
                **step_fields,
            },
            owner=record.owner,
            expect=(JobState.running,),
            # Kept until the retry has run, however far off it is: the retention runs from then.
            ttl=store.settings.retention_seconds + math.ceil(delay),
        )
        context.span.event(
            "retrying", {"stepstream.retry_at": retry_at, "stepstream.delay_seconds": delay}
        )
        _ended(context.span, "retrying", appended, context)
        if appended.ok:
            logger.info("job %s attempt %d failed, retrying in %.2fs", record.id, attempt, delay)
            raise Retry(defer=timedelta(seconds=delay))
        return
    failed = await _fail(
        store, record, attempt, type(exc).__name__, str(error["message"]), error, step_fields
    )
    _ended(context.span, "failed", failed, context)


async def _fail(
    store: JobStore,
    record: JobRecord,
    attempt: int | None,
    type_: str,
    message: str,
    error: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    *,
    expect: tuple[JobState, ...] = ACTIVE_STATES,
) -> Appended:
    error = error or {"type": type_, "message": message, "step": None, "retryable": False}
    public_error = {k: v for k, v in error.items() if k != "traceback"}
    attempt = record.attempt if attempt is None else attempt
    failed = await store.append(
        record.id,
        new_event(record.id, "failed", attempt, error=public_error),
        {
            "state": JobState.failed.value,
            "error": error,
            "finished_at": utcnow(),
            "retry_at": None,
            **(extra or {}),
        },
        owner=record.owner,
        batch=record.counted_into,
        expect=expect,
    )
    if failed.ok:
        await heartbeat.job_finished(store, record, "failed", public_error)
        await _show_end(store, record)
        # No child outlives its parent's end: those still unfinished are cancelled.
        await cancellation.cancel_children(store, record, "its parent failed")
    return failed


async def _suspended(
    store: JobStore,
    arq: ArqRedis | None,
    record: JobRecord,
    context: TaskContext,
    suspended: InputSuspended,
) -> Appended:
    """The task waits for input: record ``waiting`` and end the run, freeing the worker."""
    if arq is None:  # run outside arq's worker: nothing could queue the job again
        raise RuntimeError("wait_for_input needs the arq worker")
    waiting = await inputs.suspend(
        store, arq, record, suspended.request, context.mark_interrupted_step("waiting")
    )
    if waiting.refused == "cancel":
        return await _cancelled(store, record, record.attempt, "cancelled by request", context)
    if waiting.ok:
        logger.info("job waits for input %r", suspended.request.name)
    return waiting


def _waits_for_children(record: JobRecord) -> bool:
    return record.state == JobState.waiting and isinstance(record.waiting_for, ChildrenWait)


async def _show_end(store: JobStore, record: JobRecord) -> None:
    """Show a job's end to its batch or its parent (tasks/batches.py, tasks/rollup.py)."""
    await batches.child_finished(store, record)
    await rollup.child_finished(store, record)


async def _wait_for_children(
    store: JobStore,
    arq: ArqRedis | None,
    record: JobRecord,
    context: TaskContext,
    suspended: ChildrenSuspended,
) -> Appended:
    """The task waits for its children (tasks/children.py): record ``waiting``, with the queue
    entry their last end writes, and end the run, freeing the worker."""
    if arq is None:
        raise RuntimeError("child jobs need the arq worker")
    counts = suspended.counts
    running = counts["size"] - counts["done"]
    waiting = await store.append(
        record.id,
        new_event(record.id, "waiting", record.attempt, children=counts),
        {
            "state": JobState.waiting.value,
            "waiting_for": {"children": counts},
            "children": counts,
            # A wait is not a failure: the run that follows it is the same attempt.
            "attempt": record.attempt - 1,
            "message": f"Waiting for {running} child job{'s' if running != 1 else ''}",
            **context.mark_interrupted_step("waiting"),
        },
        owner=record.owner,
        mode="update+cancel",
        expect=(JobState.running,),
        then=children.resume_commands(store, arq, record.id, counts["size"], suspended.tolerated),
    )
    if waiting.refused == "cancel":
        return await _cancelled(store, record, record.attempt, "cancelled by request", context)
    if waiting.ok:
        logger.info("job waits for %d child job(s)", running)
        # The last child may have ended before the wait was written: then nothing wrote the
        # entry, and this does. (A worker killed before it is covered by arq, which offers
        # this run's own entry again: the run finds its parent ready and goes on.)
        await children.resume_if_ready(store, record.id)
    return waiting


async def _handed_back(store: JobStore, record: JobRecord, context: TaskContext) -> Appended | None:
    error = {
        "type": "WorkerShutdown",
        "message": "the worker stopped; another worker resumes the job from its checkpoints",
        "step": context.current_step.name if context.current_step else None,
        "retryable": True,
    }
    try:
        return await store.append(
            record.id,
            new_event(
                record.id,
                "retrying",
                record.attempt,
                error=error,
                max_attempts=record.max_attempts + 1,
                retry_at=utcnow(),
            ),
            {
                "state": JobState.retrying.value,
                "error": error,
                "retry_at": utcnow(),
                "message": "The worker stopped; another worker resumes this job",
                # A deploy is not the job's failure: it costs no attempt.
                "max_attempts": record.max_attempts + 1,
                **context.mark_interrupted_step("failed"),
            },
            owner=record.owner,
            expect=(JobState.running,),
        )
    except Exception:
        logger.warning("could not record the hand-back of job %s", record.id, exc_info=True)
        return None


async def _cancelled(
    store: JobStore,
    record: JobRecord,
    attempt: int,
    reason: str,
    context: TaskContext | None = None,
) -> Appended:
    extra = context.mark_interrupted_step("cancelled") if context else {}
    cancelled = await store.append(
        record.id,
        new_event(record.id, "cancelled", attempt, reason=reason),
        {"state": JobState.cancelled.value, "finished_at": utcnow(), **extra},
        owner=record.owner,
        batch=record.counted_into,
        expect=ACTIVE_STATES,
    )
    if cancelled.ok:
        await heartbeat.job_finished(store, record, "cancelled")
        await _show_end(store, record)
        await cancellation.cancel_children(store, record, "its parent was cancelled")
    return cancelled


async def input_timeout(ctx: dict[str, Any], job_id: str, name: str) -> None:
    """The arq function due at a wait's ``timeout_at`` (tasks/inputs.py): a job still waiting
    for ``name`` gets the task's default as its answer, or fails with ``InputTimeout``. Every
    write expects ``waiting``: an answer or a cancel that came first wins."""
    try:
        await _end_wait(ctx, job_id, name)
    except Exception as exc:
        # arq would drop the entry after an error, and the job would wait for ever: try again.
        raise _offered_again(ctx, job_id, f"end its wait for {name!r}", exc) from exc


async def _end_wait(ctx: dict[str, Any], job_id: str, name: str) -> None:
    store: JobStore = ctx["store"]
    record = await store.get(job_id)
    request = record.waiting_for if record is not None else None
    if record is None or record.state != JobState.waiting or not isinstance(request, InputRequest):
        return
    if request.name != name:
        return
    if request.default is not None:
        event, fields, then = inputs.answered(
            record, name, request.default, "default", arq=ctx["redis"], keys=store.keys
        )
        await store.append(
            job_id, event, fields, owner=record.owner, expect=(JobState.waiting,), then=then
        )
        return
    message = f"nobody gave the input {name!r} by {request.timeout_at}"
    error = {"type": InputTimeout.__name__, "message": message, "step": None, "retryable": False}
    await _fail(
        store,
        record,
        record.attempt + 1,
        InputTimeout.__name__,
        message,
        error,
        {"waiting_for": None},
        expect=(JobState.waiting,),
    )
