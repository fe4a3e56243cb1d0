"""Jobs that start jobs: ``ctx.map``, ``ctx.spawn`` and ``ctx.join`` (docs/ai-workloads.md,
"Child jobs").

A fan-out (one ``map`` or ``spawn`` call) creates its children in one ``MULTI`` of the one
job-creation path (tasks/creation.py), each a full job with its own record, log, retries and
cancel, carrying its ``parent``, its index and its parent's owner and subject. Their ids are
derived from the parent's id, the fan-out (its step and its place among the run's fan-outs) and
the index, and the ``MULTI`` also marks the fan-out as created (``g:<group>`` in the parent's
counts hash): a parent that runs again (a retry, a worker killed, the resume after its wait)
finds the mark and creates nothing. The first child's create takes the room for all of them
under the owner's unfinished-jobs limit, and the others require it: refused, nothing is stored.

``join`` (and so ``map``) returns at once when every child has ended (or more have failed than
the policy tolerates). Otherwise it suspends the run (``ChildrenSuspended``): the runtime records
``waiting`` with ``waiting_for: {"children": counts}`` and leaves the parent's arq queue entry in
the counts hash, and the run ends, holding no worker. The append that writes the end that makes
the parent ready also writes that entry (tasks/scripts/resume_parent.lua), and the parent runs again
from the top: ``run_step`` steps are restored, the fan-outs are found created, and ``join`` reads
the results from the children's records, in input order, typed by the child task's output model.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from pydantic import BaseModel

from stepstream.tasks import cancellation, creation, lua, rollup
from stepstream.tasks.commands import Arg, Command
from stepstream.tasks.errors import PermanentError
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import JobState
from stepstream.tasks.queue import enqueue_commands
from stepstream.tasks.registry import TaskSpec
from stepstream.tasks.rollup import counts_of
from stepstream.tasks.store import JobStore

if TYPE_CHECKING:
    from stepstream.tasks.context import TaskContext

OnFailure = Literal["fail", "collect"]


@dataclass(frozen=True)
class ChildHandle:
    """A started child: ``ctx.join`` takes these."""

    id: str
    index: int
    task: str


@dataclass(frozen=True)
class ChildFailed:
    """In ``map``'s (``join``'s) results in place of a child that did not complete, under
    ``on_failure="collect"`` or ``max_failures``."""

    id: str
    index: int
    state: str  # "failed" or "cancelled"
    error: dict[str, Any] | None


class ChildrenFailed(PermanentError):
    """More children failed than the parent tolerates (``on_failure="fail"``: any)."""

    def __init__(self, failed: Sequence[ChildFailed], failures: int, tolerated: int) -> None:
        if failed:
            first = failed[0]
            why = (first.error or {}).get("message") or first.state
            which = f"the first, {first.id} (index {first.index}): {why}"
        else:  # the failures are among the children of the job's earlier fan-outs
            which = "none of them in this call"
        super().__init__(
            f"{failures} child job(s) did not complete (tolerated: {tolerated}); {which}"
        )
        self.failed = list(failed)


class ChildrenRefused(PermanentError):
    """A fan-out past a limit: the width, the depth, or the owner's unfinished jobs. Raised
    before any child is created."""


class ChildrenSuspended(BaseException):
    """Raised by ``join`` while children run: the runtime ends the run and records ``waiting``.
    A ``BaseException``, like ``InputSuspended``, so that ``except Exception`` cannot swallow
    it."""

    def __init__(self, counts: dict[str, int], tolerated: int | None) -> None:
        super().__init__(f"waiting for {counts['size'] - counts['done']} child job(s)")
        self.counts = counts
        self.tolerated = tolerated


def child_id(keys: Keys, parent_id: str, group: str, index: int) -> str:
    """The id of a fan-out's child: derived, so creating it again is refused as ``exists``.
    20 characters of base64url (the length of a random id), never starting with ``-``/``_``.
    On a cluster, derived again until it lands in its parent's partition (``Keys.draw_id``)."""

    def derive(draw: int) -> str:
        salt = f"\0{draw}" if draw else ""  # draw 0: the id on one server, as it always was
        digest = hashlib.sha256(f"{parent_id}\0{group}\0{index}{salt}".encode()).digest()
        text = base64.urlsafe_b64encode(digest).decode()[:20]
        return text if text[0].isalnum() else "c" + text[1:]

    return keys.draw_id(derive, keys.partition_of(parent_id))


def group_token(group: str) -> str:
    """A fan-out's short name in keys and records."""
    return hashlib.sha256(group.encode()).hexdigest()[:12]


def children_entry(parent_id: str, size: int) -> str:
    """The arq entry that resumes a parent waiting for its first ``size`` children: its own id
    (see tasks/queue.py), one per wait."""
    return f"{parent_id}:children:{size}"


