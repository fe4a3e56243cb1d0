"""Idempotency-Key claims: of two identical submissions with the same key, one creates the job
and the other gets it (docs/http-api.md).

A claim is a ``SET NX`` of the key's record, held briefly (``CLAIM_IN_FLIGHT_SECONDS``) until
the create script, with the job, keeps it for ``STEPSTREAM_IDEMPOTENCY_TTL_SECONDS``
(``Claim.confirm``, a command that rides along with the create: tasks/creation.py). A web
process that dies (or times out) between the two leaves a claim that lapses in seconds, never
one that blocks the key for a day. The HTTP layer (server/jobs.py) checks the key's form and
answers the refusals.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from stepstream.tasks.commands import Command
from stepstream.tasks.models import JobRecord
from stepstream.tasks.store import JobStore

# How long a claim without its job lasts: the longest a request holds it before creating.
CLAIM_IN_FLIGHT_SECONDS = 10


@dataclass(frozen=True)
class Claim:
    """A key claimed for ``job_id`` (to create), or the job an earlier request made with it
    (``existing``)."""

    job_id: str
    redis_key: str
    existing: JobRecord | None = None
    # The claim kept for STEPSTREAM_IDEMPOTENCY_TTL_SECONDS, run by the create script itself.
    confirm: Command | None = None


class ClaimRefused(Exception):
    """The key was used with another body (``job_id``: the job it made), or a request with it
    is still in flight (``job_id`` None)."""

    def __init__(self, job_id: str | None) -> None:
        super().__init__(job_id)
        self.job_id = job_id


async def claim(
    store: JobStore,
    owner: str | None,
    key: str,
    task_name: str,
    raw_input: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Claim:
    """Claim ``key`` for a new job, or find the job an earlier identical request created.

    ``SET NX`` makes the claim atomic: of two concurrent identical requests one creates the
    job and the other waits for its record. Raises ``ClaimRefused``.
    """
    body = json.dumps(
        {"task": task_name, "input": raw_input, **(extra or {})},
        sort_keys=True,
        separators=(",", ":"),
    )
    fingerprint = hashlib.sha256(body.encode()).hexdigest()
    # Keys are per owner: two owners may use the same key without seeing each other's job.
    scope = hashlib.sha256(f"{owner}\n{key}".encode()).hexdigest()
    # On a cluster the claim and its job live in the scope's partition: the create confirms it.
    redis_key = store.keys.at(store.keys.partition_of(scope)).idempotency(scope)
    job_id = store.new_job_id(scope=scope)
    value = f"{job_id} {fingerprint}"
    confirm = Command("SET", [redis_key], (value, "EX", store.settings.idempotency_ttl_seconds))
    for _ in range(3):
        if await store.redis.set(redis_key, value, nx=True, ex=CLAIM_IN_FLIGHT_SECONDS):
            return Claim(job_id, redis_key, confirm=confirm)
        held = await store.redis.get(redis_key)
        if held is None:
            continue  # expired between the two calls: claim it again
        if held == value:
            # Our own SET, re-sent by the client after its reply was lost: the claim is ours.
            return Claim(job_id, redis_key, confirm=confirm)
        other_id, other_fingerprint = held.split(" ", 1)
        if other_fingerprint != fingerprint:
            raise ClaimRefused(other_id)
        record = await _wait_for_record(store, other_id)
        if record is not None:
            return Claim(other_id, redis_key, existing=record)
    raise ClaimRefused(None)


async def release(store: JobStore, claim: Claim) -> None:
    """Give up ``claim`` after a refusal. Only then: a request cut off while its create was on
    the way (a deadline's 503, a lost connection) may still have made the job, and a retry
    that found the key free would make a second. Such a claim is confirmed by the create, or
    lapses after ``CLAIM_IN_FLIGHT_SECONDS``."""
    await store.redis.delete(claim.redis_key)


def confirmations(claim: Claim | None) -> list[Command]:
    """What a create runs with for ``claim`` (none without one)."""
    return [] if claim is None or claim.confirm is None else [claim.confirm]


async def _wait_for_record(store: JobStore, job_id: str) -> JobRecord | None:
    for _ in range(100):  # the first request is between its claim and its create: 5 s at most
        record = await store.get(job_id)
        if record is not None:
            return record
        await asyncio.sleep(0.05)
    return None
