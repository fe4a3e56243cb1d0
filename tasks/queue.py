"""A job's arq queue entry, written as commands that ride along with a store script.

arq's ``enqueue_job`` spends three round trips (WATCH, EXISTS, MULTI) guarding against an arq
job of the same id. A job whose record the same script creates (or moves back to ``queued``)
has none, so the two writes go with it: the record, its event and the queue entry appear
together or not at all. Payload, score and expiry are arq's own (``serialize_job``,
``expires_extra_ms`` past the time the job is due).
"""

from __future__ import annotations

import time
from datetime import datetime

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job

from stepstream.tasks.commands import Command as Command  # its callers import it here
from stepstream.tasks.keyspace import Keys

RUN_JOB = "stepstream.run_job"  # the one arq function every Stepstream job runs as


def enqueue_commands(
    arq: ArqRedis,
    keys: Keys,
    job_id: str,
    run_at: datetime | None = None,
    *,
    function: str = RUN_JOB,
    args: tuple[str, ...] = (),
    entry_id: str | None = None,
) -> list[Command]:
    """The arq enqueue of ``job_id`` as commands for a store script; with ``run_at``,
    deferred until then (arq's ``_defer_until``: its queue is a sorted set scored by due time,
    so a deferred entry survives restarts and no worker takes it early).

    ``function`` and ``args``: another arq function than ``run_job``, called with ``job_id``
    and ``args``. ``entry_id``: the arq job id when it must not be ``job_id`` (arq ends a job
    by deleting its id's entry, so an entry written while the job's arq job runs needs its own
    id: the ``*_entry`` functions below).

    An entry due now is announced on ``keys.queue_wakeups``, which idle workers listen to;
    one due later is found by their timed poll."""
    arq_id = job_id if entry_id is None else entry_id
    now_ms = int(time.time() * 1000)
    due_ms = now_ms if run_at is None else max(now_ms, int(run_at.timestamp() * 1000))
    payload = serialize_job(
        function, (job_id, *args), {}, None, now_ms, serializer=arq.job_serializer
    )
    expires_ms = due_ms - now_ms + arq.expires_extra_ms
    commands = [
        Command("PSETEX", [job_key_prefix + arq_id], (expires_ms, payload), queue=True),
        Command("ZADD", [keys.queue], (due_ms, arq_id), queue=True),
    ]
    if due_ms == now_ms:
        commands.append(Command("PUBLISH", [keys.queue_wakeups], (arq_id,), queue=True))
    return commands


def dequeue_commands(queue: str, entry_id: str) -> list[Command]:
    """Commands that take a not yet started arq entry out of the queue (no-ops without one)."""
    return [
        Command("ZREM", [queue], (entry_id,), queue=True),
        Command("DEL", [job_key_prefix + entry_id], queue=True),
    ]


# Entry ids other than the job's own. arq ends a job by deleting its id's queue entry, and the
# arq job of the run before may still be ending when one of these is written. Job ids never
# hold a ``:``, so ``job_of_entry`` finds the job of each.


def resume_entry(job_id: str, name: str) -> str:
    """The entry an answer to the job's input ``name`` writes (tasks/inputs.py)."""
    return f"{job_id}:input:{name}"


def timeout_entry(job_id: str, name: str) -> str:
    """The deferred entry that ends the wait for ``name`` at its timeout (tasks/inputs.py)."""
    return f"{job_id}:timeout:{name}"


def retry_entry(job_id: str, attempt: int) -> str:
    """The entry of a retry by hand after ``attempt`` (tasks/creation.py): one per attempt, so
    a later retry by hand gets another."""
    return f"{job_id}:retry:{attempt}"


def job_of_entry(entry_id: str) -> str:
    """The job an arq queue entry runs: its own id, or the part before ``:`` of those above."""
    return entry_id.partition(":")[0]
