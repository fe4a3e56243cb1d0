"""Human input: a job that waits for a person's answer without holding a worker.

``await ctx.wait_for_input(name, schema=Model)`` with no answer stored ends the run: the
runtime records ``waiting`` (running → waiting) and the arq job returns, so the worker's slot
and any concurrency slot are free for other jobs however long the wait. An answer
(``POST /api/jobs/{id}/input``) stores the value, appends ``input`` and moves the job back to
``queued`` with its arq queue entry, all in one store script. The job then runs again from the
top on any worker: steps done with ``run_step`` are restored from their checkpoints, and
``wait_for_input`` finds the stored answer and returns it at once. Code outside ``run_step``
before the wait runs again.

A timeout is a deferred arq entry (``input_timeout`` in tasks/runtime.py) written with the
``waiting`` event: at ``timeout_at`` a job still waiting fails with ``InputTimeout``, or gets
the task's default as its answer. Everything is in Redis: a wait survives restarts of workers,
web processes and Valkey (with its append-only file).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from arq.connections import ArqRedis
from pydantic import BaseModel, ValidationError
from redis.exceptions import WatchError

from stepstream.tasks import tracing
from stepstream.tasks.commands import Command
from stepstream.tasks.errors import PermanentError
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import InputRequest, JobRecord, JobState, utcnow
from stepstream.tasks.queue import (
    dequeue_commands,
    enqueue_commands,
    resume_entry,
    timeout_entry,
)
from stepstream.tasks.registry import submitted_input_model
from stepstream.tasks.store import Appended, JobStore, appended_from, decode_record, new_event

if TYPE_CHECKING:
    from stepstream.tasks.context import TaskContext

M = TypeVar("M", bound=BaseModel)

INPUT_TIMEOUT = "stepstream.input_timeout"  # the arq function that ends an unanswered wait
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class InputSuspended(BaseException):
    """Raised by ``wait_for_input`` when no answer is stored: the runtime ends the run and
    records ``waiting``. A ``BaseException``, like ``CancelledError``, so that a task's
    ``except Exception`` cannot swallow it."""

    def __init__(self, request: InputRequest) -> None:
        super().__init__(f"waiting for input {request.name!r}")
        self.request = request


async def wait_for_input(
    ctx: TaskContext,
    name: str,
    schema: type[M],
    *,
    prompt: str | None = None,
    timeout: float | None = None,
    default: M | dict[str, Any] | None = None,
) -> M:
    if not NAME.fullmatch(name):
        raise ValueError(f"input name {name!r}: use 1 to 64 of A-Z a-z 0-9 _ . -")
    answer = ctx.answers.get(name)
    if answer is not None:
        # The run after the wait: the trace shows where the answer came in, and from whom.
        tracing.add_event(
            "input",
            {
                "stepstream.input.name": name,
                "stepstream.input.by": answer.by,
                "stepstream.input.at": answer.at,
            },
        )
        try:
            return schema.model_validate(answer.value)
        except ValidationError as exc:  # a rule the JSON Schema does not carry (a validator)
            raise PermanentError(f"input {name!r} does not fit {schema.__name__}: {exc}") from exc
    stored_default = None
    if default is not None:
        # Checked now, not at the timeout: a default that does not fit is the task's bug.
        stored_default = schema.model_validate(default).model_dump(mode="json")
    timeout_at = None
    if timeout is not None:
        if timeout <= 0:
            raise ValueError("timeout must be positive seconds")
        due = datetime.now(UTC) + timedelta(seconds=timeout)
        timeout_at = due.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    raise InputSuspended(
        InputRequest(
            name=name,
            prompt=prompt,
            # Closed as a submit's input is: an answer with a field the model does not
            # declare is refused (422) instead of stored, logged and broadcast.
            schema=submitted_input_model(schema).model_json_schema(),
            timeout_at=timeout_at,
            default=stored_default,
        )
    )


async def suspend(
    store: JobStore,
    arq: ArqRedis,
    record: JobRecord,
    request: InputRequest,
    step_fields: dict[str, Any],
) -> Appended:
    """Record ``waiting`` for a run that ended in ``wait_for_input`` (running → waiting), with
    its timeout's deferred entry. Refused (``"cancel"``) if a cancel was asked for meanwhile."""
    then: list[Command] = []
    ttl = store.settings.retention_seconds
    if request.timeout_at is not None:
        due = datetime.fromisoformat(request.timeout_at)
        then = enqueue_commands(
            arq,
            store.keys,
            record.id,
            due,
            function=INPUT_TIMEOUT,
            args=(request.name,),
            entry_id=timeout_entry(record.id, request.name),
        )
        # Kept until the timeout has acted, however far off: the retention runs from then.
        ttl += max(0, math.ceil(due.timestamp() - datetime.now(UTC).timestamp()))
    request_json = request.model_dump(mode="json")
    return await store.append(
        record.id,
        new_event(record.id, "waiting", record.attempt, **request_json),
        {
            "state": JobState.waiting.value,
            "waiting_for": request_json,
            # A wait is not a failure: the run that follows the answer is the same attempt.
            "attempt": record.attempt - 1,
            "message": request.prompt or f"Waiting for input {request.name!r}",
            **step_fields,
        },
        owner=record.owner,
        mode="update+cancel",
        expect=(JobState.running,),
        then=then,
        ttl=ttl,
    )


