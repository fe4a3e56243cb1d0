"""The job store and event log in Redis.

Every event goes through ONE atomic append (a Lua script): it adds the event to the job's stream
and to the firehose, updates the record, refreshes the expiry and publishes the stored event, so
the record and the log can never disagree. A precondition on the record's state makes the append
a compare-and-set, which is how the web process and a worker race safely over a queued job.
The same script takes several events of one job at once (``append_many``): a burst of progress
costs one round trip and one precondition check instead of one per event. It also checks and
takes an owner's unfinished-jobs places (``STEPSTREAM_MAX_UNFINISHED_PER_OWNER``) with the write
they admit, so concurrent submissions can never share the last place, and it counts the state
transition it writes (tasks/transitions.py) and a batch child's end into its batch, so no path
can write a transition without counting it.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, ResponseError

from stepstream._stream_id import StreamId
from stepstream.tasks import transitions
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import JobRecord, JobState, utcnow
from stepstream.tasks.output import with_live_text
from stepstream.tasks.settings import Settings

# A parent waiting for its children (tasks/children.py) leaves its arq queue entry in its counts
# hash (``#resume``: arq's payload in hex, as the hash is read as text; and where it goes). The
# end that makes it ready writes it: every child has ended, or more have failed (or been
# cancelled) than the parent tolerates. Taken with HDEL, so it is written once. ``counts`` is
# the counts key.
RESUME_LUA = """
local r = redis.call('HMGET', counts, '#resume', '#entry', '#job_key', '#queue', '#wakeups',
  '#expire_ms', '#size', '#done', '#failed', '#cancelled', '#max_failures')
if r[1] and (tonumber(r[8] or 0) >= tonumber(r[7] or 0)
    or (r[11] and tonumber(r[9] or 0) + tonumber(r[10] or 0) > tonumber(r[11]))) then
  redis.call('HDEL', counts, '#resume')
  local now = redis.call('TIME')
  local payload = string.gsub(r[1], '..', function(h) return string.char(tonumber(h, 16)) end)
  redis.call('PSETEX', r[3], r[6], payload)
  redis.call('ZADD', r[4], now[1] * 1000 + math.floor(now[2] / 1000), r[2])
  redis.call('PUBLISH', r[5], r[2])
end
"""

# KEYS: record, job stream, firehose, cancel flag, job index, the owner's unfinished jobs,
#       webhook outbox, webhook events dropped, then for each transition this append makes
#       (tasks/transitions.py) its counter and its window's counter, and optionally a record
#       that must exist (a batch's parent, for its children: created in the same MULTI only if
#       it was admitted)
# ARGV: number of events (k), job maxlen, firehose maxlen, job channel, ttl, mode, expected states,
#       owner json, job id, score (in the job index on a create, in the unfinished set; now
#       unless a scheduled job's run_at), number of field arguments (2f), the
#       deployment webhook's states, outbox maxlen, the owner's unfinished-jobs limit, the
#       places this append takes under it (0: no check), the retention horizon (a score: now
#       minus the retention, in microseconds), what comes before and after an id in a record's
#       key, the number of transitions (c), a window counter's ttl, what comes before a
#       batch's id in its counts and ended keys and after it in each, the firehose channel,
#       then k event jsons, then f field/value pairs for the record, then commands to run with
#       the append, each as its argument count followed by its arguments.
# mode: "create" (the record must not exist), "update" (it must), "update+cancel" (and no
# cancel was requested). Expected states and the webhook's states are ",<json state>,...," or
# "" (any state / none). Refusals write nothing and answer {"", why}: the record's state,
# "exists", "missing", "cancel", "orphan" (the required record is missing), or
# {"", "limit", unfinished} when the places asked for do not fit under the limit.
# A terminal state adds one outbox entry per webhook that wants it (the record's callback_url,
# the deployment webhook): {job, event (this append's last event id), target, record (the
# record as JSON, as it is now)}. In the same script, so a process dying after the append
# cannot lose the delivery (tasks/outbox.py delivers it). A full outbox (outbox maxlen
# entries, all undelivered) takes no more: the drop is counted, and a worker logs it.
# The transitions are counted by the record's task once every precondition has passed, so a
# refused append counts nothing; and a batch's child that ends is counted into its batch
# (tasks/batches.py) in the same call that writes its end, so no end can be lost to its batch.
_APPEND_LUA = """
local first_field = 25 + tonumber(ARGV[1])
local last_field = first_field + tonumber(ARGV[11]) - 1
-- The call's mark (a random token among the fields, stored on the record): a call whose reply
-- was lost with its connection is sent again by the client, and finds its own mark. It answers
-- as the first did instead of appending its events twice. A create keeps its mark apart too
-- (create_op): a worker's appends replace append_op, and a create sent again after them (a
-- batch's MULTI, re-sent after a Valkey restart) must still find its own.
local create_op
for i = first_field, last_field - 1, 2 do
  if ARGV[i] == 'append_op' then
    local mark = ARGV[6] == 'create' and 'create_op' or 'append_op'
    if redis.call('HGET', KEYS[1], mark) == ARGV[i + 1] then
      local last = redis.call('HGET', KEYS[1], 'last_event_id')
      return {string.sub(last, 2, -2), ''}
    end
    if ARGV[6] == 'create' then create_op = ARGV[i + 1] end
    break
  end
