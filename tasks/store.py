"""The job store and event log in Redis.

Every event goes through ONE atomic append (tasks/scripts/append.lua, whose header documents its
keys and arguments): it adds the event to the job's stream
and to the firehose, updates the record, refreshes the expiry and publishes the stored event, so
the record and the log can never disagree. A precondition on the record's state makes the append
a compare-and-set, which is how the web process and a worker race safely over a queued job.
The same script takes several events of one job at once (``append_many``): a burst of progress
costs one round trip and one precondition check instead of one per event. It also checks and
takes an owner's unfinished-jobs places (``STEPSTREAM_MAX_UNFINISHED_PER_OWNER``) with the write
they admit, so concurrent submissions can never share the last place, and it counts the state
transition it writes (tasks/transitions.py) and a batch child's end into its batch, so no path
can write a transition without counting it. Every key the script touches is declared in its
KEYS (the ride-along commands name theirs: tasks/commands.py), computed here, never in the
script: on a cluster every key of one call must share a hash slot, and this makes it checkable.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, cast

from arq.constants import job_key_prefix
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError, NoScriptError, RedisError, ResponseError

from stepstream._stream_id import StreamId
from stepstream.tasks import lua, partitioned_firehose, planes, transitions
from stepstream.tasks.commands import Command
from stepstream.tasks.connection import connect
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import JobRecord, JobState, utcnow
from stepstream.tasks.output import with_live_text
from stepstream.tasks.places import Places
from stepstream.tasks.settings import Settings

logger = logging.getLogger("stepstream.store")


@dataclass(frozen=True)
class Appended:
    """The outcome of an append: the ids it got, or why the precondition refused it."""

    job_event_id: str | None
    firehose_id: str | None
    # the record's state (JSON), "exists", "missing", "cancel", "orphan", "limit", "rate" or
    # "keys"
    refused: str | None = None
    unfinished: int | None = None  # "limit": the owner's unfinished jobs, which left no room
    submitted: int | None = None  # "rate": the owner's submissions in the second, this one too

    @property
    def ok(self) -> bool:
        return self.refused is None


@dataclass(frozen=True)
class StreamInfo:
    last_id: str
    first_id: str | None
    max_deleted_id: str
    length: int
    entries_added: int

    def trimmed_after(self, cursor: tuple[int, int]) -> bool:  # a StreamId, or a plain pair
        """Whether events that followed ``cursor`` were trimmed away.

        ``max-deleted-entry-id`` alone is not enough: Valkey does not move it on XTRIM or on
        XADD's MAXLEN, so a cursor older than the first entry kept, in a stream that has lost
        entries, counts as trimmed too.
        """
        if cursor < StreamId.parse(self.max_deleted_id):
            return True
        if self.entries_added <= self.length:
            return False
        return self.first_id is None or cursor < StreamId.parse(self.first_id)


def _no_such_key(error: ResponseError) -> bool:
    """``XINFO STREAM``'s answer for a stream that does not exist. Any other error (a cluster
    node down, loading, or no longer serving the slot) is not an empty log: read as one, a
    resuming stream would skip the events after its cursor."""
    # After the last colon: a pipeline's error begins with its command, and so the key's name.
    return "no such key" in str(error).rsplit(":", 1)[-1].lower()


def _stream_info(info: dict[str, Any]) -> StreamInfo:
    first = info.get("first-entry")
    return StreamInfo(
        last_id=info["last-generated-id"],
        first_id=first[0] if first else None,
        max_deleted_id=info.get("max-deleted-entry-id", "0-0"),
        length=info["length"],
        entries_added=info.get("entries-added", info["length"]),
    )


# What a cluster's script leaves to run after it: its queue outbox entry's name and commands
# (``JobStore.after``); None when it leaves nothing (always, on one server).
Pending = tuple[str, list[Command]] | None

# Valkey restarts one transaction outlives before its error surfaces (create_together).
SCRIPT_RELOADS = 5
# Calls of one append that may be refused for the keys of a batch they did not declare: the
# record's batch, then its parent's queue entry, then (a parent that began to wait meanwhile)
# that entry again.
KEY_ROUNDS = 4
TERMINAL = frozenset({'"completed"', '"failed"', '"cancelled"'})
# The states that hold a place among the owner's unfinished jobs (append.lua adds them).
PLACED = frozenset({'"queued"', '"scheduled"'})
# json.dumps(value, separators=(",", ":")), without building an encoder on every call: a create
# encodes some forty values.
compact_json = json.JSONEncoder(separators=(",", ":")).encode
_json_string = json.encoder.encode_basestring_ascii  # what compact_json does with a str
_JSON_CONSTANTS = {None: "null", True: "true", False: "false"}


def field_json(value: Any) -> str:
    """``compact_json(value)``, the same text, with the common cases of a record's field (null,
    a bool, a string, an int) answered without the encoder's call."""
    kind = type(value)
    if kind is str:
        return _json_string(value)
    if value is None or kind is bool:
        return _JSON_CONSTANTS[value]
    if kind is int:
        return int.__repr__(value)
    return compact_json(value)