# A record that changes under this many tries of an answer is not waiting any more.
WATCH_ATTEMPTS = 5


async def answer(
    store: JobStore,
    arq: ArqRedis,
    job_id: str,
    name: str,
    value: Any,
    by: str,
    *,
    check: Callable[[JobRecord | None], None],
) -> JobRecord | None:
    """Store ``value`` as the answer to the job's wait for ``name`` (``answered``), in a
    ``MULTI`` after a ``WATCH`` of the record: it happens only if the record is still as read,
    so of two answers the first is kept and the second finds the wait answered. ``check``
    refuses (raises) for a record that may not be answered so (None: no such job). The job as
    the answer left it, queued; None if the record kept changing."""
    key = store.keys.job(job_id)
    for _ in range(WATCH_ATTEMPTS):
        async with store.transaction(key) as pipe:
            await pipe.watch(key)
            record = decode_record(await pipe.hgetall(key))  # type: ignore[misc]
            check(record)
            if record is None:
                raise LookupError(f"no job with id {job_id!r}")
            event, fields, then = answered(record, name, value, by, arq=arq, keys=store.keys)
            pipe.multi()  # type: ignore[no-untyped-call]
            pending = await store.queue_append(
                pipe,
                job_id,
                [event],
                fields,
                owner=record.owner,
                expect=(JobState.waiting,),
                then=then,
            )
            try:
                (reply,) = await pipe.execute()
            except WatchError:
                continue  # the record changed since it was read: read it again
        appended = appended_from(reply)
        if appended.ok:
            await store.after(job_id, pending)  # its queue entry, on a cluster
            # The job as this answer left it, queued: a worker woken by its queue entry may
            # have started it already, which a read now would show instead.
            written = {**record.model_dump(mode="json"), **fields}
            return JobRecord.model_validate({**written, "last_event_id": appended.job_event_id})
    return None


def answered(
    record: JobRecord, name: str, value: Any, by: str, *, arq: ArqRedis, keys: Keys
) -> tuple[dict[str, Any], dict[str, Any], list[Command]]:
    """The append that stores ``value`` as the answer to the wait for ``name``: its ``input``
    event, the record's fields (waiting → queued) and the commands that queue the job again
    and take the wait's timeout entry out. For the web (an answer) and for a timeout's default;
    the caller appends it expecting ``waiting``."""
    at = utcnow()
    answers = {k: v.model_dump(mode="json") for k, v in record.answers.items()}
    answers[name] = {"value": value, "by": by, "at": at}
    event = new_event(record.id, "input", record.attempt + 1, name=name, value=value, by=by)
    event["at"] = at
    fields = {
        "state": JobState.queued.value,
        "waiting_for": None,
        "answers": answers,
        "message": None,
    }
    then = [
        *enqueue_commands(arq, keys, record.id, entry_id=resume_entry(record.id, name)),
        *dequeue_commands(keys.queue, timeout_entry(record.id, name)),
    ]
    return event, fields, then