end
local state = redis.call('HGET', KEYS[1], 'state')
local mode = ARGV[6]
if mode == 'create' then
  if state then return {'', 'exists'} end
else
  if not state then return {'', 'missing'} end
  if ARGV[7] ~= '' and not string.find(ARGV[7], ',' .. state .. ',', 1, true) then
    return {'', state}
  end
  if mode == 'update+cancel' and redis.call('EXISTS', KEYS[4]) == 1 then
    return {'', 'cancel'}
  end
end
local required = KEYS[9 + 2 * tonumber(ARGV[19])]
if required and redis.call('EXISTS', required) == 0 then return {'', 'orphan'} end
-- Counted and taken in the script that writes what they admit: nothing comes between. Ids
-- whose record has expired hold no place; they are dropped when they would refuse, so a lost
-- record can never lock its owner out. A record lives at least the retention past its id's
-- score (the time it was added, or a scheduled job's run_at), so only ids older than that are
-- looked at: a refusal costs nothing like a scan of every unfinished job.
local take = tonumber(ARGV[15])
if take > 0 then
  local limit = tonumber(ARGV[14])
  local held = redis.call('ZCARD', KEYS[6])
  if held + take > limit then
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', ARGV[16])) do
      if redis.call('EXISTS', ARGV[17] .. id .. ARGV[18]) == 0 then
        redis.call('ZREM', KEYS[6], id)
        held = held - 1
      end
    end
    if held + take > limit then return {'', 'limit', held} end
  end
end
local ttl = tonumber(ARGV[5])
-- The job's subject (JSON), from the fields being written (create) or the record, so that
-- firehose entries and wake-ups carry it like the owner: the firehose filters on both.
local subject = false
if mode == 'create' then
  for i = first_field, last_field - 1, 2 do
    if ARGV[i] == 'subject' then subject = ARGV[i + 1] end
  end
else
  subject = redis.call('HGET', KEYS[1], 'subject')
end
if subject == 'null' then subject = false end
local jid, fid
local terminal
for e = 25, first_field - 1 do
  jid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[e])
  if subject then
    fid = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*',
      'i', jid, 'o', ARGV[8], 's', subject, 'e', ARGV[e])
  else
    fid = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*',
      'i', jid, 'o', ARGV[8], 'e', ARGV[e])
  end
  -- On the job's channel for its viewers, and on the firehose's for the firehose's: a web
  -- process subscribes to each only while it has such viewers (server/hub.py), and a PUBLISH
  -- that no one hears costs Valkey little.
  local message = '{"job_event_id":"' .. jid .. '","firehose_id":"' .. fid ..
    '","owner":' .. ARGV[8] .. (subject and (',"subject":' .. subject) or '') ..
    ',"event":' .. ARGV[e] .. '}'
  redis.call('PUBLISH', ARGV[4], message)
  redis.call('PUBLISH', ARGV[24], message)
end
for i = first_field, last_field - 1, 2 do
  if ARGV[i] == 'state' then
    local new_state = ARGV[i + 1]
    if new_state == '"queued"' or new_state == '"scheduled"' then
      redis.call('ZADD', KEYS[6], ARGV[10], ARGV[9])
    elseif new_state == '"completed"' or new_state == '"failed"' or new_state == '"cancelled"' then
      redis.call('ZREM', KEYS[6], ARGV[9])
      terminal = new_state
    end
  end
end
if last_field >= first_field then
  redis.call('HSET', KEYS[1], unpack(ARGV, first_field, last_field))
end
if mode == 'create' then
  redis.call('ZADD', KEYS[5], ARGV[10], ARGV[9])
  if create_op then redis.call('HSET', KEYS[1], 'create_op', create_op) end
