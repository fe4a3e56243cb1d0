"""The webhook outbox: every worker delivers the terminal events the append script put there.

When a job reaches a terminal state, the one atomic append (tasks/store.py) adds an entry to
the outbox stream (``Keys.webhook_outbox``) for each webhook that wants it: the job's
``callback_url``, the deployment's ``STEPSTREAM_WEBHOOK_URL``. The entry holds the record as it
was then, so what is delivered is the final record even if the job is retried by hand later.
Nothing about a delivery lives only in a process's memory:

- Workers read new entries as one consumer group (``XREADGROUP``): each entry goes to one
  worker, and stays in the group's pending list until it is acknowledged.
- An entry is acknowledged and deleted after a 2xx, after an answer that says retrying is
  useless (a 4xx other than 408/425/429, a redirect), or after its last
  attempt. Until then it stays pending, and the pending list *is* the retry schedule: its
  delivery counter is the number of attempts begun, its idle time the time since the last one
  began. Any worker claims an entry (``XCLAIM`` with that idle time as the minimum, so one
  claim wins) once it has been idle for the attempt timeout plus the backoff
  (``backoff * 2 ** (attempts - 1)``, capped, with a jitter fixed per entry and attempt). So a
  worker that is killed mid-delivery, or that stops, loses nothing: another worker takes its
  pending entries over when their time comes. (``XAUTOCLAIM`` takes one idle time for all
  entries; each of ours has its own, hence ``XPENDING`` + ``XCLAIM``.)
- Deliveries run in the worker's event loop beside the jobs, never in a job slot, at most
  ``STEPSTREAM_WEBHOOK_CONCURRENCY`` at a time per worker; a worker with no room reads no more.

A delivery this worker's settings refuse (its allow-list refuses the address, it has no
``STEPSTREAM_WEBHOOK_URL`` or no secret while other processes sign) is never dropped: it is
*held*. The entry is claimed to the ``held`` consumer, out of every retry schedule, with its
attempt counter unchanged, and its reason is recorded (``Keys.webhooks_held``: shown by
``/readyz`` and ``stepstream doctor``, and logged once). Every worker looks at held entries on
each sweep and takes one its own settings allow (one ``XCLAIM`` wins), so a worker restarted
with the right settings delivers it, once. Held entries stay in the outbox, so they count
against its maxlen, and one held longer than ``STEPSTREAM_RETENTION_SECONDS`` is given up.

Delivery is at least once: a worker that dies after the receiver answered but before the
acknowledgement, or a receiver slower than the timeout, means the event comes again, with the
same event ``id`` (tasks/webhooks.py). Events are not delivered in order.

Bounds: the outbox holds at most ``STEPSTREAM_WEBHOOK_OUTBOX_MAXLEN`` undelivered events; when
it is full the append script adds no more, counts each one it could not add, and a worker logs
the count. Attempts: ``STEPSTREAM_WEBHOOK_ATTEMPTS``, then the entry is given up and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from stepstream._backoff import Backoff
from stepstream._stream_id import StreamId
from stepstream.tasks import lua, webhooks
from stepstream.tasks.destinations import Policy, Refused, Unresolvable
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import JobRecord
from stepstream.tasks.settings import Settings

logger = logging.getLogger("stepstream.webhooks")

GROUP_POLL_SECONDS = 0.5  # until the first webhook event of a deployment creates the outbox
SWEEP_PAGE = 100
SWEEP_SCAN = 1_000  # pending entries looked at per sweep
# A consumer (a worker, by its id) with nothing pending and silent this long is removed from
# the group, so stopped workers do not pile up in it.
STALE_CONSUMER_MS = 3_600_000
CONSUMER_CLEANUP_SECONDS = 60.0
# A worker whose settings refused a held entry looks at it again after this long (a host's DNS
# may change; its settings do not while it runs).
HOLD_RECHECK_SECONDS = 60.0
HELD_TOO_LONG = "held longer than STEPSTREAM_RETENTION_SECONDS"
# A held entry's reason, rewritten only while it is held: a worker that has just delivered it
# deleted the field, which must stay deleted.
REWRITE_REASON = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 0
"""