def tolerance(on_failure: OnFailure, max_failures: int | None) -> int | None:
    """How many children may fail before the parent fails (None: any number)."""
    if max_failures is not None:
        if max_failures < 0:
            raise ValueError("max_failures must be 0 or more")
        return max_failures
    if on_failure == "collect":
        return None
    if on_failure == "fail":
        return 0
    raise ValueError(f"on_failure must be 'fail' or 'collect', not {on_failure!r}")


async def start(
    ctx: TaskContext,
    group: str,
    items: Sequence[tuple[TaskSpec, dict[str, Any]]],
    *,
    step: tuple[int, int] | None,
    concurrency: int | None,
) -> tuple[list[ChildHandle], bool]:
    """Create the fan-out ``group``'s children (once: see the module doc) and return their
    handles, and whether this call created them."""
    store, arq = ctx.store, _arq(ctx)
    token = group_token(group)
    handles = [
        ChildHandle(child_id(store.keys, ctx.job_id, group, i), i, spec.name)
        for i, (spec, _) in enumerate(items)
    ]
    counts_key = store.keys.batch_counts(ctx.job_id)
    if not items or await store.redis.hexists(counts_key, f"g:{token}"):  # type: ignore[misc]
        return handles, False
    settings = store.settings
    if len(items) > settings.max_children_per_call:
        raise ChildrenRefused(
            f"{len(items)} children in one call; the most is {settings.max_children_per_call} "
            "(STEPSTREAM_MAX_CHILDREN_PER_CALL)"
        )
    if ctx.depth + 1 > settings.max_job_depth:
        raise ChildrenRefused(
            f"a job at depth {ctx.depth} cannot start children: the deepest a tree goes is "
            f"{settings.max_job_depth} (STEPSTREAM_MAX_JOB_DEPTH)"
        )
    if concurrency is not None and concurrency < 1:
        raise ValueError("concurrency must be 1 or more")
    ttl = settings.retention_seconds
    calls = []
    first_id = handles[0].id
    size = int(await store.redis.hget(counts_key, "#size") or 0)  # type: ignore[misc]
    for handle, (spec, raw_input) in zip(handles, items, strict=True):
        plan = await creation.plan(
            store,
            arq,
            creation.NewJob(
                task=spec,
                input=raw_input,
                owner=ctx.owner,
                subject=ctx.subject,
                budget=ctx.child_budget(len(items)),
                parent=ctx.job_id,
                parent_index=handle.index,
                parent_group=token if concurrency is not None else None,
                parent_slots=concurrency,
                depth=ctx.depth + 1,
                id=handle.id,
            ),
        )
        then = [
            Command("RPUSH", [store.keys.batch_children(ctx.job_id)], (handle.id,)),
            Command("EXPIRE", [store.keys.batch_children(ctx.job_id)], (ttl,)),
        ]
        if handle.id == first_id:
            # With the first create (every other one requires it): the fan-out is created.
            marks: list[str | int] = ["#base", size, f"g:{token}", len(items)]
            if step is not None:
                marks += ["#step", f"{step[0]}/{step[1]}"]
            then = [
                Command("HINCRBY", [counts_key], ("#size", len(items))),
                Command("HSET", [counts_key], marks),
                Command("EXPIRE", [counts_key], (ttl,)),
                *then,
            ]
        plan = replace(plan, then=(*then, *plan.then))
        calls.append(
            creation.create_call(
                store,
                plan,
                take=len(items) if handle.id == first_id else 0,
                requires=None if handle.id == first_id else first_id,
            )
        )
    first = (await store.create_together(calls))[0]
    if first.refused == "limit":
        raise ChildrenRefused(
            f"{len(items)} children do not fit under the owner's unfinished-jobs limit "
            f"({settings.max_unfinished_per_owner}, STEPSTREAM_MAX_UNFINISHED_PER_OWNER): "
            f"{first.unfinished} are unfinished; nothing was started"
        )
    if not first.ok and first.refused != "exists":
        raise RuntimeError(f"children of job {ctx.job_id} not created: {first.refused}")
    return handles, first.ok


