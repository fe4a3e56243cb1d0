"""The two planes of a deployment whose logs are on a cluster (docs/scaling.md).

- The **log plane** holds job records, event logs, the firehose, indexes and counters: the
  server at ``REDIS_URL``, or the Valkey/Redis Cluster at ``STEPSTREAM_CLUSTER_URL``.
- The **queue plane** holds arq's queue: always ``REDIS_URL`` (one server, or the primary the
  Sentinels name), as arq has no cluster support.

On one server both are the same, and a store script writes a job's arq entry with its record.
On a cluster a script can touch only its partition's slot: what a call would write elsewhere
(arq's entry, a key of another slot) is written by the script as one entry of the partition's
**queue outbox** (``Keys.queue_outbox``), in the same atomic call as the record. Right after the
script the caller runs the entry's commands (:func:`run_entry`) and deletes it: the fast path.
A process that dies in between leaves the entry, and every worker drains the outboxes
(:class:`OutboxDrain`) of entries older than ``DRAIN_AFTER_MS``. Every such command may run
twice: an arq entry's id is the job's own (arq's queue is a sorted set, its payload a key: the
same entry again), a ``ZREM``, a ``SET``; and a job that has run already is never run again
(tasks/runtime.py starts a job by a compare-and-set on its state). So a job is never made
without its queue entry, nor an entry without its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import RedisError

from stepstream.tasks.commands import Arg, Command
from stepstream.tasks.connection import connect, connect_cluster
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.settings import Settings

logger = logging.getLogger("stepstream.planes")

# An outbox entry this old is the drain's: its writer has had this long to run it itself.
DRAIN_AFTER_MS = 5_000
# How often each worker looks at every partition's outbox.
DRAIN_EVERY_SECONDS = 2.0


def connect_log_plane(settings: Settings, *, attempts: int | None = 25) -> Redis:
    """The log plane's client: the cluster's at ``STEPSTREAM_CLUSTER_URL``, else
    :func:`connect`'s (``REDIS_URL``). Typed as the plain client, whose commands the cluster's
    shares (but ``MULTI``: the store never asks a cluster for one)."""
    if settings.cluster_url:
        return cast(Redis, connect_cluster(settings, attempts=attempts or 25))
    return connect(settings, attempts=attempts)


def split(job_slot_key: str, commands: Sequence[Command]) -> tuple[list[Command], list[Command]]:
    """``commands`` as (those the script runs: log-plane commands whose keys share the slot of
    ``job_slot_key``, those left for after it: the queue plane's and those of other slots)."""
    slot = key_slot(job_slot_key.encode())
    inside: list[Command] = []
    after: list[Command] = []
    for command in commands:
        local = not command.queue and all(key_slot(k.encode()) == slot for k in command.keys)
        (inside if local else after).append(command)
    return inside, after


def encode(commands: Sequence[Command]) -> str:
    """An outbox entry: when it was written (ms) and its commands, as JSON. A binary argument
    (arq's pickled payload) is kept as ``{"x": hex}``."""
    return json.dumps(
        {
            "at": int(time.time() * 1000),
            "commands": [
                [c.name, list(c.keys), [_arg(a) for a in c.args], c.queue] for c in commands
            ],
        },
        separators=(",", ":"),
    )


def _arg(value: Arg) -> Any:
    return {"x": value.hex()} if isinstance(value, bytes) else value


def decode(text: str) -> tuple[int, list[Command]]:
    entry = json.loads(text)
    commands = [
        Command(
            name,
            keys,
            [bytes.fromhex(a["x"]) if isinstance(a, dict) else a for a in args],
            queue=queue,
        )
        for name, keys, args, queue in entry["commands"]
    ]
    return int(entry["at"]), commands


async def run_entry(
    log: Redis, queue: Redis, outbox: str, entry: str, commands: Sequence[Command]
) -> None:
    """Run an outbox entry's commands, each on its plane (the queue's in one ``MULTI``), then
    delete the entry. A failure leaves it to the drain."""
    queued = [c for c in commands if c.queue]
    logged = [c for c in commands if not c.queue]
    if queued:
        async with queue.pipeline(transaction=True) as pipe:
            for command in queued:
                pipe.execute_command(command.name, *command.keys, *command.args)
            await pipe.execute()
    if logged:
        async with log.pipeline(transaction=False) as pipe:
            for command in logged:
                pipe.execute_command(command.name, *command.keys, *command.args)
            await pipe.execute()
    await log.hdel(outbox, entry)  # type: ignore[misc]


async def drain(log: Redis, queue: Redis, keys: Keys, *, older_than_ms: int) -> int:
    """Run every outbox entry written more than ``older_than_ms`` ago, in every partition;
    how many ran."""
    now_ms = int(time.time() * 1000)
    partitions = keys.every_partition()
    async with log.pipeline(transaction=False) as pipe:
        for part in partitions:
            pipe.hgetall(part.queue_outbox)
        found: list[dict[str, str]] = await pipe.execute()
    ran = 0
    for part, entries in zip(partitions, found, strict=True):
        for entry, text in entries.items():
            at, commands = decode(text)
            if now_ms - at < older_than_ms:
                continue
            try:
                await run_entry(log, queue, part.queue_outbox, entry, commands)
            except (RedisError, OSError) as exc:
                # One entry that fails keeps no other waiting: it is tried again next time.
                logger.warning("queue outbox entry %r could not run: %r", entry, exc)
                continue
            ran += 1
    return ran


class OutboxDrain:
    """A worker's loop over the queue outboxes (a cluster's only): runs what a process that
    died after its script left behind."""

    def __init__(self, log: Redis, queue: Redis, keys: Keys) -> None:
        self.log = log
        self.queue = queue
        self.keys = keys
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stepstream-queue-outbox")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                ran = await drain(self.log, self.queue, self.keys, older_than_ms=DRAIN_AFTER_MS)
                if ran:
                    logger.info("ran %d queue outbox entries left behind", ran)
            except (RedisError, OSError) as exc:
                logger.warning("could not drain the queue outbox; trying again: %r", exc)
            await asyncio.sleep(DRAIN_EVERY_SECONDS)
