"""Running one job: the arq function, error classification, retries, cancellation.

arq delivers a job id; everything else (task, input, attempts) lives in the job record, so a
job is self-contained and any worker can pick it up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import traceback
from datetime import UTC, datetime, timedelta
from typing import Any

from arq.worker import Retry
from pydantic import BaseModel, ValidationError

from tasks.context import TaskContext
from tasks.errors import JobCancelled, PermanentError, RetryAfter, TransientError
from tasks.models import JobRecord, JobState, utcnow
from tasks.registry import TaskSpec, get_task
from tasks.store import JobStore, new_event

logger = logging.getLogger("stepstream.worker")

RUN_JOB = "stepstream.run_job"

ACTIVE_STATES = (JobState.queued, JobState.retrying, JobState.running)


class CancelWatcher:
    """One loop per worker that interrupts running jobs whose cancel flag was raised.

    The task context also checks the flag at every event; this catches a task that is busy in a
    long await and emits nothing, so cancellation lands within ``interval`` seconds.
    """

    def __init__(self, store: JobStore, interval: float = 0.25) -> None:
        self.store = store
        self.interval = interval
        self.running: dict[str, asyncio.Task[Any]] = {}
        self.cancelled: set[str] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.running:
                continue
            job_ids = list(self.running)
            try:
                flags = await self.store.redis.mget(
                    [self.store.keys.job_cancel(job_id) for job_id in job_ids]
                )
            except Exception:  # a Redis blip: the next round tries again
                logger.warning("cancel watcher could not read flags", exc_info=True)
                continue
            for job_id, flag in zip(job_ids, flags, strict=True):
                task = self.running.get(job_id)
                if flag and task is not None and job_id not in self.cancelled:
                    self.cancelled.add(job_id)
                    task.cancel()


async def run_job(ctx: dict[str, Any], job_id: str) -> None:
    store: JobStore = ctx["store"]
    watcher: CancelWatcher = ctx["cancel_watcher"]
    record = await store.get(job_id)
    if record is None or record.state.terminal:
        return  # expired, or cancelled while queued: nothing to run
    spec = get_task(record.task)
    if spec is None:
        await _fail(store, record, None, "UnknownTask", f"no task named {record.task!r}")
        return

    attempt = record.attempt + 1
    started = await store.append(
        job_id,
        new_event(
            job_id, "started", attempt, max_attempts=record.max_attempts
        ),
        {
            "state": JobState.running.value,
            "attempt": attempt,
            "started_at": record.started_at or utcnow(),
            "error": None,
            "retry_at": None,
        },
        owner=record.owner,
        mode="update+cancel",
        expect=ACTIVE_STATES,
    )
    if started.refused == "cancel":
        await _cancelled(store, record, attempt - 1, "cancelled before it started")
        return
    if not started.ok:
        return
    record.attempt = attempt
    context = TaskContext(store, spec, record)

    current = asyncio.current_task()
    assert current is not None
    watcher.running[job_id] = current
    try:
        result = await _execute(spec, context, record.input)
    except JobCancelled as exc:
        await _cancelled(store, record, attempt, exc.reason, context)
    except asyncio.CancelledError:
        if job_id in watcher.cancelled:
            # Our watcher interrupted the task: the job is cancelled, the worker goes on.
            current.uncancel()
            await _cancelled(store, record, attempt, "cancelled by request", context)
        else:
            raise  # the worker is shutting down or arq timed the job out
    except Exception as exc:
        await _handle_failure(store, spec, record, context, exc)
    else:
        await store.append(
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
        )
    finally:
        watcher.running.pop(job_id, None)
        watcher.cancelled.discard(job_id)


async def _execute(spec: TaskSpec, context: TaskContext, raw_input: dict[str, Any]) -> Any:
    try:
        data = spec.input_model.model_validate(raw_input)
    except ValidationError as exc:
        raise PermanentError(f"input is not valid for {spec.name}: {exc}") from exc
    try:
        value = await asyncio.wait_for(spec.fn(context, data), timeout=spec.timeout)
    except TimeoutError as exc:
        raise TransientError(f"task timed out after {spec.timeout:g}s") from exc
    try:
        output = (
            value if isinstance(value, spec.output_model) else spec.output_model.model_validate(value)
        )
    except ValidationError as exc:
        raise PermanentError(f"output is not valid for {spec.name}: {exc}") from exc
    assert isinstance(output, BaseModel)
    return output.model_dump(mode="json")


def classify(exc: BaseException) -> bool:
    """True when another attempt may succeed."""
    if isinstance(exc, PermanentError | ValidationError):
        return False
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
    if retryable and attempt < record.max_attempts:
        if isinstance(exc, RetryAfter):
            delay = max(0.0, exc.seconds)
        else:
            jitter = 1 - random.random() * spec.backoff.jitter
            delay = spec.backoff.base_delay(attempt) * jitter
        retry_at = (datetime.now(UTC) + timedelta(seconds=delay)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ"
        )
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
        )
        if appended.ok:
            logger.info("job %s attempt %d failed, retrying in %.2fs", record.id, attempt, delay)
            raise Retry(defer=timedelta(seconds=delay))
        return
    await _fail(store, record, attempt, error["type"], error["message"], error, step_fields)


async def _fail(
    store: JobStore,
    record: JobRecord,
    attempt: int | None,
    type_: str,
    message: str,
    error: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    error = error or {"type": type_, "message": message, "step": None, "retryable": False}
    public_error = {k: v for k, v in error.items() if k != "traceback"}
    attempt = record.attempt if attempt is None else attempt
    await store.append(
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
        expect=ACTIVE_STATES,
    )


async def _cancelled(
    store: JobStore,
    record: JobRecord,
    attempt: int,
    reason: str,
    context: TaskContext | None = None,
) -> None:
    extra = context.mark_interrupted_step("cancelled") if context else {}
    await store.append(
        record.id,
        new_event(record.id, "cancelled", attempt, reason=reason),
        {"state": JobState.cancelled.value, "finished_at": utcnow(), **extra},
        owner=record.owner,
        expect=ACTIVE_STATES,
    )