async def join(
    ctx: TaskContext, handles: Sequence[ChildHandle], tolerated: int | None
) -> list[Any]:
    """The handles' results in order, once every child of the parent has ended; suspends the
    run (``ChildrenSuspended``) while some run, unless more than ``tolerated`` have failed."""
    store = ctx.store
    raw: dict[str, str] = await store.redis.hgetall(  # type: ignore[misc]
        store.keys.batch_counts(ctx.job_id)
    )
    counts = counts_of(raw)
    failures = counts["failed"] + counts["cancelled"]
    too_many = tolerated is not None and failures > tolerated
    if counts["done"] < counts["size"] and not too_many:
        raise ChildrenSuspended(counts, tolerated)
    await rollup.show(store, ctx.job_id)
    records = await store.get_many([h.id for h in handles])
    results: list[Any] = []
    failed: list[ChildFailed] = []
    for handle, record in zip(handles, records, strict=True):
        if record is not None and record.state == JobState.completed:
            spec = ctx.registry_task(record.task)
            results.append(
                record.result if spec is None else spec.output_model.model_validate(record.result)
            )
            continue
        if record is not None and not record.state.terminal:
            results.append(None)  # still running: only when too many failed, and it is cancelled
            continue
        error = None if record is None or record.error is None else record.error.model_dump()
        if error is not None:
            error.pop("traceback", None)
        marker = ChildFailed(
            handle.id, handle.index, "expired" if record is None else record.state.value, error
        )
        failed.append(marker)
        results.append(marker)
    if too_many:
        parent = await store.get(ctx.job_id)
        if parent is not None:
            await cancellation.cancel_children(store, parent, "a sibling failed")
        raise ChildrenFailed(failed, failures, tolerated or 0)
    return results


def resume_commands(
    store: JobStore, arq: ArqRedis, parent_id: str, size: int, tolerated: int | None
) -> list[Command]:
    """What a parent's ``waiting`` writes into its counts hash: its queue entry, for the end
    that makes it ready to write (tasks/scripts/resume_parent.lua)."""
    counts_key = [store.keys.batch_counts(parent_id)]
    entry = children_entry(parent_id, size)
    # arq's own entry (tasks/queue.py), kept for later: its key, queue and channel are declared
    # by the script that writes it (tasks/scripts/resume_parent.lua), from the entry's id.
    write, *_ = enqueue_commands(arq, store.keys, parent_id, entry_id=entry)
    expires_ms, payload = write.args
    payload_hex = (
        bytes(payload).hex() if isinstance(payload, bytes) else str(payload).encode().hex()
    )
    fields: tuple[Arg, ...] = ("#resume", payload_hex, "#entry", entry, "#expire_ms", expires_ms)
    # The entry's key names: what a cluster's script writes into its queue outbox for them
    # (tasks/scripts/resume_parent.lua), and what the append script of earlier versions read.
    fields += ("#job_key", job_key_prefix + entry, "#queue", store.keys.queue)
    fields += ("#wakeups", store.keys.queue_wakeups)
    commands = [Command("HSET", counts_key, fields)]
    if tolerated is None:
        commands.append(Command("HDEL", counts_key, ("#max_failures",)))
    else:
        commands.append(Command("HSET", counts_key, ("#max_failures", tolerated)))
    commands.append(Command("EXPIRE", counts_key, (store.settings.retention_seconds,)))
    return commands


async def resume_if_ready(store: JobStore, parent_id: str) -> None:
    """Write a waiting parent's entry if it is ready already: its last child ended between
    the parent's ``join`` and its ``waiting``, and so found no entry to write. The entry's id
    is read first, for the script to declare its key; an entry changed in between is named by
    the script, and it is called again with that one."""
    counts = store.keys.batch_counts(parent_id)
    script = lua.Script(store.redis, lua.resume())
    entry: str | None = await store.redis.hget(counts, "#entry")  # type: ignore[misc]
    for _ in range(3):
        if entry is None:
            return
        keys = [counts, job_key_prefix + entry, store.keys.queue, store.keys.queue_wakeups]
        if store.cluster:  # arq's queue is another server's: the partition's outbox instead
            keys = [counts, store.keys.of(parent_id).queue_outbox]
        outcome, other = await script(keys=keys, args=[entry])
        if outcome != "other":
            await store.run_resume(parent_id, entry)
            return
        entry = other or None
    raise RuntimeError(f"job {parent_id}: its queue entry kept changing")


async def ready(store: JobStore, parent_id: str) -> bool:
    """Whether a parent waiting for its children may run: the test the resume entry is written
    on, so that a stale entry (an earlier wait's) runs nothing."""
    raw: dict[str, str] = await store.redis.hgetall(  # type: ignore[misc]
        store.keys.batch_counts(parent_id)
    )
    counts = counts_of(raw)
    limit = raw.get("#max_failures")
    failures = counts["failed"] + counts["cancelled"]
    return counts["done"] >= counts["size"] or (limit is not None and failures > int(limit))


def as_input(value: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """A child's input as stored: a model's JSON form, or the mapping."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return dict(value)


def _arq(ctx: TaskContext) -> ArqRedis:
    if ctx.arq is None:  # run outside arq's worker: nothing would run the children
        raise RuntimeError("child jobs need the arq worker")
    return ctx.arq
