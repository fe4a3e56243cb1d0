"""The store on a real Valkey Cluster (3 primaries, 3 replicas) with arq's queue on a Valkey of
its own, as ``STEPSTREAM_CLUSTER_URL`` and ``REDIS_URL`` put them (docs/scaling.md): jobs spread
over every primary, their appends stay one script in one slot, the global views (listing,
firehose, counters) are merged over the partitions, the queue outbox gives every job its arq
entry, and the owner's limits hold under concurrent submissions."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from redis.cluster import REPLICA, key_slot
from redis.exceptions import NoScriptError

from stepstream.tasks import creation, heartbeat, lua, planes
from stepstream.tasks.connection import arq_pool
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import JobState, new_job_id
from stepstream.tasks.registry import TaskSpec, load_tasks
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore, new_event
from tests.conftest import Stack
from tests.support import api, http
from tests.support.cluster import ValkeyCluster
from tests.support.output_tasks import streamed_text
from tests.support.processes import Valkey, free_port, wait_until
from tests.support.receiver import Receiver
from tests.support.snapshot import key_value
from tests.support.sse import StreamReader, read_stream
from tests.support.tasks import gate_key
from tests.test_ops import doctor
from tests.test_output import assemble

_prefixes = itertools.count(1)


@pytest.fixture(scope="module")
def spec() -> TaskSpec:
    found = load_tasks([], demo=True).get_task("analyze_document")
    assert found is not None
    return found


def two_planes(valkey: Valkey, cluster: ValkeyCluster, **options: Any) -> Settings:
    return Settings(
        redis_url=valkey.url,
        cluster_url=cluster.url,
        prefix=f"cs{next(_prefixes)}:",
        **options,
    )


@asynccontextmanager
async def opened(settings: Settings) -> AsyncIterator[tuple[JobStore, ArqRedis]]:
    store = JobStore.open(settings)
    arq = arq_pool(settings)
    try:
        yield store, arq
    finally:
        await arq.aclose()
        await store.aclose()


def primaries_keys(cluster: ValkeyCluster, prefix: str) -> dict[str, dict[str, str]]:
    """Every key under ``prefix`` on each primary, with its type."""
    out: dict[str, dict[str, str]] = {}
    for shard in cluster.shards:
        with shard.primary.client() as client:
            out[shard.primary.name] = {
                key: client.type(key) for key in client.scan_iter(f"{prefix}*", count=1_000)
            }
    return out


def queue_plane(valkey: Valkey) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(valkey.url, decode_responses=True) as client:
        yield client


def queue_entries(valkey: Valkey, settings: Settings, job_ids: list[str]) -> list[bool]:
    queue = f"{settings.prefix}queue"
    with redis.Redis.from_url(valkey.url) as client:
        return [
            client.zscore(queue, job_id) is not None
            and bool(client.exists(job_key_prefix + job_id))
            for job_id in job_ids
        ]


def test_jobs_are_created_appended_listed_and_merged_over_the_partitions(
    valkey: Valkey, valkey_cluster: ValkeyCluster, spec: TaskSpec
) -> None:
    settings = two_planes(valkey, valkey_cluster)
    made: list[str] = []

    async def run() -> None:
        async with opened(settings) as (store, arq):
            for i in range(48):
                job = creation.NewJob(spec, {"text": f"document {i}"}, owner="alice")
                created = await creation.create(store, arq, job)
                assert created.appended.ok, created.appended
                made.append(created.record.id)
            # Every job has its arq entry on the queue plane, and no outbox entry is left.
            assert all(queue_entries(valkey, settings, made))
            async with store.redis.pipeline(transaction=False) as pipe:
                for part in store.keys.every_partition():
                    pipe.hlen(part.queue_outbox)
                assert sum(await pipe.execute()) == 0
            # A worker's appends: a compare-and-set on one job's keys, one slot.
            first = made[0]
            progress = new_event(first, "progress", 1, current=1, total=2)
            started = await store.append(
                first, progress, {"state": "running"}, owner="alice", expect=(JobState.queued,)
            )
            assert started.ok
            again = await store.append(
                first, progress, {"state": "running"}, owner="alice", expect=(JobState.queued,)
            )
            assert again.refused == '"running"'
            events = await store.read_events(first, "0", 10)
            assert [json.loads(e)["type"] for _, e in events] == ["queued", "progress"]
            info, rows = await store.resume(first, events[0][0], 10)
            assert info is not None and [r[0] for r in rows] == [events[1][0]]
            # The listing: every partition's index merged, newest first, page after page.
            listed: list[str] = []
            cursor = None
            while True:
                page, cursor = await store.list_jobs(
                    states=None, task=None, limit=10, cursor=cursor
                )
                listed += [record.id for record in page]
                if cursor is None or not page:
                    break
            assert listed == made[::-1]
            running, _ = await store.list_jobs(
                states=frozenset({JobState.running}), task=None, limit=10, cursor=None
            )
            assert [record.id for record in running] == [first]
            # The firehose: every partition's stream merged in id order, read in pages whose
            # cursor (one id per partition) resumes each partition where it stopped.
            seen: list[tuple[str, str]] = []
            after = "0"
            while True:
                page_rows, after, more = await store.read_firehose(after, 7)
                seen += [(json.loads(e)["job_id"], json.loads(e)["type"]) for _, _, e in page_rows]
                if not more:
                    break
            assert seen == [(job_id, "queued") for job_id in made] + [(first, "progress")]
            # Resumed from the 20th event's id, as a client's Last-Event-ID: the rest, once.
            twentieth = (await store.read_firehose("0", 20))[0][-1][0]
            rest, _, _ = await store.read_firehose(twentieth, 100)
            assert [json.loads(e)["job_id"] for _, _, e in rest] == [*made[20:], first]
            head = await store.firehose_head()
            assert (await store.read_firehose(head, 10))[0] == []
            # The transition counters, summed over the partitions.
            counters = await heartbeat.read_counters(store.redis, store.keys)
            assert counters.get(spec.name, "submitted") == 48
            assert counters.get(spec.name, "started") == 1

    asyncio.run(run())
    # The records spread over every primary (48 over 24 partitions, 8 partitions a primary).
    held = primaries_keys(valkey_cluster, settings.prefix)
    records = {
        name: sum(1 for k in keys if ":job:{" in k and k.endswith("}"))
        for name, keys in held.items()
    }
    assert sum(records.values()) == 48 and all(n >= 5 for n in records.values()), records


def test_a_queue_entry_left_in_the_outbox_is_written_by_the_drain_once(
    valkey: Valkey, valkey_cluster: ValkeyCluster, spec: TaskSpec
) -> None:
    """The queue plane unreachable right after the create's script (as for a web process that
    died between the two): the job is stored with its entry in the partition's queue outbox,
    and a worker's drain writes the arq entry; draining it again changes nothing."""
    settings = two_planes(valkey, valkey_cluster)

    async def run() -> None:
        async with opened(settings) as (store, arq):
            planes_of = (store.redis, store.queue, store.keys)
            nowhere = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=0.2)
            cut_off = JobStore(store.redis, settings, queue=nowhere)
            job = creation.NewJob(spec, {"text": "left behind"})
            created = await creation.create(cut_off, arq, job)
            job_id = created.record.id
            assert created.appended.ok and await store.get(job_id) is not None
            outbox = store.keys.of(job_id).queue_outbox
            assert await store.redis.hlen(outbox) == 1  # type: ignore[misc]
            assert queue_entries(valkey, settings, [job_id]) == [False]
            # A fresh entry is its writer's for a while: the drain leaves it.
            assert await planes.drain(*planes_of, older_than_ms=60_000) == 0
            assert await planes.drain(*planes_of, older_than_ms=0) == 1
            assert queue_entries(valkey, settings, [job_id]) == [True]
            assert await store.redis.hlen(outbox) == 0  # type: ignore[misc]
            assert await planes.drain(*planes_of, older_than_ms=0) == 0
            # An entry the queue plane refuses stays, and keeps no other one waiting.
            poison = store.keys.at(0).queue_outbox
            refused = ["INCR", [f"{settings.prefix}n"], ["an argument INCR does not take"], True]
            await store.redis.hset(  # type: ignore[misc]
                poison, "poison", json.dumps({"at": 0, "commands": [refused]})
            )
            again = await creation.create(cut_off, arq, creation.NewJob(spec, {"text": "2"}))
            assert await planes.drain(*planes_of, older_than_ms=0) == 1
            assert queue_entries(valkey, settings, [again.record.id]) == [True]
            assert await store.redis.hkeys(poison) == ["poison"]  # type: ignore[misc]
            with redis.Redis.from_url(valkey.url) as client:
                queued = client.zrange(f"{settings.prefix}queue", 0, -1)
            assert sorted(queued) == sorted([job_id.encode(), again.record.id.encode()])
            await nowhere.aclose()

    asyncio.run(run())