@dataclass(frozen=True)
class ScriptCall:
    """One call of the append script (tasks/scripts/append.lua), before its keys and arguments
    are laid out (``JobStore.lay_out``). ``fields`` hold the call's mark, so the same call sent
    again is recognised. ``batch`` and ``entry``: the batch (or parent) the job's end is counted
    into and its waiting parent's queue entry, whose keys the call declares; the script refuses
    a call that needs others (``"keys"``), and the store calls again with them."""

    job_id: str
    events: tuple[str, ...]  # JSON
    fields: Mapping[str, str]  # name -> JSON
    owner: str | None
    mode: str
    expect: str  # as _state_list makes it
    then: tuple[Command, ...]
    take: int
    ttl: int
    score: str
    counted: tuple[str, ...]  # the transitions it makes (tasks/transitions.py)
    window: int  # their window's start
    requires: str | None = None
    batch: str | None = None
    entry: str | None = None

    @property
    def terminal(self) -> bool:
        return self.fields.get("state") in TERMINAL


class JobStore:
    """The log plane's records and logs. ``redis``: the log plane's client (a cluster's when
    ``STEPSTREAM_CLUSTER_URL`` is set: tasks/planes.py, ``connect_log_plane``); ``queue``: the
    queue plane's, for what a cluster's script leaves to run after it (the same client on one
    server, where the scripts write arq's queue themselves)."""

    def __init__(self, redis: Redis, settings: Settings, queue: Redis | None = None) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys.of_deployment(settings)
        self.queue = redis if queue is None else queue
        self.cluster = self.keys.partitioned
        self._append = lua.Script(redis, lua.append())
        self.places = Places(redis, self.keys, settings)  # an owner's, on a cluster
        self._index_trimmed_at: dict[int, float] = {}
        self._nodes: dict[str, Redis] = {}  # a cluster's node clients, for transactions
        self._webhook_states = _state_list(sorted(settings.webhook_states))

    @classmethod
    def open(cls, settings: Settings, *, attempts: int | None = 25) -> JobStore:
        """The store of a deployment: on the cluster at ``STEPSTREAM_CLUSTER_URL`` with the
        queue plane at ``REDIS_URL``, or both on ``REDIS_URL`` (tasks/planes.py). ``attempts``:
        as ``connect``'s. Closed with ``aclose``."""
        log = planes.connect_log_plane(settings, attempts=attempts)
        queue = connect(settings, attempts=attempts) if settings.cluster_url else None
        return cls(log, settings, queue)

    async def ping(self) -> None:
        """Both planes answer (one server: the one)."""
        await self.redis.ping()
        if self.queue is not self.redis:
            await self.queue.ping()

    async def aclose(self) -> None:
        for node in self._nodes.values():
            await node.aclose()
        if self.queue is not self.redis:
            await self.queue.aclose()
        await self.redis.aclose()

    @asynccontextmanager
    async def transaction(self, key: str) -> AsyncIterator[Pipeline]:
        """A ``MULTI`` pipeline that may ``WATCH`` ``key`` and keys of its slot (a job's own
        and its partition's). redis-py 5's cluster client refuses transactions; a cluster
        node runs them on the keys it holds, so on a cluster this is a client of the node
        that holds ``key``'s slot (the slot map's, as the cluster client last read it: a
        failover in between makes the ``EXEC`` fail, and the caller's error surfaces)."""
        async with (await self._node_of(key)).pipeline(transaction=True) as pipe:
            yield pipe

    async def _node_of(self, key: str) -> Redis:
        if not self.cluster:
            return self.redis
        cluster = cast(RedisCluster, self.redis)
        await cluster.initialize()  # once: the slot map
        node = cluster.get_node_from_key(key)
        if node is None:
            raise ConnectionError(f"no node holds the slot of {key!r}")
        client = self._nodes.get(node.name)
        if client is None:
            client = Redis(host=node.host, port=int(node.port), decode_responses=True)
            self._nodes[node.name] = client
        return client

    def new_job_id(self, *, parent: str | None = None, scope: str | None = None) -> str:
        """A new job's id, in the partition it must be created in on a cluster: its parent's
        (a child's end is counted into its parent's keys by its own script), or an
        Idempotency-Key scope's (the create confirms the claim in its script); else any
        (random ids: jobs spread evenly)."""
        home = parent if parent is not None else scope
        return self.keys.new_job_id(None if home is None else self.keys.partition_of(home))

    # -- writes ---------------------------------------------------------------------------

    async def append(
        self,
        job_id: str,
        event: Mapping[str, Any],
        fields: Mapping[str, Any],
        *,
        owner: str | None = None,
        mode: str = "update",
        expect: Sequence[JobState] = (),
        then: Sequence[Command] = (),
        take: int = 0,
        ttl: int | None = None,
        batch: str | None = None,
    ) -> Appended:
        """Append one event and apply ``fields`` to the record, atomically.

        ``then``: Redis commands to run in the same script when the append succeeds (and only
        then), such as the arq enqueue of a job just created. ``take``: places of the owner's
        unfinished-jobs limit this append needs free (refused as ``"limit"`` otherwise; the
        append itself fills one if it makes the job scheduled or queued). ``ttl``: how long the
        record and its log live after this append (the retention by default). ``batch``: the
        record's ``batch_id`` or ``parent``, if the caller knows it, for an append that ends the
        job: its end is counted there, and the script asks for the keys otherwise (one more
        round trip).
        """
        return await self.append_many(
            job_id,
            [event],
            fields,
            owner=owner,
            mode=mode,
            expect=expect,
            then=then,
            take=take,
            ttl=ttl,
            batch=batch,
        )

    async def append_many(
        self,
        job_id: str,
        events: Sequence[Mapping[str, Any]],
        fields: Mapping[str, Any],
        *,
        owner: str | None = None,
        mode: str = "update",
        expect: Sequence[JobState] = (),
        then: Sequence[Command] = (),
        take: int = 0,
        ttl: int | None = None,
        batch: str | None = None,
    ) -> Appended:
        """Append ``events`` of one job in order and apply ``fields``, all or none.

        The precondition is checked once, before the first event; the ids returned are the
        last event's.
        """
        call = self.script_call(
            job_id, events, fields, owner, mode, expect, then, take=take, ttl=ttl, batch=batch
        )
        return await self.call(call)

    async def call(self, call: ScriptCall, rate: tuple[int, int] | None = None) -> Appended:
        """Run ``call`` alone: called again with the keys the script asks for, and once more
        after dropping the owner's expired unfinished ids if they refused it. ``rate``: see
        ``create``.

        On a cluster the owner's places are taken first, in its home partition (``reserve``),
        and what the script cannot write (arq's entry, keys of other slots) goes through the
        partition's queue outbox, run right after it (tasks/planes.py)."""
        if not self.cluster:
            return (await self._call(call, rate))[0]
        refused, reserved = await self.reserve([call], rate)
        if refused is not None:
            return refused
        call, entry = self._outboxed(call)
        appended, call = await self._call(call, None)
        if appended.ok:
            await self._run_entry(call.job_id, entry)
            await self.run_resume(call.job_id, call.entry)
        elif reserved:
            await self.places.release(call.owner, reserved)
        return appended

    async def reserve(
        self, calls: Sequence[ScriptCall], rate: tuple[int, int] | None
    ) -> tuple[Appended | None, list[str]]:
        """On a cluster, the places ``calls`` take under their owner's limits, taken in one
        call in the owner's home partition (tasks/scripts/reserve.lua): (the refusal, or None;
        the ids that took places, for ``release`` if the creates are refused). Concurrent
        submissions of one owner all go through the one set, so they can never share its
        last place, wherever their jobs are created."""
        ids = [
            c.job_id
            for c in calls
            if c.fields.get("state") in PLACED and (c.mode == "create" or c.take > 0)
        ]
        take = sum(c.take for c in calls)
        if not ids and take == 0 and rate is None:
            return None, []
        owner = calls[0].owner
        refused = await self.places.take(owner, ids, take, rate, calls[0].score)
        if refused is None:
            return None, ids
        why, count = refused
        if why == "rate":
            return Appended(None, None, refused="rate", submitted=count), []
        return Appended(None, None, refused="limit", unfinished=count), []

    def _outboxed(self, call: ScriptCall) -> tuple[ScriptCall, tuple[str, list[Command]] | None]:
        """On a cluster: ``call`` with what its script cannot run (the queue plane's commands,
        those of other slots, and an end's release of its owner's place) replaced by one write
        of its partition's queue outbox; and that entry (its name and commands)."""
        then = list(call.then)
        if call.terminal:
            owner_set = self.keys.owner_home(call.owner).owner_unfinished(call.owner)
            then.append(Command("ZREM", [owner_set], (call.job_id,)))
        inside, after = planes.split(self.keys.job(call.job_id), then)
        # A cluster's script takes no places (``reserve`` did) and writes no other slot's key.
        if not after:
            return replace(call, then=tuple(inside), take=0), None
        entry = f"{call.job_id} {json.loads(call.fields['append_op'])}"
        outbox = self.keys.of(call.job_id).queue_outbox
        inside.append(Command("HSET", [outbox], (entry, planes.encode(after))))
        return replace(call, then=tuple(inside), take=0), (entry, after)

    async def after(self, job_id: str, entry: Pending) -> None:
        """Run what ``queue_append`` left for after its ``MULTI`` (nothing on one server),
        once it has applied."""
        await self._run_entry(job_id, entry)

    async def _run_entry(self, job_id: str, entry: Pending) -> None:
        """Run a call's queue outbox entry right after its script: the fast path. A failure is
        the drain's (a worker's, tasks/planes.py): the call itself is stored."""
        if entry is None:
            return
        try:
            outbox = self.keys.of(job_id).queue_outbox
            await planes.run_entry(self.redis, self.queue, outbox, entry[0], entry[1])
        except (RedisError, OSError) as exc:
            logger.warning("job %s: its queue outbox entry is left to the workers: %r", job_id, exc)

    async def run_resume(self, job_id: str, entry: str | None) -> None:
        """On a cluster, a waiting parent's queue entry that a child's end (or ``resume.lua``)
        wrote into the partition's queue outbox: run now, or by the drain."""
        if entry is None or not self.cluster:
            return
        outbox = self.keys.of(job_id).queue_outbox
        text: str | None = await self.redis.hget(outbox, f"resume {entry}")  # type: ignore[misc]
        if text is not None:
            await self._run_entry(job_id, (f"resume {entry}", planes.decode(text)[1]))

    async def _call(
        self, call: ScriptCall, rate: tuple[int, int] | None
    ) -> tuple[Appended, ScriptCall]:
        """``call`` run, and as it was last sent (with the keys the script asked for)."""
        pruned = False
        for _ in range(KEY_ROUNDS):
            keys, args = self.lay_out(call, rate)
            reply = await self._append(keys=keys, args=args)
            rate = None  # counted once: a call sent again is the same submission
            needs = keys_needed(reply)
            if needs is not None:
                call = replace(call, batch=needs[0], entry=needs[1])
                continue
            appended = appended_from(reply)
            if appended.refused == "limit" and not pruned:
                pruned = True
                if await self.drop_expired_unfinished(call.owner):
                    continue
            return appended, call
        raise RuntimeError(f"job {call.job_id}: its batch's keys kept changing")

    async def queue_append(
        self,
        pipe: Pipeline,
        job_id: str,
        events: Sequence[Mapping[str, Any]],
        fields: Mapping[str, Any],
        *,
        owner: str | None = None,
        expect: Sequence[JobState] = (),
        then: Sequence[Command] = (),
        batch: str | None = None,
    ) -> Pending:
        """``append_many`` queued on ``pipe`` (``transaction``): in a ``MULTI`` after a
        ``WATCH``, an append that happens only if what the caller read is still so (read the
        outcome with ``appended_from``; once applied, give what it returns to ``after``). An
        append that ends a job counted into a batch must name it (``batch``): it cannot be
        called again in the same ``MULTI``, and is refused as ``"keys"`` otherwise (a batch's
        parent, which this ends, is in none)."""
        call = self.script_call(job_id, events, fields, owner, "update", expect, then, batch=batch)
        entry: Pending = None
        if self.cluster:
            call, entry = self._outboxed(call)
        keys, args = self.lay_out(call)
        await self._append(keys=keys, args=args, client=pipe)
        return entry

    def script_call(
        self,
        job_id: str,
        events: Sequence[Mapping[str, Any]],
        fields: Mapping[str, Any],
        owner: str | None,
        mode: str,
        expect: Sequence[JobState],
        then: Sequence[Command],
        *,
        take: int = 0,
        ttl: int | None = None,
        score: float | None = None,
        requires: str | None = None,
        batch: str | None = None,
    ) -> ScriptCall:
        """An append, prepared: see ``append_many`` (``mode``: see tasks/scripts/append.lua)."""
        if not events:
            raise ValueError("an append needs at least one event")
        state = fields.get("state")
        now = time.time()
        # The script's guard against a retried call applying twice (see append.lua).
        marked = {**fields, "append_op": secrets.token_hex(8)}
        return ScriptCall(
            job_id=job_id,
            events=tuple(compact_json(event) for event in events),
            fields={name: field_json(value) for name, value in marked.items()},
            owner=owner,
            mode=mode,
            expect=_state_list(s.value for s in expect),
            then=tuple(then),
            take=take,
            ttl=self.settings.retention_seconds if ttl is None else ttl,
            score=f"{now * 1_000_000 if score is None else score:.0f}",
            counted=tuple(transitions.made(mode, None if state is None else str(state))),
            window=transitions.window_start(now),
            requires=requires,
            batch=batch,
        )

    def lay_out(
        self, call: ScriptCall, rate: tuple[int, int] | None = None
    ) -> tuple[list[str], list[Any]]:
        """``call`` as the script takes it: every key it touches in KEYS, its named arguments
        in ARGV[1], then the events, the fields and the commands' arguments (append.lua's
        header says which is which). ``rate``: (limit, unix second) of a submission counted
        under its owner's submissions per second (``create``)."""
        # The partition's keys: on one server, the plain global names.
        part = self.keys.of(call.job_id)
        keys = [
            self.keys.job(call.job_id),
            self.keys.job_events(call.job_id),
            part.firehose,
            self.keys.job_cancel(call.job_id),
            part.jobs,
            part.owner_unfinished(call.owner),
            part.webhook_outbox,
            part.webhooks_dropped,
            self.keys.job_channel(call.job_id),
            part.firehose_channel,
        ]
        for name in call.counted:
            keys.append(part.transitions(name))
            keys.append(part.transitions_window(name, call.window))
        if call.requires is not None:
            keys.append(self.keys.job(call.requires))
        # An end's batch keys only: the script looks at them for nothing else.
        batch = call.batch if call.terminal else None
        entry = call.entry if batch is not None else None
        if batch is not None:
            keys.append(self.keys.batch_counts(batch))
            keys.append(self.keys.batch_ended(batch))
        if entry is not None and self.cluster:
            keys.append(part.queue_outbox)  # arq's queue is another server's (append.lua)
        elif entry is not None:
            keys.extend((job_key_prefix + entry, self.keys.queue, self.keys.queue_wakeups))
        if rate is not None:
            keys.append(part.submissions(call.owner, rate[1]))
        named = {
            "events": len(call.events),
            "fields": len(call.fields),
            "commands": [[c.name, len(c.keys), len(c.args)] for c in call.then],
            "job_maxlen": self.settings.job_log_maxlen,
            "firehose_maxlen": self.settings.firehose_maxlen,
            "outbox_maxlen": self.settings.webhook_outbox_maxlen,
            "ttl": call.ttl,
            "window_ttl": transitions.WINDOW_TTL,
            "mode": call.mode,
            "expect": call.expect,
            "owner": json.dumps(call.owner),
            "id": call.job_id,
            "score": call.score,
            "webhook_states": self._webhook_states,
            "limit": self.settings.max_unfinished_per_owner,
            "take": call.take,
            "counted": len(call.counted),
            "requires": call.requires is not None,
            "batch": batch if batch is not None else False,
            "entry": entry if entry is not None else False,
            "outboxed": self.cluster,
            "rate": rate[0] if rate is not None else False,
        }
        args: list[Any] = [compact_json(named), *call.events]
        for name, value in call.fields.items():
            args.append(name)
            args.append(value)
        for command in call.then:
            keys.extend(command.keys)
            args.extend(command.args)
        return keys, args

    async def drop_expired_unfinished(self, owner: str | None) -> int:
        """Drop the ids among ``owner``'s unfinished jobs whose record has expired: they hold
        no place. Called when the limit refuses, so a lost record can never lock its owner out.
        A record lives at least the retention past its id's score (the time it was added, or a
        scheduled job's run_at), so only ids older than that are looked at: a refusal costs
        nothing like a scan of every unfinished job. Not in the append script: the records'
        keys are known only from the set's members, and an expired record never comes back,
        so dropping its id needs no atomicity with the check."""
        if self.cluster:
            return await self.places.drop_stale(owner)
        key = self.keys.owner_unfinished(owner)
        horizon = (time.time() - self.settings.retention_seconds) * 1_000_000
        ids: list[str] = await self.redis.zrangebyscore(key, "-inf", f"{horizon:.0f}")
        if not ids:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(self.keys.job(job_id))
            found = await pipe.execute()
        gone = [job_id for job_id, exists in zip(ids, found, strict=True) if not exists]
        if gone:
            await self.redis.zrem(key, *gone)
        return len(gone)

    async def create(
        self,
        record: JobRecord,
        *events: Mapping[str, Any],
        then: Sequence[Command] = (),
        take: int = 0,
        rate: tuple[int, int] | None = None,
    ) -> Appended:
        """Create ``record`` with its first events, in order. ``take``: see ``append``; a
        submission takes one place, a batch's parent one per child (it is never queued itself).
        ``rate``: (limit, unix second): count the submission in its owner's second, in the
        same script, and refuse it (``"rate"``, writing nothing else) past ``limit``.
        """
        appended = await self.call(self._create_call(record, events, then, take, None), rate)
        now = time.time()
        partition = self.keys.partition_of(record.id)
        if appended.ok and now - self._index_trimmed_at.get(partition, 0.0) >= 1.0:
            # Index entries scored before the retention point at expired jobs. Trimming once a
            # second per process (and partition), not on every submit, saves a round trip per
            # submission.
            self._index_trimmed_at[partition] = now
            horizon = (now - self.settings.retention_seconds) * 1_000_000
            await self.redis.zremrangebyscore(self.keys.at(partition).jobs, 0, horizon)
        return appended

    def create_call(
        self,
        record: JobRecord,
        *events: Mapping[str, Any],
        then: Sequence[Command] = (),
        take: int = 0,
        requires: str | None = None,
    ) -> ScriptCall:
        """``create``, prepared for ``create_together``. ``events``: the record's first events,
        in order. ``requires``: a job whose record must exist (refused as ``"orphan"``
        otherwise), such as one created earlier in the same transaction."""
        return self._create_call(record, events, then, take, requires)

    async def create_together(self, calls: Sequence[ScriptCall]) -> list[Appended]:
        """Several jobs' creates in one ``MULTI``: stored together or not at all.

        redis-py loads a pipeline's scripts before ``MULTI``, but when a connection error makes
        it send the transaction again it does not load them again: a Valkey restarted in between
        has forgotten them, and every ``EVALSHA`` in the ``EXEC`` answers ``NOSCRIPT``, applying
        nothing. The same calls are sent again, scripts loaded first; their marks (see
        append.lua) make a transaction that had in fact been applied answer as it did. So
        does one refused by the owner's unfinished-jobs limit (refused, the first create
        refuses every other: they require it), sent again after dropping expired ids, and one
        with a create refused for its batch's keys, sent again with them.

        On a cluster the creates are of one partition (a batch's children are in their
        parent's): their ``MULTI`` runs on the node of its slot, the owner's places taken
        first (``reserve``) and their queue outbox entries run after it.
        """
        if not self.cluster:
            return await self._together(calls)
        refused, reserved = await self.reserve(calls, None)
        if refused is not None:
            return [refused for _ in calls]
        split = [self._outboxed(call) for call in calls]
        appended = await self._together([call for call, _ in split])
        if all(a.ok for a in appended):
            for call, (_, entry) in zip(calls, split, strict=True):
                await self._run_entry(call.job_id, entry)
                if call.terminal and call.batch is not None:  # a cached child's end
                    entry_id = await self.redis.hget(  # type: ignore[misc]
                        self.keys.batch_counts(call.batch), "#entry"
                    )
                    await self.run_resume(call.job_id, entry_id)
        elif reserved:
            await self.places.release(calls[0].owner, reserved)
        return appended

    async def _together(self, calls: Sequence[ScriptCall]) -> list[Appended]:
        calls = await self._with_entries(calls)
        pruned = False
        reloads = rounds = 0
        while True:
            async with self.transaction(self.keys.job(calls[0].job_id)) as pipe:
                for call in calls:
                    keys, args = self.lay_out(call)
                    await self._append(keys=keys, args=args, client=pipe)
                try:
                    replies = await pipe.execute()
                except NoScriptError:
                    reloads += 1
                    if reloads == SCRIPT_RELOADS:
                        raise
                    continue
            needs = [keys_needed(reply) for reply in replies]
            if any(need is not None for need in needs):
                # Not expected (see _with_entries); the creates applied answer by their marks.
                rounds += 1
                if rounds == KEY_ROUNDS:
                    raise RuntimeError("a batch's keys kept changing")
                calls = [
                    call if need is None else replace(call, batch=need[0], entry=need[1])
                    for call, need in zip(calls, needs, strict=True)
                ]
                continue
            appended = [appended_from(reply) for reply in replies]
            limited = {
                c.owner for c, a in zip(calls, appended, strict=True) if a.refused == "limit"
            }
            if limited and not pruned:
                pruned = True
                if sum([await self.drop_expired_unfinished(owner) for owner in limited]):
                    continue
            return appended

    async def _with_entries(self, calls: Sequence[ScriptCall]) -> list[ScriptCall]:
        """The creates that end their job at once (cached results) with the queue entry their
        parent waits with, if any, read in one round trip: in a ``MULTI`` a create cannot be
        called again alone with it. The parent is the job creating its children (or a batch
        created in the same ``MULTI``, which never waits), so the entry does not change before
        the ``MULTI`` runs."""
        batches = sorted({c.batch for c in calls if c.terminal and c.batch is not None})
        if not batches:
            return list(calls)
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch in batches:
                pipe.hget(self.keys.batch_counts(batch), "#entry")
            entries = dict(zip(batches, await pipe.execute(), strict=True))
        return [
            replace(call, entry=entries[call.batch])
            if call.terminal and call.batch is not None
            else call
            for call in calls
        ]

    def _create_call(
        self,
        record: JobRecord,
        events: Sequence[Mapping[str, Any]],
        then: Sequence[Command],
        take: int,
        requires: str | None,
    ) -> ScriptCall:
        score, ttl = self._placement(record)
        return self.script_call(
            record.id,
            events,
            _create_fields(record),
            record.owner,
            "create",
            (),
            [*then, *self._subject_index(record, score, ttl)],
            take=take,
            ttl=ttl,
            score=score,
            requires=requires,
            # A cached result ends its job at its create, counted into its batch at once.
            batch=record.counted_into,
        )

    def _placement(self, record: JobRecord) -> tuple[float, int]:
        """A new job's score in the indexes (microseconds) and its record's time to live.

        A scheduled job is scored by its ``run_at`` and lives until then plus the retention
        (its worker's appends keep it from there, as any job's): created longer than the
        retention before its time, it is neither lost nor trimmed from the listings.
        """
        now = time.time()
        retention = self.settings.retention_seconds
        if record.run_at is None:
            return now * 1_000_000, retention
        due = datetime.fromisoformat(record.run_at).timestamp()
        return due * 1_000_000, retention + max(0, math.ceil(due - now))

    def _subject_index(self, record: JobRecord, score: float, ttl: int) -> list[Command]:
        """The create's additions to its subject's index (``GET /api/jobs?subject=``): the
        entry, the end of entries past the retention, and the index's own expiry (never
        shortened: an entry of a scheduled job may need it longer than the newest)."""
        if record.subject is None:
            return []
        key = [self.keys.subject_jobs(record.subject)]
        horizon = (time.time() - self.settings.retention_seconds) * 1_000_000
        return [
            Command("ZADD", key, (f"{score:.0f}", record.id)),
            Command("ZREMRANGEBYSCORE", key, (0, f"{horizon:.0f}")),
            Command("EXPIRE", key, (ttl, "NX")),
            Command("EXPIRE", key, (ttl, "GT")),
        ]

    async def request_cancel(self, job_id: str) -> None:
        await self.redis.set(self.keys.job_cancel(job_id), "1", ex=self.settings.retention_seconds)

    async def clear_cancel(self, job_id: str) -> None:
        await self.redis.delete(self.keys.job_cancel(job_id))

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.job_cancel(job_id)))

    # -- reads ----------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord | None:
        return (await self.get_many([job_id]))[0]

    async def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """The records, each with its running step's text so far (tasks/output.py): read in
        one MULTI, so the text is the one the record's ``last_event_id`` has."""
        # A cluster has no MULTI: there the text may be a step newer than the record.
        async with self.redis.pipeline(transaction=not self.cluster) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.keys.job(job_id))
                pipe.get(self.keys.job_text(job_id))
            replies = await pipe.execute()
        return [
            with_live_text(decode_record(raw), text)
            for raw, text in zip(replies[::2], replies[1::2], strict=True)
        ]

    async def read_events(self, job_id: str, after: str, count: int) -> list[tuple[str, str]]:
        """Up to ``count`` events of one job after ``after`` as (id, event json)."""
        rows = await self.redis.xrange(
            self.keys.job_events(job_id), min=f"({after}", max="+", count=count
        )
        return [(entry_id, fields["e"]) for entry_id, fields in rows]

    async def read_firehose(
        self, after: str, count: int, owner: str | None = None, subject: str | None = None
    ) -> tuple[list[tuple[str, str, str]], str, bool]:
        """A page of firehose entries after ``after``: (rows, last id read, whether more follow).

        Rows are (id, job event id, event json). With ``owner`` (``subject``) only that owner's
        (subject's) entries are returned, so a page may be short, or empty, and still not be
        the last.
        """
        if self.cluster:
            rows, last, more = await partitioned_firehose.read(self.redis, self.keys, after, count)
        else:
            rows = await self.redis.xrange(
                self.keys.firehose, min=f"({after}", max="+", count=count
            )
            last = rows[-1][0] if rows else after
            more = len(rows) == count
        owner_json = json.dumps(owner) if owner is not None else None
        subject_json = json.dumps(subject) if subject is not None else None
        page = [
            (entry_id, fields["i"], fields["e"])
            for entry_id, fields in rows
            if (owner_json is None or fields.get("o") == owner_json)
            and (subject_json is None or fields.get("s") == subject_json)
        ]
        return page, last, more

    async def firehose_head(self) -> str:
        """The firehose's cursor at its newest entry: where a fresh viewer starts."""
        if not self.cluster:
            info = await self.stream_info(self.keys.firehose)
            return info.last_id if info else "0"
        return await partitioned_firehose.head(self.redis, self.keys)

    def firehose_position(self, cursor: str) -> list[StreamId]:
        """A firehose cursor as one position per partition of the log plane (one on one
        server); a ``ValueError`` naming what is wrong with it."""
        if not self.cluster:
            return [StreamId.parse(cursor)]
        return [StreamId.parse(i) for i in partitioned_firehose.cursor(cursor, self.partitions)]

    @property
    def partitions(self) -> int:
        return max(1, self.keys.partitions)

    async def firehose_trimmed(self, position: Sequence[StreamId]) -> list[int]:
        """The partitions whose firehose no longer holds every entry after ``position``."""
        views = self.keys.every_partition()
        infos = await asyncio.gather(*(self.stream_info(v.firehose) for v in views))
        return [
            p
            for p, (info, at) in enumerate(zip(infos, position, strict=True))
            if info is not None and info.trimmed_after(at)
        ]

    async def stream_info(self, key: str) -> StreamInfo | None:
        try:
            info = await self.redis.xinfo_stream(key)
        except ResponseError as error:
            if not _no_such_key(error):
                raise
            return None
        return _stream_info(info)

    async def resume(
        self, job_id: str, after: str, count: int
    ) -> tuple[StreamInfo | None, list[tuple[str, str]]]:
        """The job's log's trim state and up to ``count`` events after ``after``, in one round
        trip (a stream resuming from a cursor needs both)."""
        key = self.keys.job_events(job_id)
        try:
            # Errors raised, not returned: a cluster pipeline retries a connection error (a
            # primary's death, until its replica takes over) only when it raises it.
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xinfo_stream(key)
                pipe.xrange(key, min=f"({after}", max="+", count=count)
                info, rows = await pipe.execute()
        except ResponseError as error:
            if _no_such_key(error):
                return None, []  # no log: XRANGE of a missing key has nothing either
            raise
        return _stream_info(info), [(entry_id, fields["e"]) for entry_id, fields in rows]

    async def list_jobs(
        self,
        *,
        states: frozenset[JobState] | None,
        task: str | None,
        limit: int,
        owner: str | None = None,
        subject: str | None = None,
        cursor: tuple[float, str] | None,
    ) -> tuple[list[JobRecord], tuple[float, str] | None]:
        """Newest first. The cursor is the (score, id) of the last job of the previous page.

        With ``subject`` the subject's own index is read instead of every job's.
        """
        found: list[JobRecord] = []
        max_score: float | str = "+inf" if cursor is None else cursor[0]
        skip_until = cursor
        scanned = 0
        batch = max(limit * 2, 50)
        # Filters are applied while scanning; a bounded scan keeps one request cheap even when
        # few jobs match, and the cursor lets the caller go on from where it stopped.
        while scanned < 5_000:
            rows = await self._index_rows(subject, max_score, batch)
            if skip_until is not None:
                score, last_id = skip_until
                # Equal scores come in descending member order: drop what the last page had.
                rows = [r for r in rows if r[1] < score or (r[1] == score and r[0] < last_id)]
            if not rows:
                return found, None
            records = await self.get_many([job_id for job_id, _ in rows])
            for (job_id, score), record in zip(rows, records, strict=True):
                skip_until = (score, job_id)
                scanned += 1
                if record is None:
                    continue
                if states is not None and record.state not in states:
                    continue
                if task is not None and record.task != task:
                    continue
                if owner is not None and record.owner != owner:
                    continue
                if subject is not None and record.subject != subject:
                    continue
                found.append(record)
                if len(found) == limit:
                    return found, skip_until
            if skip_until is None:
                break
            max_score = skip_until[0]
        return found, skip_until

    async def _index_rows(
        self, subject: str | None, max_score: float | str, count: int
    ) -> list[tuple[str, float]]:
        """The newest ``count`` entries of the job index (or a subject's) scored at most
        ``max_score``: on a cluster, each partition's newest ``count`` merged (one pipeline,
        one command per partition), which are the index's newest ``count`` too."""
        parts = self.keys.every_partition()
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in parts:
                index = part.jobs if subject is None else part.subject_jobs(subject)
                pipe.zrevrangebyscore(index, max_score, "-inf", start=0, num=count, withscores=True)
            pages: list[list[tuple[str, float]]] = await pipe.execute()
        if len(pages) == 1:
            return pages[0]
        merged = heapq.merge(*pages, key=lambda row: (row[1], row[0]), reverse=True)
        return list(merged)[:count]

    async def child_ids(self, parent_id: str) -> list[str]:
        """Every child id of a job (or a batch), in the order they were started."""
        ids: list[str] = await self.redis.lrange(  # type: ignore[misc]
            self.keys.batch_children(parent_id), 0, -1
        )
        return ids

    async def list_children(
        self,
        parent_id: str,
        *,
        states: frozenset[JobState] | None,
        task: str | None,
        limit: int,
        owner: str | None = None,
        offset: int = 0,
    ) -> tuple[list[JobRecord], int | None]:
        """A job's (or a batch's) children in the order they were started, from ``offset``;
        the offset of the next page, or None after the last."""
        key = self.keys.batch_children(parent_id)
        found: list[JobRecord] = []
        while len(found) < limit:
            ids: list[str] = await self.redis.lrange(  # type: ignore[misc]
                key, offset, offset + max(limit, 50) - 1
            )
            if not ids:
                return found, None
            for record in await self.get_many(ids):
                offset += 1
                if record is None or (owner is not None and record.owner != owner):
                    continue
                if (states is not None and record.state not in states) or (
                    task is not None and record.task != task
                ):
                    continue
                found.append(record)
                if len(found) == limit:
                    break
        more = await self.redis.llen(key) > offset  # type: ignore[misc]
        return found, offset if more else None