end
redis.call('HSET', KEYS[1], 'last_event_id', '"' .. jid .. '"')
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
if terminal then
  local targets = {}
  local callback = redis.call('HGET', KEYS[1], 'callback_url')
  if callback and callback ~= 'null' then targets[#targets + 1] = 'callback' end
  if string.find(ARGV[12], ',' .. terminal .. ',', 1, true) then
    targets[#targets + 1] = 'deployment'
  end
  if #targets > 0 then
    -- Every value in the hash is JSON already, every name a field name.
    local flat = redis.call('HGETALL', KEYS[1])
    local parts = {}
    for f = 1, #flat, 2 do parts[#parts + 1] = '"' .. flat[f] .. '":' .. flat[f + 1] end
    local record = '{' .. table.concat(parts, ',') .. '}'
    for _, target in ipairs(targets) do
      if redis.call('XLEN', KEYS[7]) < tonumber(ARGV[13]) then
        redis.call('XADD', KEYS[7], '*',
          'job', ARGV[9], 'event', jid, 'target', target, 'record', record)
      else
        redis.call('INCR', KEYS[8])
      end
    end
  end
end
local counted = tonumber(ARGV[19])
local task = counted > 0 and redis.call('HGET', KEYS[1], 'task')
if task then
  task = cjson.decode(task)
  for c = 9, 8 + 2 * counted, 2 do
    redis.call('HINCRBY', KEYS[c], task, 1)
    redis.call('HINCRBY', KEYS[c + 1], task, 1)
    redis.call('EXPIRE', KEYS[c + 1], ARGV[20])
  end
end
if terminal then
  local batch = redis.call('HGET', KEYS[1], 'batch_id')
  if not batch or batch == 'null' then
    -- A child of a job's map or spawn (tasks/children.py) is counted into its parent the same
    -- way, in the same keys.
    batch = redis.call('HGET', KEYS[1], 'parent')
  end
  if batch and batch ~= 'null' then
    -- Each child counted once, by its outcome: ended again (retried by hand, then ended), it
    -- moves from the one to the other. The ended list keeps the order the parent shows them in.
    batch = cjson.decode(batch)
    local counts = ARGV[21] .. batch .. ARGV[22]
    local ended = ARGV[21] .. batch .. ARGV[23]
    local outcome = string.sub(terminal, 2, -2)
    local prev = redis.call('HGET', counts, ARGV[9])
    if prev ~= outcome then
      if prev then
        redis.call('HINCRBY', counts, '#' .. prev, -1)
      else
        redis.call('HINCRBY', counts, '#done', 1)
        -- What the child spent, summed for its parent (a child of a job: tasks/rollup.py).
        local cost = tonumber(redis.call('HGET', KEYS[1], 'cost') or '0') or 0
        if cost > 0 then redis.call('HINCRBYFLOAT', counts, '#cost', cost) end
        local usage = redis.call('HGET', KEYS[1], 'usage')
        if usage then
          usage = cjson.decode(usage)
          for _, name in ipairs({'calls', 'input_tokens', 'output_tokens'}) do
            local n = tonumber(usage[name]) or 0
            if n > 0 then redis.call('HINCRBY', counts, '#' .. name, n) end
          end
        end
      end
      redis.call('HSET', counts, ARGV[9], outcome)
      redis.call('HINCRBY', counts, '#' .. outcome, 1)
      redis.call('RPUSH', ended, ARGV[9] .. ' ' .. outcome .. ' ' .. (prev or ''))
    end
    redis.call('EXPIRE', counts, ttl)
    redis.call('EXPIRE', ended, ttl)
    __RESUME__
  end
end
local i = last_field + 1
while i <= #ARGV do
  local argc = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + argc))
  i = i + argc + 1
