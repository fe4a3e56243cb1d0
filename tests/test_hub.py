"""Delivery across processes and faults: scale-out, a Valkey restart, a slow consumer, and
the channels each web process listens to."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from stepstream.server.hub import Frame, Hub
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore, new_event
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import DOC, submit, wait_state
from tests.support.processes import Valkey, wait_until
from tests.support.records import running_record
from tests.support.sse import StreamReader, read_stream
from tests.support.tasks import gate_key


def events_url(base: str, job_id: str) -> str:
    return f"{base}/api/jobs/{job_id}/events"


def test_two_webs_and_two_workers_deliver_everything_everywhere(
    make_stack: StackFactory,
) -> None:
    # One job at a time per worker: the second worker runs jobs even if it is slow to poll on a
    # loaded machine (with ten slots, the first could take all six).
    s = make_stack(webs=2, workers=2, STEPSTREAM_MAX_JOBS="1")
    a, b = s.webs
    jobs = [
        submit(a.url if i % 2 else b.url, "analyze_document", {"text": DOC, "pace": 0.05})
        for i in range(6)
    ]
    readers = [
        StreamReader(events_url(web.url, job["id"]), {"Last-Event-ID": "0"}).start()
        for job in jobs
        for web in (a, b)
    ]
    logs = [r.wait_closed(timeout=60) for r in readers]
    for first, second in zip(logs[::2], logs[1::2], strict=True):
        assert [e.type for e in first][-1] == "completed"
        assert [e.id for e in first] == [e.id for e in second]
    ran = [sum(job["id"] in w.log() for job in jobs) for w in s.workers]
    assert sum(ran) == 6 and all(ran), f"both workers should have run jobs: {ran}"


def test_a_client_resumes_on_another_web_process(make_stack: StackFactory) -> None:
    s = make_stack(webs=2, workers=1)
    a, b = s.webs
    job = submit(a.url, "analyze_document", {"text": DOC, "pace": 0.1})
    first = StreamReader(events_url(a.url, job["id"])).start()
    first.wait_for(lambda evs: any(e.type == "step" and e.data["step"]["index"] >= 3 for e in evs))
    first.close()
    cursor = first.events[-1].id
    assert cursor
    status, rest = read_stream(events_url(b.url, job["id"]), {"Last-Event-ID": cursor})
    assert status == 200 and rest[-1].type == "completed"
    _, full = read_stream(events_url(a.url, job["id"]) + "?after=0")
    ids = [e.id for e in full]
    assert [e.id for e in rest] == ids[ids.index(cursor) + 1 :]


@pytest.mark.slow  # restarts Valkey
def test_the_hub_survives_a_valkey_restart(own_valkey: Valkey, tmp_path: Path) -> None:
    s = Stack(own_valkey, "restart:", tmp_path)
    try:
        s.add_web()
        queued = submit(s.url, "analyze_document", {"text": DOC})
        job_stream = StreamReader(events_url(s.url, queued["id"])).start()
        firehose = StreamReader(f"{s.url}/api/events").start()
        job_stream.wait_for(lambda evs: [e.type for e in evs] == ["snapshot"])
        # The firehose shows nothing until events: the hub's count says it is attached too.
        wait_until(lambda: stats(s.url)["streams_open"] == 2, timeout=10, what="both attached")

        r = s.redis()
        hub_channels = {f"restart:job:{{{queued['id']}}}:live", "restart:live"}
        own_valkey.restart()
        # Subscribed again to the watched job's channel and the firehose's, not just reconnected.
        wait_until(
            lambda: (
                set(r.pubsub_shardchannels("restart:*")) == hub_channels
                and "restart:hub" in r.pubsub_channels("restart:*")
            ),
            timeout=20,
            what="the hub's channels subscribed again",
        )
        # A worker started now writes while the web process's hub is still reconnecting.
        s.add_worker()
        later = submit(s.url, "generate_quote", {"roles": [{"role": "qa_engineer"}], "weeks": 2})
        wait_state(s.url, later["id"], {"completed"})

        events = job_stream.wait_closed(timeout=30)
        types = [e.type for e in events]
        assert types[0] == "snapshot" and types[1] == "started" and types[-1] == "completed"
        assert types.count("step") == 7
        firehose.wait_for(
            lambda evs: any(e.type == "completed" and e.data["job_id"] == later["id"] for e in evs)
        )
        ids = [e.id for e in firehose.events]
        assert len(ids) == len(set(ids)), "the firehose repeated an event"
        firehose.close()
        firehose_jobs = {e.data["job_id"] for e in firehose.events}
        assert firehose_jobs == {queued["id"], later["id"]}
    finally:
        s.stop()


def test_a_slow_consumer_is_cut_off_and_nothing_is_held_for_it(make_stack: StackFactory) -> None:
    s = make_stack(
        webs=1,
        workers=1,
        STEPSTREAM_SUBSCRIBER_QUEUE="200",
        # Long, so the queue is what cuts the slow client off: on a loaded machine a 2 s send
        # timeout came first (the burst slows down too), and that path is not what this tests.
        STEPSTREAM_SEND_TIMEOUT_SECONDS="30",
    )
    web = s.webs[0]
    # A client that never reads, with a tiny receive buffer so the server's writes back up.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", web.port))
    slow.sendall(
        b"GET /api/events?after=0 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    )
    healthy = StreamReader(f"{s.url}/api/events", timeout=120).start()
    wait_until(lambda: stats(s.url)["streams_open"] == 2, timeout=10, what="both streams open")

    # 3,000 events of ~4 KB: 12 MB, more than the kernel buffers between the two can hold. At
    # about 2,500 a second: a task's tight loop goes several times faster (tasks/writer.py), which
    # would make the healthy reader here, a Python thread, the next slow consumer on a busy CI.
    burst = submit(s.url, "burst", {"events": 3_000, "padding": 4_000, "interval": 0.0004})
    healthy.wait_for(
        lambda evs: any(e.type == "completed" and e.data["job_id"] == burst["id"] for e in evs),
        timeout=60,
    )
    progress = [
        e for e in healthy.events if e.type == "progress" and e.data["job_id"] == burst["id"]
    ]
    assert [e.data["current"] for e in progress] == list(range(1, 3_001))

    # The slow client is disconnected: draining its socket ends in EOF.
    slow.settimeout(20)
    received = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        chunk = slow.recv(65536)
        if not chunk:
            break
        received += len(chunk)
    else:
        pytest.fail("the slow consumer was never disconnected")
    slow.close()
    assert received < 3_000 * 4_000, "the slow consumer got everything: it was not cut off"
    # Cut off for falling behind (its queue was full), not for a send that timed out: what the
    # server held for it never went past STEPSTREAM_SUBSCRIBER_QUEUE events. This replaces a
    # bound on the process's RSS, which measured the allocator as much as the hub.
    metrics = http.get(f"{s.url}/metrics", timeout=10).text
    assert "stepstream_sse_slow_consumers_dropped_total 1.0" in metrics
    assert stats(s.url)["streams_open"] == 1, "only the healthy reader (idle now) is attached"
    healthy.close()
    wait_until(lambda: stats(s.url)["streams_open"] == 0, timeout=10, what="the reader gone")


def stats(base: str) -> dict[str, Any]:
    response = http.get(f"{base}/api/stats", timeout=10)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def listeners(r: redis.Redis, channel: str) -> int:
    """The subscribers of a sharded channel (a job's, the firehose's)."""
    ((_, count),) = r.pubsub_shardnumsub(channel)
    return int(count)


def test_a_web_process_listens_only_to_the_channels_its_viewers_watch(
    make_stack: StackFactory,
) -> None:
    s = make_stack(webs=2, workers=1)
    a, b = s.webs
    r = s.redis()
    job = submit(a.url, "gated", {"events": 2})
    job_channel = f"{s.prefix}job:{{{job['id']}}}:live"
    firehose_channel = f"{s.prefix}live"
    # With no viewers a web process hears no event: each holds only its hub's own channel
    # (and the worker its wake-ups'), and no sharded channel.
    # (The worker subscribes to its wake-ups once it has started: wait for that, not the webs.)
    expected = {f"{s.prefix}hub", f"{s.prefix}queue:wakeups"}
    wait_until(
        lambda: set(r.pubsub_channels(f"{s.prefix}*")) >= expected,
        timeout=10,
        what="the worker's wake-ups subscription",
    )
    assert set(r.pubsub_channels(f"{s.prefix}*")) == expected
    assert r.pubsub_shardchannels(f"{s.prefix}*") == []
    ((_, webs),) = r.pubsub_numsub(f"{s.prefix}hub")
    assert webs == 2

    watchers = [StreamReader(events_url(a.url, job["id"])).start() for _ in range(2)]
    for watcher in watchers:
        # The worker may start the job meanwhile: the snapshot comes first, live events after it.
        watcher.wait_for(lambda evs: bool(evs) and evs[0].type == "snapshot")
    # Two viewers on one process: one subscription, on that process only.
    assert listeners(r, job_channel) == 1
    assert listeners(r, firehose_channel) == 0
    firehose = StreamReader(f"{b.url}/api/events").start()
    wait_until(lambda: listeners(r, firehose_channel) == 1, timeout=10, what="the firehose")
    try:
        r.rpush(gate_key(job["id"]), "go", "go")
        for watcher in watchers:
            events = watcher.wait_closed()
            assert [e.data["current"] for e in events if e.type == "progress"] == [1, 2]
            assert events[-1].type == "completed"
        firehose.wait_for(
            lambda evs: any(e.type == "completed" and e.data["job_id"] == job["id"] for e in evs)
        )
        mine = [e for e in firehose.events if e.data["job_id"] == job["id"]]
        assert [e.data["current"] for e in mine if e.type == "progress"] == [1, 2]
        # The last viewer of the job gone, its process stops listening to it.
        wait_until(lambda: listeners(r, job_channel) == 0, timeout=10, what="job unsubscribed")
    finally:
        firehose.close()
    wait_until(lambda: listeners(r, firehose_channel) == 0, timeout=10, what="firehose left")


def test_a_viewer_arriving_while_the_last_one_leaves_gets_every_event(valkey: Valkey) -> None:
    asyncio.run(_arrive_while_leaving(valkey.url))


async def _arrive_while_leaving(url: str) -> None:
    store = JobStore(
        Redis.from_url(url, decode_responses=True), Settings(redis_url=url, prefix="hub-race:")
    )
    # Each SUBSCRIBE a viewer asks for goes out this late (an UNSUBSCRIBE at once): a viewer
    # that took the previous viewer's subscription, or its confirmation, for its own would read
    # the log and miss what is appended while Valkey has no subscriber.
    hub = Hub(
        Redis.from_url(url, decode_responses=True),
        store.keys,
        queue_size=100,
        heartbeat_seconds=15,
        subscribe_delay_seconds=0.5,
    )
    await hub.start()
    job_id = f"j{time.monotonic_ns()}"
    channel = store.keys.job_channel(job_id)

    async def listening() -> int:
        ((_, count),) = await store.redis.pubsub_shardnumsub(channel)
        return int(count)

    async def arrives(job_id: str, current: int) -> None:
        viewer = hub.subscribe(job_id)
        await asyncio.wait_for(hub.joined(viewer), timeout=10)
        assert await listening() == 1, "joined before Valkey held the subscription"
        appended = await store.append(job_id, new_event(job_id, "progress", 0, current=current), {})
        items = await asyncio.wait_for(viewer.take(), timeout=10)
        assert [i.job_event_id for i in items if isinstance(i, Frame)] == [
            tuple(int(part) for part in (appended.job_event_id or "").split("-"))
        ]
        hub.unsubscribe(viewer)

    try:
        assert (await store.create(running_record(job_id), new_event(job_id, "started", 0))).ok
        # A viewer whose subscription was confirmed leaves; the next comes before Valkey has
        # run the UNSUBSCRIBE.
        first = hub.subscribe(job_id)
        await asyncio.wait_for(hub.joined(first), timeout=10)
        hub.unsubscribe(first)
        await arrives(job_id, 1)
        # A viewer leaves before its own SUBSCRIBE was even sent; the next one's confirmation
        # is the second "subscribe" Valkey answers, not the first.
        hub.unsubscribe(hub.subscribe(job_id))
        await arrives(job_id, 2)
        for _ in range(100):
            if await listening() == 0:
                break
            await asyncio.sleep(0.05)
        assert await listening() == 0, "the hub kept a channel no viewer needs"
    finally:
        await hub.stop()
        await hub.router.aclose()
        await store.redis.aclose()