def test_an_owners_limits_hold_under_concurrent_submissions_over_partitions(
    valkey: Valkey, valkey_cluster: ValkeyCluster, spec: TaskSpec
) -> None:
    settings = two_planes(valkey, valkey_cluster, max_unfinished_per_owner=5)

    async def run() -> None:
        async with opened(settings) as (store, arq):

            async def submit(i: int, rate: tuple[int, int] | None = None) -> creation.Created:
                job = creation.NewJob(spec, {"text": f"doc {i}"}, owner="bob")
                return await creation.create(store, arq, job, rate=rate)

            results = await asyncio.gather(*(submit(i) for i in range(16)))
            made = [r.record.id for r in results if r.appended.ok]
            refused = [r for r in results if not r.appended.ok]
            assert len(made) == 5
            assert {r.appended.refused for r in refused} == {"limit"}
            assert {r.appended.unfinished for r in refused} == {5}
            assert len({store.keys.partition_of(job_id) for job_id in made}) > 1  # spread
            # A refused submission left nothing: no record, no place, no queue entry.
            for r in refused:
                assert await store.get(r.record.id) is None
            home = store.keys.owner_home("bob").owner_unfinished("bob")
            assert sorted(await store.redis.zrange(home, 0, -1)) == sorted(made)
            assert not any(queue_entries(valkey, settings, [r.record.id for r in refused]))
            # One ends: its place is given back (after its script, through the outbox).
            ended = await store.append(
                made[0],
                new_event(made[0], "cancelled", 0),
                {"state": "cancelled"},
                owner="bob",
                expect=(JobState.queued,),
            )
            assert ended.ok
            assert (await submit(99)).appended.ok
            assert not (await submit(100)).appended.ok
            # Submissions per second: counted in the owner's home partition, once each.
            results = await asyncio.gather(*(submit(200 + i, rate=(2, 1_000)) for i in range(5)))
            assert sorted(r.appended.refused or "ok" for r in results) == [
                "limit",
                "limit",
                "rate",
                "rate",
                "rate",
            ]

    asyncio.run(run())