end
return {jid, fid}
""".replace("__RESUME__", RESUME_LUA.strip().replace("\n", "\n    "))


@dataclass(frozen=True)
class Appended:
    """The outcome of an append: the ids it got, or why the precondition refused it."""

    job_event_id: str | None
    firehose_id: str | None
    # the record's state (JSON), "exists", "missing", "cancel", "orphan" or "limit"
    refused: str | None = None
    unfinished: int | None = None  # "limit": the owner's unfinished jobs, which left no room

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


def _stream_info(info: dict[str, Any]) -> StreamInfo:
    first = info.get("first-entry")
    return StreamInfo(
        last_id=info["last-generated-id"],
        first_id=first[0] if first else None,
        max_deleted_id=info.get("max-deleted-entry-id", "0-0"),
        length=info["length"],
        entries_added=info.get("entries-added", info["length"]),
    )


# Valkey restarts one transaction outlives before its error surfaces (create_together).
SCRIPT_RELOADS = 5
# One call of the append script: its keys and its arguments.
ScriptCall = tuple[list[str], list[Any]]


class JobStore:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self._append = redis.register_script(_APPEND_LUA)
        self._index_trimmed_at = 0.0
        self._webhook_states = _state_list(sorted(settings.webhook_states))

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
        then: Sequence[Sequence[str | bytes | int]] = (),
        take: int = 0,
        ttl: int | None = None,
    ) -> Appended:
        """Append one event and apply ``fields`` to the record, atomically.

        ``then``: Redis commands to run in the same script when the append succeeds (and only
        then), such as the arq enqueue of a job just created. ``take``: places of the owner's
        unfinished-jobs limit this append needs free (refused as ``"limit"`` otherwise; the
        append itself fills one if it makes the job scheduled or queued). ``ttl``: how long the
        record and its log live after this append (the retention by default).
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
        then: Sequence[Sequence[str | bytes | int]] = (),
        take: int = 0,
        ttl: int | None = None,
    ) -> Appended:
        """Append ``events`` of one job in order and apply ``fields``, all or none.

        The precondition is checked once, before the first event; the ids returned are the
        last event's.
        """
        keys, args = self._script_call(
            job_id, events, fields, owner, mode, expect, then, take=take, ttl=ttl
        )
        return appended_from(await self._append(keys=keys, args=args))

    async def queue_append(
        self,
        pipe: Pipeline,
        job_id: str,
        events: Sequence[Mapping[str, Any]],
        fields: Mapping[str, Any],
        *,
        owner: str | None = None,
        expect: Sequence[JobState] = (),
        then: Sequence[Sequence[str | bytes | int]] = (),
    ) -> None:
        """``append_many`` queued on ``pipe``: in a ``MULTI`` after a ``WATCH``, an append that
        happens only if what the caller read is still so (read the outcome with
        ``appended_from``)."""
        keys, args = self._script_call(job_id, events, fields, owner, "update", expect, then)
        await self._append(keys=keys, args=args, client=pipe)

    def _script_call(
        self,
        job_id: str,
        events: Sequence[Mapping[str, Any]],
        fields: Mapping[str, Any],
        owner: str | None,
        mode: str,
        expect: Sequence[JobState],
        then: Sequence[Sequence[str | bytes | int]],
        *,
        take: int = 0,
        ttl: int | None = None,
        score: float | None = None,
        requires: str | None = None,
    ) -> ScriptCall:
        if not events:
            raise ValueError("an append needs at least one event")
        state = fields.get("state")
        counted = transitions.made(mode, None if state is None else str(state))
        # The script's guard against a retried call applying twice (see _APPEND_LUA).
        fields = {**fields, "append_op": secrets.token_hex(8)}
        head, tail = self.keys.job_parts
        now = time.time()
        window = transitions.window_start(now)
        args: list[Any] = [
            len(events),
            self.settings.job_log_maxlen,
            self.settings.firehose_maxlen,
            self.keys.job_channel(job_id),
            self.settings.retention_seconds if ttl is None else ttl,
            mode,
            _state_list(s.value for s in expect),
            json.dumps(owner),
            job_id,
            f"{now * 1_000_000 if score is None else score:.0f}",
            2 * len(fields),
            self._webhook_states,
            self.settings.webhook_outbox_maxlen,
            self.settings.max_unfinished_per_owner,
            take,
            f"{(now - self.settings.retention_seconds) * 1_000_000:.0f}",
            head,
            tail,
            len(counted),
            transitions.WINDOW_TTL,
            *self.keys.batch_parts,
            self.keys.firehose_channel,
        ]
        args.extend(json.dumps(event, separators=(",", ":")) for event in events)
        for name, value in fields.items():
            args.append(name)
            args.append(json.dumps(value, separators=(",", ":")))
        for command in then:
            args.append(len(command))
            args.extend(command)
        keys = [
            self.keys.job(job_id),
            self.keys.job_events(job_id),
            self.keys.firehose,
            self.keys.job_cancel(job_id),
            self.keys.jobs,
            self.keys.owner_unfinished(owner),
            self.keys.webhook_outbox,
            self.keys.webhooks_dropped,
        ]
        for name in counted:
            keys.append(self.keys.transitions(name))
            keys.append(self.keys.transitions_window(name, window))
        if requires is not None:
            keys.append(self.keys.job(requires))
        return keys, args

    async def create(
        self,
        record: JobRecord,
        *events: Mapping[str, Any],
        then: Sequence[Sequence[str | bytes | int]] = (),
        take: int = 0,
    ) -> Appended:
        """Create ``record`` with its first events, in order. ``take``: see ``append``; a
        submission takes one place, a batch's parent one per child (it is never queued itself).
        """
        keys, args = self._create_call(record, events, then, take, None)
        appended = appended_from(await self._append(keys=keys, args=args))
        now = time.time()
        if appended.ok and now - self._index_trimmed_at >= 1.0:
            # Index entries scored before the retention point at expired jobs. Trimming once a
            # second per process, not on every submit, saves a round trip per submission.
            self._index_trimmed_at = now
            horizon = (now - self.settings.retention_seconds) * 1_000_000
            await self.redis.zremrangebyscore(self.keys.jobs, 0, horizon)
        return appended

    def create_call(
        self,
        record: JobRecord,
        *events: Mapping[str, Any],
        then: Sequence[Sequence[str | bytes | int]] = (),
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
        ``_APPEND_LUA``) make a transaction that had in fact been applied answer as it did.
        """
        for attempt in range(1, SCRIPT_RELOADS + 1):
            async with self.redis.pipeline(transaction=True) as pipe:
                for keys, args in calls:
                    await self._append(keys=keys, args=args, client=pipe)
                try:
                    return [appended_from(reply) for reply in await pipe.execute()]
                except NoScriptError:
                    if attempt == SCRIPT_RELOADS:
                        raise
        raise AssertionError("unreachable")

    def _create_call(
        self,
        record: JobRecord,
        events: Sequence[Mapping[str, Any]],
        then: Sequence[Sequence[str | bytes | int]],
        take: int,
        requires: str | None,
    ) -> ScriptCall:
        score, ttl = self._placement(record)
        return self._script_call(
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

    def _subject_index(
        self, record: JobRecord, score: float, ttl: int
    ) -> list[list[str | bytes | int]]:
        """The create's additions to its subject's index (``GET /api/jobs?subject=``): the
        entry, the end of entries past the retention, and the index's own expiry (never
        shortened: an entry of a scheduled job may need it longer than the newest)."""
        if record.subject is None:
            return []
        key = self.keys.subject_jobs(record.subject)
        horizon = (time.time() - self.settings.retention_seconds) * 1_000_000
        return [
            ["ZADD", key, f"{score:.0f}", record.id],
            ["ZREMRANGEBYSCORE", key, 0, f"{horizon:.0f}"],
            ["EXPIRE", key, ttl, "NX"],
            ["EXPIRE", key, ttl, "GT"],
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
        async with self.redis.pipeline(transaction=True) as pipe:
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
        rows = await self.redis.xrange(self.keys.firehose, min=f"({after}", max="+", count=count)
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

    async def stream_info(self, key: str) -> StreamInfo | None:
        try:
            info = await self.redis.xinfo_stream(key)
        except ResponseError:
            return None  # no such stream
        return _stream_info(info)

    async def resume(
        self, job_id: str, after: str, count: int
    ) -> tuple[StreamInfo | None, list[tuple[str, str]]]:
        """The job's log's trim state and up to ``count`` events after ``after``, in one round
        trip (a stream resuming from a cursor needs both)."""
        key = self.keys.job_events(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xinfo_stream(key)
            pipe.xrange(key, min=f"({after}", max="+", count=count)
            info, rows = await pipe.execute(raise_on_error=False)
        if isinstance(rows, Exception):
            raise rows
        if isinstance(info, ResponseError):
            return None, []  # no such stream
        if isinstance(info, Exception):
            raise info
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
        index = self.keys.jobs if subject is None else self.keys.subject_jobs(subject)
        found: list[JobRecord] = []
        max_score: float | str = "+inf" if cursor is None else cursor[0]
        skip_until = cursor
        scanned = 0
        batch = max(limit * 2, 50)
        # Filters are applied while scanning; a bounded scan keeps one request cheap even when
        # few jobs match, and the cursor lets the caller go on from where it stopped.
        while scanned < 5_000:
            rows = await self.redis.zrevrangebyscore(
                index, max_score, "-inf", start=0, num=batch, withscores=True
            )
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


def appended_from(reply: Sequence[str]) -> Appended:
    """The append script's reply as an ``Appended``."""
    jid, second, *rest = reply
    if jid == "":
        return Appended(None, None, refused=second, unfinished=int(rest[0]) if rest else None)
    return Appended(jid, second)


def decode_record(raw: Mapping[str, str]) -> JobRecord | None:
    if not raw:
        return None
    return JobRecord.model_validate({name: json.loads(value) for name, value in raw.items()})


def new_event(job_id: str, type_: str, attempt: int, **data: Any) -> dict[str, Any]:
    return {"job_id": job_id, "type": type_, "at": utcnow(), "attempt": attempt, **data}
