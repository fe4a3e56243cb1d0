"""The store's one atomic append, called directly against a real Valkey."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from stepstream.tasks import children, lua
from stepstream.tasks.commands import Command
from stepstream.tasks.models import JobRecord, JobState, utcnow
from stepstream.tasks.queue import enqueue_commands
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore, appended_from, new_event
from tests.support.processes import Valkey
from tests.support.records import running_record


async def _append_many_is_all_or_none(url: str) -> None:
    redis = Redis.from_url(url, decode_responses=True)
    store = JobStore(redis, Settings(redis_url=url, prefix="store-test:"))
    try:
        record = running_record("j1", "burst")
        enqueue = [
            Command("ZADD", ["store-test:queue"], (1, "j1")),
            Command("HINCRBY", ["store-test:n"], ("made", 1)),
        ]
        assert (await store.create(record, new_event("j1", "queued", 0), then=enqueue)).ok
        # A second create of the same id is refused, and its commands do not run.
        again_created = await store.create(record, new_event("j1", "queued", 0), then=enqueue)
        assert again_created.refused == "exists"
        assert await redis.hget("store-test:n", "made") == "1"
        assert await redis.zscore("store-test:queue", "j1") == 1
        events = [new_event("j1", "progress", 1, current=i, total=3) for i in (1, 2, 3)]
        appended = await store.append_many(
            "j1",
            events,
            {"progress": 1.0, "message": "third"},
            expect=(JobState.running,),
        )
        assert appended.ok
        stored = await store.read_events("j1", "0", 100)
        assert [json.loads(e)["type"] for _, e in stored] == [
            "queued",
            "progress",
            "progress",
            "progress",
        ]
        assert appended.job_event_id == stored[-1][0]
        kept = await store.get("j1")
        assert kept is not None
        assert kept.message == "third" and kept.last_event_id == appended.job_event_id

        # A refused precondition stores none of the batch and leaves the record as it was.
        refused = await store.append_many(
            "j1", events, {"message": "never"}, expect=(JobState.queued,)
        )
        assert refused.refused == '"running"'
        assert len(await store.read_events("j1", "0", 100)) == 4
        again = await store.get("j1")
        assert again is not None and again.message == "third"
    finally:
        await redis.aclose()


def test_append_many_stores_every_event_in_order_or_none_and_runs_its_commands_only_if_stored(
    valkey: Valkey,
) -> None:
    asyncio.run(asyncio.wait_for(_append_many_is_all_or_none(valkey.url), 30))


async def _a_resent_call_applies_once(url: str) -> None:
    redis = Redis.from_url(url, decode_responses=True)
    store = JobStore(redis, Settings(redis_url=url, prefix="resent-test:"))
    try:
        record = running_record("j2", "resent")
        enqueue = [Command("HINCRBY", ["resent-test:n"], ("made", 1))]
        # Exactly what redis-py sends again when a reply is lost with its connection (a Valkey
        # restart after it ran the script): the same script with the same arguments.
        keys, args = store.lay_out(
            store.create_call(record, new_event("j2", "queued", 0), then=enqueue)
        )
        first = await store._append(keys=keys, args=args)
        again = await store._append(keys=keys, args=args)
        assert again[0] == first[0], "the resent create answers as the first did"
        assert await redis.hget("resent-test:n", "made") == "1"

        done = new_event("j2", "step_completed", 1, step={"index": 1, "count": 1, "name": "s"})
        keys, args = store.lay_out(
            store.script_call(
                "j2", [done], {"message": "done"}, None, "update", (JobState.running,), []
            )
        )
        first = await store._append(keys=keys, args=args)
        again = await store._append(keys=keys, args=args)
        assert again[0] == first[0]
        stored = [json.loads(e)["type"] for _, e in await store.read_events("j2", "0", 100)]
        assert stored == ["queued", "step_completed"], "an event appended twice"
        # A new call with the same content is a new append, not a repeat.
        assert (await store.append("j2", done, {"message": "again"})).ok
        assert len(await store.read_events("j2", "0", 100)) == 3
        # The create sent again after other appends (a batch's MULTI re-sent late): still the
        # same create, not a refusal that a new id "exists".
        fresh = running_record("j3", "resent")
        keys, args = store.lay_out(store.create_call(fresh, new_event("j3", "queued", 0)))
        assert appended_from(await store._append(keys=keys, args=args)).ok
        later = new_event("j3", "log", 1, message="a worker's append")
        assert (await store.append("j3", later, {"message": "later"})).ok
        late = appended_from(await store._append(keys=keys, args=args))
        assert late.ok, f"the resent create was refused as {late.refused!r}"
        assert len(await store.read_events("j3", "0", 100)) == 2
    finally:
        await redis.aclose()


def test_a_call_sent_again_after_a_lost_reply_is_applied_once(valkey: Valkey) -> None:
    asyncio.run(asyncio.wait_for(_a_resent_call_applies_once(valkey.url), 30))


async def _a_transaction_outlives_forgotten_scripts(url: str) -> None:
    redis = Redis.from_url(url, decode_responses=True)
    other = Redis.from_url(url, decode_responses=True)
    store = JobStore(redis, Settings(redis_url=url, prefix="reload-test:"))
    loads = 0
    original = Pipeline.load_scripts

    async def then_forget(pipe: Pipeline) -> None:
        # What a Valkey restart does between redis-py loading the scripts and re-sending the
        # MULTI after a connection error: the scripts are gone when EXEC runs them.
        nonlocal loads
        loads += 1
        await original(pipe)
        if loads == 1:
            await other.script_flush()

    try:
        parent = running_record("p", "batch")
        child = running_record("c", "batch")
        calls = [
            store.create_call(parent, new_event("p", "queued", 0)),
            store.create_call(child, new_event("c", "queued", 0), requires="p"),
        ]
        Pipeline.load_scripts = then_forget  # type: ignore[method-assign]
        try:
            replies = await store.create_together(calls)
        finally:
            Pipeline.load_scripts = original  # type: ignore[method-assign]
        assert loads == 2, "the scripts were not forgotten once: the test tested nothing"
        assert [reply.ok for reply in replies] == [True, True]
        # The same transaction applied, and its reply lost: sent again, it answers as it did.
        again = await store.create_together(calls)
        assert [reply.ok for reply in again] == [True, True]
        assert [r.job_event_id for r in again] == [r.job_event_id for r in replies]
        assert len(await store.read_events("c", "0", 10)) == 1
    finally:
        await redis.aclose()
        await other.aclose()


def test_a_batch_transaction_outlives_a_valkey_that_forgot_its_scripts(valkey: Valkey) -> None:
    asyncio.run(asyncio.wait_for(_a_transaction_outlives_forgotten_scripts(valkey.url), 30))


# -- every key declared ------------------------------------------------------------------------

DECLARED_USER = "declared-keys-only"


def _glob_escaped(name: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in name)


async def _every_key_is_declared(url: str) -> None:
    admin = Redis.from_url(url, decode_responses=True)
    await admin.execute_command("ACL", "SETUSER", DECLARED_USER, "on", ">pw", "+@all")
    limited = Redis.from_url(url, decode_responses=True, username=DECLARED_USER, password="pw")
    arq = ArqRedis(ConnectionPool.from_url(url))
    store = JobStore(admin, Settings(redis_url=url, prefix="declared-test:"))
    script = limited.register_script(lua.append())
    calls = 0

    async def declared_only(keys: list[str], args: list[Any], client: Any = None) -> Any:
        # The caller's user may touch exactly the keys (and channels) the call declares: a
        # command of the script on any other fails with NOPERM.
        nonlocal calls
        calls += 1
        assert client is None
        allowed = [f"~{_glob_escaped(k)}" for k in keys] + [f"&{_glob_escaped(k)}" for k in keys]
        await admin.execute_command(
            "ACL", "SETUSER", DECLARED_USER, "resetkeys", "resetchannels", *allowed
        )
        return await script(keys=keys, args=args)

    store._append = declared_only  # type: ignore[assignment]
    try:
        parent = running_record("p", "fan")
        assert (await store.create(parent, new_event("p", "queued", 0))).ok
        child = JobRecord(
            id="c",
            task="leaf",
            owner="alice",
            subject="s1",
            state=JobState.queued,
            input={},
            max_attempts=1,
            created_at=utcnow(),
            parent="p",
            parent_index=0,
            callback_url="http://127.0.0.1:9/hook",
        )
        # A create with its queue entry and an idempotency claim's confirmation riding along,
        # taking a place under the owner's limit, indexed under its subject.
        enqueue = enqueue_commands(arq, store.keys, "c")
        confirm = Command("SET", [store.keys.idempotency("k")], ("c f", "EX", 60))
        assert (
            await store.create(child, new_event("c", "queued", 0), then=[*enqueue, confirm], take=1)
        ).ok
        # The parent waits for its one child, its queue entry kept in its counts hash.
        waiting = await store.append(
            "p",
            new_event("p", "waiting", 1),
            {"state": JobState.waiting.value},
            expect=(JobState.running,),
            then=children.resume_commands(store, arq, "p", 1, None),
        )
        assert waiting.ok
        started = await store.append(
            "c", new_event("c", "started", 1), {"state": "running"}, owner="alice"
        )
        assert started.ok
        # The child's end, its batch not named by the caller: the script asks for the
        # parent's keys, then for its queue entry's, and counts the end and writes the entry.
        calls = 0
        ended = await store.append(
            "c",
            new_event("c", "completed", 1, result={}),
            {"state": JobState.completed.value, "result": {}},
            owner="alice",
        )
        assert ended.ok
        assert calls == 3, f"{calls} calls: the script did not ask for the batch's keys"
        assert await admin.hget(store.keys.batch_counts("p"), "c") == "completed"
        entry = children.children_entry("p", 1)
        assert await admin.zscore(store.keys.queue, entry) is not None
        assert await admin.exists(job_key_prefix + entry)
        assert await admin.xlen(store.keys.webhook_outbox) == 1
        assert await admin.zscore(store.keys.owner_unfinished("alice"), "c") is None
    finally:
        await admin.execute_command("ACL", "DELUSER", DECLARED_USER)
        await limited.aclose()
        await arq.aclose()
        await admin.aclose()


def test_every_key_an_append_touches_is_one_it_declares(valkey: Valkey) -> None:
    asyncio.run(asyncio.wait_for(_every_key_is_declared(valkey.url), 30))


def test_only_a_missing_log_reads_as_none_an_error_is_raised(valkey: Valkey) -> None:
    """A resume or a firehose cursor check reads a log's trim state: a log that does not
    exist is none, but an error (a cluster node down or loading, a wrong key) is not an empty
    log, which would let a resuming stream skip the events after its cursor."""

    async def run() -> None:
        redis = Redis.from_url(valkey.url, decode_responses=True)
        store = JobStore(redis, Settings(redis_url=valkey.url, prefix="store-info:"))
        try:
            assert await store.stream_info("store-info:none") is None
            assert await store.resume("nothing-here", "1-0", 10) == (None, [])
            await redis.set("store-info:string", "not a stream")
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await store.stream_info("store-info:string")
        finally:
            await redis.aclose()

    asyncio.run(run())