# -- real web processes and workers on the two planes ----------------------------------------


@pytest.fixture(scope="module")
def cluster_stack(
    valkey: Valkey, valkey_cluster: ValkeyCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Two web processes and two workers: the logs on the cluster, arq's queue on ``valkey``."""
    own = Stack(
        valkey,
        f"cstack{next(_prefixes)}:",
        tmp_path_factory.mktemp("cluster-stack"),
        {
            "STEPSTREAM_CLUSTER_URL": valkey_cluster.url,
            "STEPSTREAM_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            "STEPSTREAM_WEBHOOK_SECRET": "cluster-webhook-secret",
            "STEPSTREAM_WEBHOOK_BACKOFF_SECONDS": "0.2",
            "STEPSTREAM_MAX_UNFINISHED_PER_OWNER": "20",
            "STEPSTREAM_TASK_MODULES": "tests.support.tasks,tests.support.ai_tasks,"
            "tests.support.fanout_tasks,tests.support.output_tasks",
        },
    )
    try:
        own.add(webs=2, workers=2)
        yield own
    finally:
        own.stop()


def test_a_job_submitted_to_one_web_streams_to_its_end_from_the_other(
    cluster_stack: Stack, valkey_cluster: ValkeyCluster
) -> None:
    first, second = cluster_stack.webs
    job = api.submit(first.url, "analyze_document", {"text": api.DOC, "pace": 0.0})
    status, events = read_stream(f"{second.url}/api/jobs/{job['id']}/events", timeout=30)
    assert status == 200
    types = [event.type for event in events]
    assert types[0] == "snapshot" and types[-1] == "completed", types
    # The whole log, replayed on the other web process from its start: every event once.
    _, log = read_stream(
        f"{first.url}/api/jobs/{job['id']}/events", headers={"Last-Event-ID": "0"}, timeout=30
    )
    ids = [event.id for event in log]
    assert [event.type for event in log][:2] == ["queued", "started"]
    assert log[-1].type == "completed" and len(set(ids)) == len(ids)
    # Resumed from every offset, on either web process: the rest, with no gap.
    for cut in range(1, len(log)):
        web = cluster_stack.webs[cut % 2]
        _, rest = read_stream(
            f"{web.url}/api/jobs/{job['id']}/events",
            headers={"Last-Event-ID": str(ids[cut - 1])},
            timeout=30,
        )
        assert [event.id for event in rest] == ids[cut:]
    # Stored on the cluster, not on REDIS_URL: the queue plane holds no record.
    with cluster_stack.redis() as queue_plane:
        assert not list(queue_plane.scan_iter(f"{cluster_stack.prefix}*job:*"))
    held = primaries_keys(valkey_cluster, cluster_stack.prefix)
    assert any(key.endswith(f"job:{{{job['id']}}}") for keys in held.values() for key in keys)
    listed = http.get(f"{second.url}/api/jobs", timeout=10).json()
    assert job["id"] in [item["id"] for item in listed["jobs"]]
    # The deployment's figures, summed over every partition's counters.
    stats = http.get(f"{second.url}/api/stats", timeout=10).json()
    assert stats["tasks"]["analyze_document"]["counts"]["completed"] >= 1
    metrics = http.get(f"{first.url}/metrics", timeout=10).text
    assert 'stepstream_jobs_submitted_total{task="analyze_document"}' in metrics


def test_the_firehose_merges_every_partition_live_and_resumes_from_any_event(
    cluster_stack: Stack,
) -> None:
    """Jobs in several partitions (on several primaries): a firehose viewer on one web process
    gets each of their events once, live; resumed on the other web process from any event it
    saw, it gets exactly the events it had not seen then, from every partition."""
    first, second = cluster_stack.webs
    keys = Keys(cluster_stack.prefix, Settings().cluster_partitions)
    doc = {"text": api.DOC, "pace": 0.0}
    # From the start of the log: the first job's events come from the replay or live; the
    # others are submitted once the viewer has the first's, so they come live.
    live = StreamReader(f"{first.url}/api/events?after=0", timeout=60).start()
    try:
        jobs = [api.submit(second.url, "analyze_document", doc)]
        live.wait_for(
            lambda events: any(
                e.type == "completed" and e.data.get("job_id") == jobs[0]["id"] for e in events
            ),
            timeout=30,
        )
        jobs += [api.submit(second.url, "analyze_document", doc) for _ in range(5)]
        partitions = {keys.partition_of(job["id"]) for job in jobs}
        assert len(partitions) >= 2, "the jobs all landed in one partition: nothing to merge"
        logs: dict[str, list[str]] = {}
        for job in jobs:
            _, log = read_stream(f"{first.url}/api/jobs/{job['id']}/events?after=0", timeout=30)
            assert log[-1].type == "completed", [e.type for e in log]
            logs[job["id"]] = [str(e.id) for e in log]
        wanted = sum(len(log) for log in logs.values())

        def mine(events: list[Any]) -> list[tuple[str, str]]:
            return [
                (e.data["job_id"], e.data["event_id"])
                for e in events
                if isinstance(e.data, dict) and e.data.get("job_id") in logs
            ]

        live.wait_for(lambda events: len(mine(events)) >= wanted, timeout=30)
    finally:
        live.close()
    seen = mine(live.events)
    assert len(seen) == wanted and len(set(seen)) == wanted, "each event once"
    for job_id, log in logs.items():
        assert [i for j, i in seen if j == job_id] == log, "a job's events in its log's order"
    # Every frame's id is a cursor over every partition.
    framed = [e for e in live.events if isinstance(e.data, dict) and e.data.get("job_id") in logs]
    assert all(len(str(e.id).split(".")) == keys.partitions for e in framed)
    for cut in (1, len(framed) // 2, len(framed) - 1):
        unseen = len(framed) - cut
        rest = StreamReader(
            f"{second.url}/api/events", headers={"Last-Event-ID": str(framed[cut - 1].id)}
        ).start()
        try:
            rest.wait_for(lambda events: len(mine(events)) >= unseen, timeout=20)  # noqa: B023
        finally:
            rest.close()
        assert sorted(mine(rest.events)) == sorted(mine(framed[cut:])), f"resumed after {cut}"
    bad = http.get(f"{first.url}/api/events", headers={"Last-Event-ID": "1-0.2-0"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_cursor"


def test_a_watched_jobs_events_arrive_live_from_the_cluster(
    cluster_stack: Stack, valkey_cluster: ValkeyCluster
) -> None:
    """Each event is let out by the test (the task waits on its gate, a key on the cluster)
    while the stream is open: it can only arrive through the live delivery."""
    first, second = cluster_stack.webs
    job = api.submit(first.url, "gated", {"events": 3})
    reader = StreamReader(f"{second.url}/api/jobs/{job['id']}/events").start()
    gate = redis.RedisCluster(host="127.0.0.1", port=valkey_cluster.seed.port)
    try:
        reader.wait_for(lambda evs: len(evs) >= 1)  # subscribed: what follows arrives live
        for n in range(1, 4):
            gate.rpush(gate_key(job["id"]), "go")
            reader.wait_for(lambda evs, n=n: sum(e.type == "progress" for e in evs) == n)
        events = reader.wait_closed()
    finally:
        reader.close()
        gate.close()
    assert [e.data["current"] for e in events if e.type == "progress"] == [1, 2, 3]
    assert events[-1].type == "completed"


def test_cancel_retry_idempotency_batches_input_and_webhooks_on_the_cluster(
    cluster_stack: Stack, valkey_cluster: ValkeyCluster
) -> None:
    web = cluster_stack.webs[0]
    receiver = Receiver().start()
    try:
        # Cancel: a running job is asked to stop through its flag (a key on the cluster).
        gated = api.submit(web.url, "gated", {"events": 3})
        api.wait_state(web.url, gated["id"], {"running"})
        assert http.post(f"{web.url}/api/jobs/{gated['id']}/cancel").status_code == 202
        api.wait_state(web.url, gated["id"], {"cancelled"})
        # Retry by hand: the failed job is queued again (its arq entry through the outbox).
        failing = api.submit(web.url, "refuses", {"message": "no"})
        api.wait_state(web.url, failing["id"], {"failed"})
        assert http.post(f"{web.url}/api/jobs/{failing['id']}/retry").status_code == 202
        assert api.wait_state(web.url, failing["id"], {"failed"})["attempt"] == 2
        # An Idempotency-Key: the same request again gets the job it made.
        body = {"task": "analyze_document", "input": {"text": api.DOC, "pace": 0.0}}
        key = {"Idempotency-Key": "cluster-key-1"}
        first = http.post(f"{web.url}/api/jobs", json=body, headers=key, timeout=10)
        again = http.post(f"{web.url}/api/jobs", json=body, headers=key, timeout=10)
        assert (first.status_code, again.status_code) == (202, 200)
        assert first.json()["id"] == again.json()["id"]
        # A batch: its parent and children in one partition, counted to the end.
        batch = http.post(
            f"{web.url}/api/batches",
            json={"task": "analyze_document", "inputs": [{"text": api.DOC, "pace": 0.0}] * 3},
            timeout=30,
        )
        assert batch.status_code == 202, batch.text
        done = api.wait_state(web.url, batch.json()["id"], {"completed", "failed"})
        assert done["state"] == "completed" and done["batch"]["completed"] == 3
        # Human input: the answer queues the job again (its entry through the outbox).
        asking = api.submit(web.url, "asks", {})
        api.wait_state(web.url, asking["id"], {"waiting"})
        answer = {"name": "decision", "value": {"approved": True}}
        assert http.post(f"{web.url}/api/jobs/{asking['id']}/input", json=answer).status_code in (
            200,
            202,
        )
        finished = api.wait_state(web.url, asking["id"], {"completed"})
        assert finished["result"]["decision"]["approved"] is True
        # A webhook: the terminal event's delivery, from its partition's outbox.
        hooked = http.post(
            f"{web.url}/api/jobs",
            json={**body, "callback_url": receiver.url()},
            timeout=10,
        ).json()
        api.wait_state(web.url, hooked["id"], {"completed"})
        wait_until(lambda: receiver.for_job(hooked["id"]), timeout=20, what="the callback")
        (delivery,) = receiver.for_job(hooked["id"])
        assert delivery.body["type"] == "job.completed"
        assert delivery.signed_with("cluster-webhook-secret")
    finally:
        receiver.stop()


def test_a_job_waits_for_its_children_and_grandchildren_on_the_cluster(
    cluster_stack: Stack,
) -> None:
    """Each fan-out's children are created in their parent's partition (one ``MULTI`` on its
    node), and the last child's end writes the waiting parent's queue entry through the
    partition's queue outbox (tasks/scripts/resume_parent.lua)."""
    web = cluster_stack.webs[1]
    parent = api.submit(web.url, "fan_out", {"depth": 2})
    done = api.wait_state(web.url, parent["id"], {"completed", "failed"}, timeout=60)
    assert done["state"] == "completed", done.get("error")
    assert done["result"]["squares"] == [0, 1, 0, 1]
    children = http.get(f"{web.url}/api/jobs?parent={parent['id']}", timeout=10).json()
    assert [child["state"] for child in children["jobs"]] == ["completed", "completed"]


def snapshot(stack: Stack, cluster: ValkeyCluster) -> dict[str, str]:
    """Every key of job data under the stack's prefix, on both planes, with a digest of its
    value (as tests/test_jobs.py's ``store_snapshot``, over every primary too)."""
    housekeeping = ("worker", "webhook-settings", "count:", "duration:", "durations:", "rate:")
    clients = [shard.primary.client() for shard in cluster.shards]
    out: dict[str, str] = {}
    with redis.Redis.from_url(stack.valkey.url, decode_responses=True) as queue_plane:
        for client in [queue_plane, *clients]:
            for key in client.scan_iter(f"{stack.prefix}*", count=1_000):
                name = key.removeprefix(stack.prefix)
                if name.startswith("{"):
                    name = name.split("}:", 1)[1]  # a partition's tag
                if name.startswith(housekeeping):
                    continue
                out[key] = key_value(client, key)
            client.close()
    return out


def test_a_refused_request_changes_nothing_on_the_cluster(
    cluster_stack: Stack, valkey_cluster: ValkeyCluster
) -> None:
    web = cluster_stack.webs[0]
    done = api.submit(web.url, "analyze_document", {"text": api.DOC, "pace": 0.0})
    api.wait_state(web.url, done["id"], {"completed"})
    body = {"task": "analyze_document", "input": {"text": api.DOC, "pace": 0.0}}
    key = {"Idempotency-Key": "cluster-refusals"}
    keyed = http.post(f"{web.url}/api/jobs", json=body, headers=key)
    assert keyed.status_code == 202
    api.wait_state(web.url, keyed.json()["id"], {"completed"})
    # At rest: what the ends left for after their scripts (their owner's places) has run.
    wait_until(
        lambda: (
            not any(k.endswith("queue-outbox") for k in snapshot(cluster_stack, valkey_cluster))
        ),
        timeout=20,
        what="the queue outboxes empty",
    )
    before = snapshot(cluster_stack, valkey_cluster)
    assert any(done["id"] in k for k in before)  # the snapshot does see the cluster's keys
    refusals = [
        # Over the owner's unfinished-jobs limit (20): refused by the owner's home partition.
        (
            "/api/batches",
            {"task": "analyze_document", "inputs": [{"text": "x", "pace": 0.0}] * 21},
            {},
            429,
        ),
        ("/api/jobs", {"task": "analyze_document", "input": {"txet": "x"}}, {}, 422),
        ("/api/jobs", {**body, "input": {"text": "other"}}, key, 409),
        (f"/api/jobs/{done['id']}/retry", None, {}, 409),
        (f"/api/jobs/{done['id']}/cancel", None, {}, 409),
        (f"/api/jobs/{done['id']}/input", {"name": "decision", "value": {}}, {}, 409),
    ]
    for path, payload, headers, status in refusals:
        response = http.post(f"{web.url}{path}", json=payload, headers=headers, timeout=30)
        assert response.status_code == status, (path, response.text)
    assert snapshot(cluster_stack, valkey_cluster) == before


def test_a_steps_streamed_text_on_the_cluster(cluster_stack: Stack) -> None:
    """Output events and the step's text so far (a key of the job's own, in its partition)."""
    web = cluster_stack.webs[0]
    job = api.submit(web.url, "streamer", {"words": 60, "word_seconds": 0.002})
    done = api.wait_state(web.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    _, log = read_stream(f"{cluster_stack.webs[1].url}/api/jobs/{job['id']}/events?after=0")
    assert assemble(log) == streamed_text(60) == done["steps"][1]["text"]


@pytest.mark.slow  # a cluster of its own, whose primary it kills
def test_jobs_finish_whole_when_a_cluster_primary_is_killed(
    valkey: Valkey, own_cluster: ValkeyCluster, tmp_path: Path
) -> None:
    """SIGKILL a primary (not the seed, where the hub listens) while jobs run, some of them in
    its partitions: its replica takes its slots, and every job ends completed with its log
    whole, each event once."""
    stack = Stack(
        valkey,
        f"cfail{next(_prefixes)}:",
        tmp_path,
        {"STEPSTREAM_CLUSTER_URL": own_cluster.url},
    )
    try:
        stack.add(webs=1, workers=1)
        web = stack.webs[0]
        keys = Keys(stack.prefix, Settings().cluster_partitions)
        victim = own_cluster.shards[1]
        jobs: list[str] = []
        on_victim: list[str] = []
        # Jobs spread at random: submitted until two live on the killed primary's slots.
        while len(on_victim) < 2 and len(jobs) < 40:
            job_id = api.submit(web.url, "analyze_document", {"text": api.DOC, "pace": 0.6})["id"]
            jobs.append(job_id)
            if own_cluster.shard_of(int(key_slot(keys.job(job_id).encode()))) is victim:
                on_victim.append(job_id)
        assert len(on_victim) == 2, "no job on the primary to kill: the test would prove nothing"
        api.wait_state(web.url, on_victim[-1], {"running"})
        own_cluster.kill_primary(victim)
        # Killed while they ran: their ends came after the failover.
        for job_id in jobs:
            done = api.wait_state(web.url, job_id, {"completed", "failed"}, timeout=60)
            assert done["state"] == "completed", (job_id, done["error"])
            _, log = read_stream(f"{web.url}/api/jobs/{job_id}/events?after=0", timeout=30)
            ids = [event.id for event in log]
            assert len(set(ids)) == len(ids), job_id  # no event twice
            types = [event.type for event in log]
            assert types[:2] == ["queued", "started"] and types[-1] == "completed", types
            assert types.count("started") == 1, types  # not run again
    finally:
        stack.stop()


def test_doctor_checks_the_cluster_and_its_queue_outboxes(
    cluster_stack: Stack, valkey_cluster: ValkeyCluster
) -> None:
    web = cluster_stack.webs[0]
    job = api.submit(web.url, "analyze_document", {"text": api.DOC, "pace": 0.0})
    api.wait_state(web.url, job["id"], {"completed"})
    good = doctor(cluster_stack.env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "cluster reachable, state ok, 3 primaries" in good.stdout
    # An entry left behind long ago that the workers cannot run (the queue plane refuses its
    # command, so it stays, as while REDIS_URL is unreachable from them): the doctor says so.
    keys = Keys(cluster_stack.prefix, Settings().cluster_partitions)
    outbox = keys.at(5).queue_outbox
    refused = ["INCR", [f"{cluster_stack.prefix}refused"], ["an argument INCR does not take"], True]
    stale = json.dumps({"at": 1_000, "commands": [refused]})
    with redis.RedisCluster(host="127.0.0.1", port=valkey_cluster.seed.port) as client:
        client.hset(outbox, "stale", stale)
        try:
            bad = doctor(cluster_stack.env)
        finally:
            client.hdel(outbox, "stale")
    assert bad.returncode == 1
    assert "1 queue outbox entry(ies) older than a minute" in bad.stdout


def test_recurring_and_delayed_jobs_on_the_cluster(
    valkey: Valkey, valkey_cluster: ValkeyCluster, tmp_path: Path
) -> None:
    """A recurring tick creates its job on the cluster (arq's cron on the queue plane); a
    delayed job's deferred entry goes through the queue outbox and runs at its time."""
    stack = Stack(
        valkey,
        f"crec{next(_prefixes)}:",
        tmp_path,
        {
            "STEPSTREAM_CLUSTER_URL": valkey_cluster.url,
            "STEPSTREAM_TASK_MODULES": "tests.support.ai_tasks,tests.support.ai_recurring",
        },
    )
    try:
        stack.add(webs=1, workers=1)
        web = stack.webs[0]
        delayed = http.post(
            f"{web.url}/api/jobs",
            json={"task": "ai_echo", "input": {"counter": "later"}, "delay": 1},
            timeout=10,
        ).json()
        assert delayed["state"] == "scheduled"
        done = api.wait_state(web.url, delayed["id"], {"completed"}, timeout=30)
        assert done["started_at"] >= done["run_at"]

        def ticks() -> list[dict[str, Any]]:
            listed = http.get(f"{web.url}/api/jobs?task=ai_echo&limit=50", timeout=10).json()
            return [
                j for j in listed["jobs"] if j["state"] == "completed" and j["id"] != done["id"]
            ]

        wait_until(lambda: len(ticks()) >= 2, timeout=30, what="two recurring ticks' jobs")
        _, log = read_stream(f"{web.url}/api/jobs/{ticks()[0]['id']}/events?after=0")
        assert log[0].data["recurring"] == "tick" and log[-1].type == "completed"
    finally:
        stack.stop()


def test_processes_find_the_cluster_from_any_seed_that_answers(
    valkey: Valkey, valkey_cluster: ValkeyCluster, tmp_path: Path
) -> None:
    """``STEPSTREAM_CLUSTER_URL`` may name several seeds: a web process and a worker started
    while the first is down (a node being replaced) learn the cluster from the next, and the
    doctor reaches it the same way."""
    down = f"redis://127.0.0.1:{free_port()}"
    stack = Stack(
        valkey,
        f"seeds{next(_prefixes)}:",
        tmp_path,
        {"STEPSTREAM_CLUSTER_URL": f"{down}, {valkey_cluster.url}"},
    )
    try:
        stack.add(webs=1, workers=1)
        job = api.submit(stack.url, "analyze_document", {"text": api.DOC, "pace": 0.0})
        api.wait_state(stack.url, job["id"], {"completed"})
        found = doctor(stack.env)
        assert "cluster reachable, state ok, 3 primaries" in found.stdout, found.stdout
    finally:
        stack.stop()


def test_a_script_runs_on_a_primary_that_has_not_cached_it_whatever_the_map_says(
    valkey: Valkey, valkey_cluster: ValkeyCluster
) -> None:
    """A promoted replica has none of its old primary's cached scripts, and a cluster client
    may still hold it for a replica. redis-py's own fallback then loads the script on the
    primaries it knows, runs it by SHA1 again on the promoted node, and fails every time: a
    task's concurrency slot could not be taken after a failover, and its jobs never started
    (bench.chaos --cluster). The job side's scripts run by their body there instead."""
    settings = two_planes(valkey, valkey_cluster)

    async def run() -> None:
        async with opened(settings) as (store, _):
            client: Any = store.redis
            await client.initialize()
            source = "return redis.call('INCR', KEYS[1])"
            key = f"{settings.prefix}counted"
            owner = client.nodes_manager.get_node_from_slot(key_slot(key.encode()))
            node = next(n for n in valkey_cluster.nodes if n.port == owner.port)
            # The map as it lags a failover: the slot's owner is not among the primaries.
            owner.server_type = REPLICA
            with node.client() as direct:
                direct.script_flush()
            with pytest.raises(NoScriptError):
                await client.register_script(source)(keys=[key])  # redis-py's own
            with node.client() as direct:
                direct.script_flush()
            assert await lua.Script(client, source)(keys=[key]) == 1
            assert await lua.Script(client, source)(keys=[key]) == 2  # cached there now

    asyncio.run(run())


def test_a_resume_cut_by_its_primarys_death_is_answered_by_the_promoted_replica(
    valkey: Valkey, own_cluster: ValkeyCluster
) -> None:
    """A stream's read of the log (``resume``: its trim state and the events after a cursor)
    sent to a primary that has just died is tried again until its replica takes over: the
    client's patience with a failover, not an error that ends every stream reading then."""
    settings = two_planes(valkey, own_cluster)
    shard = own_cluster.shards[0]
    [replica] = shard.replicas
    first, last = shard.slots

    async def run() -> None:
        async with opened(settings) as (store, _):
            job_id = next(
                job_id
                for job_id in iter(new_job_id, None)
                if first <= key_slot(store.keys.job_events(job_id).encode()) <= last
            )
            key = store.keys.job_events(job_id)
            # Through the store's client: it holds a connection to the primary from here.
            ids = [await store.redis.xadd(key, {"e": "{}"}) for _ in range(3)]
            with shard.primary.client() as node:
                assert node.wait(1, 5_000) == 1  # the replica has them before the kill
            shard.primary.kill()
            resuming = asyncio.create_task(store.resume(job_id, "0-0", 100))
            await asyncio.sleep(0.05)
            assert not resuming.done() and replica.role() != "master", "read after the failover"
            await asyncio.to_thread(own_cluster.kill_primary, shard)  # waits for the promotion
            info, rows = await asyncio.wait_for(resuming, timeout=60)
            assert info is not None and [entry_id for entry_id, _ in rows] == ids

    asyncio.run(run())