def backoff_seconds(settings: Settings, entry_id: str, attempts: int) -> float:
    """The wait after the timeout of attempt ``attempts`` before the next one; the jitter is
    fixed per entry and attempt, so every worker computes the same time."""
    backoff = Backoff(settings.webhook_backoff_seconds, settings.webhook_max_backoff_seconds)
    return backoff.delay(attempts, random.Random(f"{entry_id}/{attempts}"))


def retry_after_ms(settings: Settings, entry_id: str, attempts: int) -> int:
    """How long an entry must have been idle (since attempt ``attempts`` began) before another
    worker may begin the next one: the attempt's timeout, then the backoff."""
    seconds = settings.webhook_timeout_seconds + backoff_seconds(settings, entry_id, attempts)
    return int(seconds * 1000)


async def held_count(redis: Redis, keys: Keys) -> int:
    """Deliveries held by a worker's settings, over every partition's outbox."""
    async with redis.pipeline(transaction=False) as pipe:
        for part in keys.every_partition():
            pipe.hlen(part.webhooks_held)
        counts: list[int] = await pipe.execute()
    return sum(counts)


class Outbox:
    """One worker's share of the deliveries: a reader of new entries and a sweeper of due
    retries, with at most ``webhook_concurrency`` deliveries in flight."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        consumer: str,
        peers_sign: Callable[[], bool] = lambda: False,
    ) -> None:
        self.redis = redis
        self.peers_sign = peers_sign  # whether other processes of the deployment sign
        self.keys = keys
        self.settings = settings
        self.consumer = consumer
        self.policy = Policy.from_settings(settings)
        self.capacity = settings.webhook_concurrency
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self._room = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self._sweep_every = min(1.0, max(0.05, settings.webhook_backoff_seconds / 2))
        self._cleaned_at = 0.0
        self._held_cursor = "-"
        self._rewrite_reason = lua.Script(redis, REWRITE_REASON)
        self._refused_here: dict[str, float] = {}  # held entry id → when to look again

    def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self.settings.webhook_timeout_seconds,
            follow_redirects=False,
            trust_env=False,  # a proxy would resolve the host itself, past our address check
            # One connection per delivery: a pooled connection opened for one host name must
            # not carry a request for another name on the same address.
            limits=httpx.Limits(max_connections=self.capacity, max_keepalive_connections=0),
        )
        self._loops = [
            asyncio.create_task(self._read_loop(), name="stepstream-webhooks-read"),
            asyncio.create_task(self._sweep_loop(), name="stepstream-webhooks-sweep"),
        ]

    async def stop(self, grace: float) -> None:
        """Read no more; give deliveries in flight up to ``grace`` seconds. An unfinished one
        stays pending and another worker takes it over."""
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        if self.in_flight:
            _, unfinished = await asyncio.wait(list(self.in_flight.values()), timeout=grace)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- reading and claiming -------------------------------------------------------------

    async def ensure_group(self) -> bool:
        """Create the consumer group once the outbox exists (the first webhook event makes it:
        a worker alone writes nothing). False while there is no outbox yet."""
        try:
            await self.redis.xgroup_create(
                self.keys.webhook_outbox, self.keys.webhook_group, id="0"
            )
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return True
            if "requires the key to exist" in str(exc):
                return False
            raise
        return True

    @property
    def room(self) -> int:
        return self.capacity - len(self.in_flight)

    async def _read_loop(self) -> None:
        await self._wait_for_group()
        while True:
            while self.room <= 0:
                self._room.clear()
                await self._room.wait()
            try:
                reply = await self.redis.xreadgroup(
                    self.keys.webhook_group,
                    self.consumer,
                    {self.keys.webhook_outbox: ">"},
                    count=self.room,
                    block=1_000,
                )
            except Exception as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    await self._wait_for_group()  # the outbox was deleted (a flushed Redis)
                    continue
                # A Redis outage (the client has retried already): try again shortly.
                logger.warning("could not read the webhook outbox", exc_info=True)
                await asyncio.sleep(1.0)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self._launch(entry_id, fields, 1)

    async def _wait_for_group(self) -> None:
        while True:
            try:
                if await self.ensure_group():
                    return
            except Exception:
                logger.warning("could not create the webhook consumer group", exc_info=True)
            await asyncio.sleep(GROUP_POLL_SECONDS)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_every)
            try:
                await self.sweep()
                if time.monotonic() - self._cleaned_at >= CONSUMER_CLEANUP_SECONDS:
                    self._cleaned_at = time.monotonic()
                    await self._remove_stale_consumers()
            except ResponseError as exc:
                # No outbox yet (the first webhook event of a deployment creates it).
                if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                    logger.warning("webhook sweep failed", exc_info=True)
            except Exception:
                logger.warning("webhook sweep failed", exc_info=True)

    async def sweep(self) -> None:
        """Claim the pending entries whose next attempt is due, close the ones that have used
        every attempt, and report events a full outbox could not take."""
        key, group = self.keys.webhook_outbox, self.keys.webhook_group
        attempts = self.settings.webhook_attempts
        timeout_ms = int(self.settings.webhook_timeout_seconds * 1000)
        first_backoff = min(
            self.settings.webhook_backoff_seconds, self.settings.webhook_max_backoff_seconds
        )
        min_idle = timeout_ms + int(first_backoff * 500)  # the soonest any retry is due
        dropped = await self.redis.getdel(self.keys.webhooks_dropped)
        if dropped:
            logger.error(
                "%s webhook event(s) dropped: the outbox was full "
                "(STEPSTREAM_WEBHOOK_OUTBOX_MAXLEN=%d undelivered events)",
                dropped,
                self.settings.webhook_outbox_maxlen,
            )
        scanned = 0
        consumers = await self.redis.xinfo_consumers(key, group)
        for consumer in consumers:
            # Held entries wait for a worker whose settings allow them, not for a retry.
            if consumer["name"] == self.keys.webhook_held_consumer or not consumer["pending"]:
                continue
            start = "-"
            while scanned < SWEEP_SCAN and self.room > 0:
                rows = await self.redis.xpending_range(
                    key,
                    group,
                    min=start,
                    max="+",
                    count=SWEEP_PAGE,
                    consumername=consumer["name"],
                    idle=min_idle,
                )
                for row in rows:
                    await self._sweep_row(row, attempts, timeout_ms)
                scanned += len(rows)
                if len(rows) < SWEEP_PAGE:
                    break
                start = "(" + rows[-1]["message_id"]
        await self._look_at_held()

    async def _sweep_row(self, row: dict[str, Any], attempts: int, timeout_ms: int) -> None:
        entry_id = row["message_id"]
        idle, begun = int(row["time_since_delivered"]), int(row["times_delivered"])
        if entry_id in self.in_flight:
            return
        if begun >= attempts:
            # The worker of the last attempt died before closing the entry.
            if idle >= timeout_ms + 1_000:
                for claimed_id, fields in await self._claim(entry_id, idle):
                    await self._close(claimed_id)
                    self._log_gave_up(fields, begun, "its worker stopped during it")
            return
        due = retry_after_ms(self.settings, entry_id, begun)
        if idle >= due and self.room > 0:
            for claimed_id, fields in await self._claim(entry_id, due):
                self._launch(claimed_id, fields, begun + 1)

    async def _look_at_held(self) -> None:
        """Take the held entries this worker's settings allow, one page per sweep (a cursor
        goes round the held ones, so many held entries do not hide the rest)."""
        now = time.monotonic()
        self._refused_here = {i: t for i, t in self._refused_here.items() if t > now}
        if self.room <= 0:
            return
        rows = await self.redis.xpending_range(
            self.keys.webhook_outbox,
            self.keys.webhook_group,
            min=self._held_cursor,
            max="+",
            count=SWEEP_PAGE,
            consumername=self.keys.webhook_held_consumer,
        )
        self._held_cursor = "-" if len(rows) < SWEEP_PAGE else "(" + rows[-1]["message_id"]
        for row in rows:
            entry_id = row["message_id"]
            if entry_id in self.in_flight or entry_id in self._refused_here or self.room <= 0:
                continue
            idle, begun = int(row["time_since_delivered"]), int(row["times_delivered"])
            if idle < 1_000:
                # Just held, or just claimed: claiming with its idle time as the minimum makes
                # one claim win only once some time has passed since the last.
                continue
            if _age_seconds(entry_id) > self.settings.retention_seconds:
                for claimed_id, fields in await self._claim(entry_id, idle):
                    await self._close(claimed_id)
                    self._log_gave_up(fields, begun, HELD_TOO_LONG)
                continue
            found = await self.redis.xrange(self.keys.webhook_outbox, entry_id, entry_id)
            if not found:
                continue
            reason = await self._refusal(found[0][1])
            if reason is not None:
                self._refused_here[entry_id] = now + HOLD_RECHECK_SECONDS
                # The reason shown is the latest worker's: the one that held it may be gone.
                record = json.dumps({"reason": reason, "worker": self.consumer, "at": time.time()})
                await self._rewrite_reason(keys=[self.keys.webhooks_held], args=[entry_id, record])
                continue
            for claimed_id, fields in await self._claim(entry_id, idle):
                await self.redis.hdel(self.keys.webhooks_held, claimed_id)  # type: ignore[misc]
                logger.info(
                    "held webhook released: this worker's settings allow it",
                    extra={"job_id": fields.get("job"), "webhook": fields.get("target")},
                )
                self._launch(claimed_id, fields, begun + 1)

    async def _refusal(self, fields: dict[str, str]) -> str | None:
        """Why this worker's settings would refuse the entry now (None: they allow it, or an
        attempt will tell: a host that does not resolve now is not a refusal)."""
        target = fields.get("target", "")
        if target == "callback":
            record = JobRecord.model_validate(json.loads(fields["record"]))
            try:
                async with asyncio.timeout(self.settings.webhook_timeout_seconds):
                    await self.policy.check(record.callback_url)
            except (Unresolvable, TimeoutError):
                return None
            except Refused as exc:
                return f"refused: the URL {exc}"
        return self._setting_refusal(target)

    def _setting_refusal(self, target: str) -> str | None:
        if target != "callback" and not self.settings.webhook_url:
            return "this worker has no STEPSTREAM_WEBHOOK_URL for the deployment webhook"
        if not self.settings.webhook_secret and self.peers_sign():
            return (
                "this worker has no STEPSTREAM_WEBHOOK_SECRET while other processes of the "
                "deployment have one: it would send the event unsigned"
            )
        return None

    async def _claim(self, entry_id: str, min_idle_ms: int) -> list[tuple[str, dict[str, str]]]:
        claimed: list[tuple[str, dict[str, str]]] = await self.redis.xclaim(
            self.keys.webhook_outbox,
            self.keys.webhook_group,
            self.consumer,
            min_idle_ms,
            [entry_id],
        )
        return [(i, f) for i, f in claimed if f]

    async def _close(self, entry_id: str) -> None:
        """Acknowledge and delete: the entry is done with (delivered, refused or given up)."""
        # In one MULTI on one server; a cluster has none (one partition's keys, one node).
        async with self.redis.pipeline(transaction=not self.keys.partitioned) as pipe:
            pipe.xack(self.keys.webhook_outbox, self.keys.webhook_group, entry_id)
            pipe.xdel(self.keys.webhook_outbox, entry_id)
            pipe.hdel(self.keys.webhooks_held, entry_id)
            await pipe.execute()

    async def _hold(self, entry_id: str, fields: dict[str, str], attempt: int, reason: str) -> None:
        """Keep the entry for a worker whose settings allow it: claimed to the held consumer,
        its attempt given back, its reason recorded."""
        extra = {"job_id": fields.get("job"), "webhook": fields.get("target")}
        if _age_seconds(entry_id) > self.settings.retention_seconds:
            await self._close(entry_id)
            self._log_gave_up(fields, attempt - 1, f"{HELD_TOO_LONG}: {reason}")
            return
        record = json.dumps({"reason": reason, "worker": self.consumer, "at": time.time()})
        async with self.redis.pipeline(transaction=not self.keys.partitioned) as pipe:
            pipe.xclaim(
                self.keys.webhook_outbox,
                self.keys.webhook_group,
                self.keys.webhook_held_consumer,
                0,
                [entry_id],
                retrycount=attempt - 1,
                justid=True,
            )
            pipe.hset(self.keys.webhooks_held, entry_id, record)
            _, new = await pipe.execute()
        self._refused_here[entry_id] = time.monotonic() + HOLD_RECHECK_SECONDS
        if new:
            logger.warning(
                "webhook held: %s. It waits in the outbox and is delivered once a worker's "
                "settings allow it",
                reason,
                extra=extra,
            )

    async def _remove_stale_consumers(self) -> None:
        key, group = self.keys.webhook_outbox, self.keys.webhook_group
        for consumer in await self.redis.xinfo_consumers(key, group):
            name = consumer["name"]
            if (
                name != self.consumer
                and int(consumer["pending"]) == 0
                and int(consumer["idle"]) > STALE_CONSUMER_MS
            ):
                await self.redis.xgroup_delconsumer(key, group, name)

    # -- delivering -----------------------------------------------------------------------

    def _launch(self, entry_id: str, fields: dict[str, str], attempt: int) -> None:
        task = asyncio.create_task(self._deliver(entry_id, fields, attempt))
        self.in_flight[entry_id] = task
        task.add_done_callback(lambda _: self._done(entry_id))

    def _done(self, entry_id: str) -> None:
        self.in_flight.pop(entry_id, None)
        self._room.set()

    async def _deliver(self, entry_id: str, fields: dict[str, str], attempt: int) -> None:
        attempts = self.settings.webhook_attempts
        job_id = fields.get("job", "")
        extra: dict[str, Any] = {
            "job_id": job_id,
            "webhook": fields.get("target"),
            "delivery_attempt": attempt,
        }
        try:
            outcome = await self._attempt(fields, attempt)
        except asyncio.CancelledError:
            raise  # the worker is stopping: the entry stays pending for another worker
        except Exception as exc:  # a bug, or a record that does not load: retried, bounded
            logger.exception("webhook delivery crashed", extra=extra)
            outcome = webhooks.Outcome(False, True, f"{type(exc).__name__}: {exc}")
        if outcome.held:
            try:
                await self._hold(entry_id, fields, attempt, outcome.detail)
            except Exception:  # still pending: it comes again when it is due
                logger.warning("could not hold webhook entry %s", entry_id, exc_info=True)
            return
        if outcome.delivered or not outcome.retry or attempt >= attempts:
            try:
                await self._close(entry_id)
            except Exception:  # not closed: it comes again (same event id) when it is due
                logger.warning("could not close webhook entry %s", entry_id, exc_info=True)
        if outcome.delivered:
            logger.info("webhook delivered (%s)", outcome.detail, extra=extra)
        elif not outcome.retry:
            logger.error("webhook not delivered, not retried: %s", outcome.detail, extra=extra)
        elif attempt >= attempts:
            self._log_gave_up(fields, attempt, outcome.detail)
        else:
            logger.warning(
                "webhook attempt %d of %d failed (%s); attempt %d starts %.1fs after this one did",
                attempt,
                attempts,
                outcome.detail,
                attempt + 1,
                retry_after_ms(self.settings, entry_id, attempt) / 1000,
                extra=extra,
            )

    async def _attempt(self, fields: dict[str, str], attempt: int) -> webhooks.Outcome:
        record = JobRecord.model_validate(json.loads(fields["record"]))
        target = fields["target"]
        url = record.callback_url if target == "callback" else self.settings.webhook_url
        refusal = self._setting_refusal(target)
        if refusal is not None:
            return webhooks.Outcome(False, False, refusal, held=True)
        if not url:
            return webhooks.Outcome(False, False, f"no {target} URL is set any more")
        event = webhooks.event_id(record.id, fields["event"])
        body = webhooks.build_body(record, event, self.settings.public_url)
        headers = webhooks.headers_for(
            event, f"job.{record.state.value}", attempt, body, self.settings.webhook_secret
        )
        assert self._client is not None
        return await webhooks.post(
            self._client,
            url,
            body,
            headers,
            # The operator wrote the deployment URL: only a job's callback_url is checked.
            policy=self.policy if target == "callback" else None,
            timeout=self.settings.webhook_timeout_seconds,
        )

    def _log_gave_up(self, fields: dict[str, str], attempts: int, detail: str) -> None:
        logger.error(
            "webhook gave up after %d attempts (last: %s)",
            attempts,
            detail,
            extra={"job_id": fields.get("job"), "webhook": fields.get("target")},
        )


def _age_seconds(entry_id: str) -> float:
    """How long ago the append script added the entry (its id is its time in unix ms)."""
    return time.time() - StreamId.parse(entry_id).ms / 1000