def _state_list(states: Iterable[str]) -> str:
    """States as the append script matches them: ``,"queued","running",`` ("" for none)."""
    text = "".join(f',"{state}"' for state in states)
    return text + "," if text else ""


def _create_fields(record: JobRecord) -> dict[str, Any]:
    fields = record.model_dump(mode="json", exclude={"last_event_id"})
    if record.callback_url is not None:  # kept in the record, left out of every dump
        fields["callback_url"] = record.callback_url
    if record.trace is not None:  # the same: tasks/tracing.py
        fields["trace"] = record.trace
    return fields


def keys_needed(reply: Sequence[str]) -> tuple[str | None, str | None] | None:
    """The batch and queue entry a ``"keys"`` refusal asks to be declared (None: none), or
    None for any other reply."""
    if reply[0] != "" or reply[1] != "keys":
        return None
    return reply[2] or None, reply[3] or None


def appended_from(reply: Sequence[str]) -> Appended:
    """The append script's reply as an ``Appended``."""
    jid, second, *rest = reply
    if jid == "":
        held = int(rest[0]) if second == "limit" else None
        submitted = int(rest[0]) if second == "rate" else None
        return Appended(None, None, refused=second, unfinished=held, submitted=submitted)
    return Appended(jid, second)


def decode_record(raw: Mapping[str, str]) -> JobRecord | None:
    if not raw:
        return None
    return JobRecord.model_validate({name: json.loads(value) for name, value in raw.items()})


def new_event(job_id: str, type_: str, attempt: int, **data: Any) -> dict[str, Any]:
    return {"job_id": job_id, "type": type_, "at": utcnow(), "attempt": attempt, **data}
