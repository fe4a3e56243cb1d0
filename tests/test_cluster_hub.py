"""Live delivery on a real Valkey Cluster (3 primaries, 3 replicas): the hub subscribes with
``SSUBSCRIBE`` on the primary of each channel's slot, only for the jobs its viewers watch,
reads the log only once the subscription holds, and comes back on a promoted replica with no
gap. The store does not run on a cluster yet: these append like its script does (``XADD`` on
the job's log, then ``SPUBLISH`` of the stored event on the job's channel, in one call under
the job's hash tag) through the log plane's cluster client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from stepstream.server.hub import RESYNC, Frame, Hub, Subscriber
from stepstream.server.shards import ClusterSlots
from stepstream.server.streams import JobStream
from stepstream.tasks.connection import connect_cluster
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import new_job_id, parse_stream_id
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore, new_event
from tests.support.cluster import ClusterNode, Shard, ValkeyCluster
from tests.support.monitor import Monitor
from tests.support.processes import wait_until
from tests.support.records import running_record

PREFIX = "live:"
KEYS = Keys(PREFIX)
TIMEOUT = 10.0

# The append's log write and live message, as tasks/scripts/append.lua makes them: the event
# stored, then published with its id on the job's channel (returns the id and the receivers).
APPEND = """
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
local heard = redis.call('SPUBLISH', KEYS[2], '{"job_event_id":"' .. id ..
  '","firehose_id":"' .. id .. '","owner":null,"event":' .. ARGV[1] .. '}')
return {id, heard}
"""


def job_on(shard: Shard) -> str:
    """A new job id whose keys and channel live in ``shard``'s slots."""
    first, last = shard.slots
    while True:
        job_id = new_job_id()
        if first <= key_slot(KEYS.job_channel(job_id).encode()) <= last:
            return job_id


def address(shard: Shard) -> str:
    return f"127.0.0.1:{shard.primary.port}"


async def append(
    client: RedisCluster, job_id: str, type_: str, *, names: Keys = KEYS, **data: Any
) -> tuple[str, int]:
    """Append an event to ``job_id``'s log and publish it: (its id, how many heard it)."""
    event = json.dumps(new_event(job_id, type_, 0, **data), default=str, separators=(",", ":"))
    keys = [names.job_events(job_id), names.job_channel(job_id)]
    event_id, heard = await client.eval(APPEND, 2, *keys, event)
    return str(event_id), int(heard)


def cluster_client(cluster: ValkeyCluster) -> RedisCluster:
    return connect_cluster(Settings(cluster_url=cluster.url, prefix=PREFIX))


@contextlib.asynccontextmanager
async def cluster_hub(
    cluster: ValkeyCluster,
    subscribe_delay_seconds: float = 0.0,
    router: ClusterSlots | None = None,
    names: Keys = KEYS,
) -> AsyncIterator[tuple[Hub, RedisCluster]]:
    """A hub on the cluster (its own cluster client for the slot map, or ``router``), and a
    client to append."""
    client = cluster_client(cluster)
    router = router or ClusterSlots(cluster_client(cluster))
    hub = Hub(
        None,
        names,
        queue_size=100,
        heartbeat_seconds=15,
        subscribe_delay_seconds=subscribe_delay_seconds,
        router=router,
    )
    await hub.start()
    try:
        yield hub, client
    finally:
        await hub.stop()
        await router.aclose()
        await client.aclose()


async def watch(hub: Hub, job_id: str | None) -> Subscriber:
    viewer = hub.subscribe(job_id)
    await asyncio.wait_for(hub.joined(viewer), timeout=TIMEOUT)
    return viewer


async def frames(viewer: Subscriber) -> list[Frame]:
    items = await asyncio.wait_for(viewer.take(), timeout=TIMEOUT)
    return [item for item in items if isinstance(item, Frame)]


async def eventually(condition: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_a_hub_hears_the_jobs_its_viewers_watch_on_every_primary_and_no_other(
    valkey_cluster: ValkeyCluster,
) -> None:
    asyncio.run(_hears_what_it_watches(valkey_cluster))


async def _hears_what_it_watches(cluster: ValkeyCluster) -> None:
    shards = cluster.shards
    watched = [job_on(shard) for shard in shards]
    unwatched = [job_on(shard) for shard in shards]
    async with cluster_hub(cluster) as (hub, client):
        # No viewer: no connection to any node, so no event of the deployment reaches it.
        assert hub.links == {}
        assert hub.connected.is_set()
        viewers = {job_id: await watch(hub, job_id) for job_id in watched[:2]}
        # One connection per primary serving a watched job, and only those.
        assert set(hub.links) == {address(shards[0]), address(shards[1])}
        viewers[watched[2]] = await watch(hub, watched[2])
        assert set(hub.links) == {address(shard) for shard in shards}
        for job_id in watched:
            event_id, heard = await append(client, job_id, "progress", current=1)
            assert heard == 1, "the watched job's primary had no subscriber"
            [frame] = await frames(viewers[job_id])
            assert (frame.job_id, frame.job_event_id) == (job_id, parse_stream_id(event_id))
        for job_id in unwatched:
            _, heard = await append(client, job_id, "progress", current=1)
            assert heard == 0, "a job nobody here watches reached the hub"
        assert all(not viewer.items for viewer in viewers.values())

        # Twenty viewers of twenty jobs of one primary, arriving together: their SSUBSCRIBEs go
        # out together, one per slot (one naming channels of two slots would be refused and
        # cost the connection).
        burst = [job_on(shards[0]) for _ in range(20)]
        crowd = [hub.subscribe(job_id) for job_id in burst]
        await asyncio.wait_for(asyncio.gather(*(hub.joined(v) for v in crowd)), TIMEOUT)
        for job_id, viewer in zip(burst, crowd, strict=True):
            _, heard = await append(client, job_id, "progress", current=1)
            assert heard == 1
            assert [frame.job_id for frame in await frames(viewer)] == [job_id]
            hub.unsubscribe(viewer)
        assert hub.reconnects == 0, "a connection was lost on the way"

        # The firehose's channel is subscribed only while a firehose viewer is connected.
        firehose = await watch(hub, None)
        [channel] = KEYS.firehose_channels
        assert await client.execute_command("SPUBLISH", channel, live_message(watched[0])) == 1
        [frame] = await frames(firehose)
        assert frame.job_id == watched[0] and frame.firehose_bytes
        hub.unsubscribe(firehose)
        # A viewer gone, its job's channel is left on its primary.
        hub.unsubscribe(viewers[watched[1]])

        async def left() -> bool:
            no_firehose = await client.execute_command("SPUBLISH", channel, "{}") == 0
            _, heard = await append(client, watched[1], "progress", current=2)
            return no_firehose and heard == 0

        await eventually(left, "the hub to leave the channels no viewer needs")


def live_message(job_id: str) -> str:
    event = json.dumps(
        new_event(job_id, "progress", 0, current=1), default=str, separators=(",", ":")
    )
    return f'{{"job_event_id":"1-0","firehose_id":"1-0","owner":null,"event":{event}}}'


async def stream_ids(stream: JobStream, ids: list[str] | None = None) -> list[str]:
    """The ids of the frames a job stream sends, until its job's terminal event (gathered in
    ``ids`` as they come, when given)."""
    ids = [] if ids is None else ids
    async for chunk in stream.frames():
        ids += [line[4:] for line in chunk.decode().split("\n") if line.startswith("id: ")]
    return ids


def test_on_a_cluster_a_stream_reads_the_log_only_once_its_subscription_holds(
    valkey_cluster: ValkeyCluster,
) -> None:
    """The hub sends each SSUBSCRIBE a stream asks for a second late, as a slow network would.
    Events appended right after the stream's read of the log reach it only if that read came
    after the subscription held: read first, and they are neither in the read nor live."""
    asyncio.run(_subscribe_then_read(valkey_cluster))


async def _subscribe_then_read(cluster: ValkeyCluster) -> None:
    shard = cluster.shards[1]
    job_id = job_on(shard)
    log_key = KEYS.job_events(job_id)
    async with cluster_hub(cluster, subscribe_delay_seconds=1.0) as (hub, client):
        store = JobStore(cast(Redis, client), Settings(prefix=PREFIX))
        cursor, _ = await append(client, job_id, "progress", current=1)
        await append(client, job_id, "progress", current=2)
        monitor = Monitor(shard.primary.port)
        try:
            stream = JobStream(store, hub, store.settings, running_record(job_id), cursor)
            reading = asyncio.create_task(stream_ids(stream))

            async def read_the_log() -> bool:
                return bool(monitor.commands("XRANGE", mentioning=log_key))

            await eventually(read_the_log, "the stream's read of the log")
            later = [(await append(client, job_id, "progress", current=3))[0]]
            later.append((await append(client, job_id, "completed"))[0])
            ids = await asyncio.wait_for(reading, timeout=TIMEOUT)
        finally:
            monitor.close()
        rows = await client.xrange(log_key)
        assert ids == [event_id for event_id, _ in rows][1:], "a gap, a repeat or a reordering"
        assert ids[-2:] == later
        # What the primary ran, in its order: the subscription before the read.
        subscribed = monitor.commands("SSUBSCRIBE", mentioning=KEYS.job_channel(job_id))
        read = monitor.commands("XINFO", "XRANGE", mentioning=log_key)
        assert subscribed and subscribed[0] < read[0], "the log was read before the subscription"


def test_after_a_primary_dies_a_watched_job_delivers_again_from_its_replica_with_no_gap(
    own_cluster: ValkeyCluster,
) -> None:
    asyncio.run(_failover(own_cluster))


async def _failover(cluster: ValkeyCluster) -> None:
    shard = cluster.shards[2]
    dead = shard.primary
    [replica] = shard.replicas
    job_id = job_on(shard)
    log_key = KEYS.job_events(job_id)
    async with cluster_hub(cluster) as (hub, client):
        store = JobStore(cast(Redis, client), Settings(prefix=PREFIX))
        cursor, _ = await append(client, job_id, "progress", current=1)
        stream = JobStream(store, hub, store.settings, running_record(job_id), cursor)
        seen: list[str] = []
        reading = asyncio.create_task(stream_ids(stream, seen))
        await eventually(lambda: _listening(cluster, job_id), "the stream's subscription")
        live_id, heard = await append(client, job_id, "progress", current=2)
        assert heard == 1

        async def caught_up() -> bool:
            return live_id in seen

        # The kill must come after the stream's first read of the log: one cut off by it ends
        # the stream (its client resumes), which is not what this test is about.
        await eventually(caught_up, "the stream's catch-up read and its live frame")
        # An event whose live message the hub never gets (the outage's, standing in for one
        # appended while its connection was down): only the catch-up read can bring it.
        with dead.client() as node:
            unheard = node.xadd(log_key, {"e": event_json(job_id, "progress", current=3)})
            assert node.wait(1, 5_000) == 1  # the replica has it before the kill
        await asyncio.to_thread(cluster.kill_primary, shard)
        assert not dead.alive() and replica.role() == "master"
        assert cluster.owner(shard.slots[0]) == ("127.0.0.1", replica.port)
        # Through the cluster client, which finds the promoted replica.
        await append(client, job_id, "progress", current=4)
        await append(client, job_id, "completed")
        ids = await asyncio.wait_for(reading, timeout=30)
        rows = await client.xrange(log_key)
        assert ids == [event_id for event_id, _ in rows][1:], "a gap, a repeat or a reordering"
        assert unheard in ids
        # It came back on the replica: the same connection never held on.
        assert set(hub.links) == {f"127.0.0.1:{replica.port}"}
        assert hub.reconnects == 1


async def _listening(cluster: ValkeyCluster, job_id: str) -> bool:
    """Whether the primary serving the job's slot now has one subscriber on its channel."""
    channel = KEYS.job_channel(job_id)

    def count() -> int:
        _, port = cluster.owner(key_slot(channel.encode()))
        node = next(node for node in cluster.nodes if node.port == port)
        with node.client() as client:
            ((_, subscribers),) = client.pubsub_shardnumsub(channel)
        return int(subscribers)

    return await asyncio.to_thread(count) == 1


class StaleSlots(ClusterSlots):
    """The slot map as a hub read it before a failover, until it reads it again: the dead
    primary's address still named for its slots, where the killed node, restarted, now
    runs as the replica of the promoted one."""

    def __init__(self, cluster: RedisCluster, primary: str, replica: str) -> None:
        super().__init__(cluster)
        self.stale = {primary: replica}
        self.refreshes = 0

    def address(self, channel: str) -> str:
        found = super().address(channel)
        return self.stale.get(found, found) if self.refreshes < 2 else found

    async def _refresh(self) -> None:
        await super()._refresh()
        self.refreshes += 1


def test_a_hub_subscribes_on_a_primary_never_on_a_replica_a_stale_map_names(
    valkey_cluster: ValkeyCluster,
) -> None:
    """A replica takes ``SSUBSCRIBE`` for its primary's slots and confirms it, but hears
    their events only through replication: a killed primary restarted at its old address is
    one, and hears nothing its new primary publishes until its sync has begun, while the
    streams have caught up from the log (seen as a gap by the chaos soak, bench.chaos
    --cluster). With a slot map that names a replica, the hub must refuse it, read the map
    again and subscribe on the primary."""
    asyncio.run(_not_on_a_replica(valkey_cluster))


async def _not_on_a_replica(cluster: ValkeyCluster) -> None:
    shard = cluster.shards[1]
    [replica] = shard.replicas
    job_id = job_on(shard)
    router = StaleSlots(cluster_client(cluster), address(shard), f"127.0.0.1:{replica.port}")
    async with cluster_hub(cluster, router=router) as (hub, client):
        viewer = await watch(hub, job_id)
        await held_by_the_primary(viewer, client, shard, replica, "subscribed on a replica")


async def held_by_the_primary(
    viewer: Subscriber, client: RedisCluster, shard: Shard, other: ClusterNode, what: str
) -> None:
    """``viewer``'s subscription is held by ``shard``'s primary (not by ``other``, or it is
    ``what``), and the job's next event reaches it live."""
    assert viewer.job_id is not None
    channel = KEYS.job_channel(viewer.job_id)

    def subscribers(node: ClusterNode) -> int:
        with node.client() as node_client:
            ((_, count),) = node_client.pubsub_shardnumsub(channel)
        return int(count)

    assert await asyncio.to_thread(subscribers, other) == 0, what
    assert await asyncio.to_thread(subscribers, shard.primary) == 1
    event_id, heard = await append(client, viewer.job_id, "progress", current=1)
    assert heard == 1
    [frame] = await frames(viewer)
    assert frame.job_event_id == parse_stream_id(event_id)


def event_json(job_id: str, type_: str, **data: Any) -> str:
    return json.dumps(new_event(job_id, type_, 0, **data), default=str, separators=(",", ":"))


def move_slot(cluster: ValkeyCluster, slot: int, source: Shard, target: Shard) -> None:
    """Hand an empty ``slot`` from ``source``'s primary to ``target``'s, as a resharding does
    (importing, migrating, then the new owner on each primary), and wait until every node
    agrees."""
    source_id, target_id = source.primary.node_id(), target.primary.node_id()
    with target.primary.client() as node:
        node.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    with source.primary.client() as node:
        node.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    for primary in [target.primary, source.primary] + [
        shard.primary for shard in cluster.shards if shard not in (source, target)
    ]:
        with primary.client() as node:
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    wait_until(
        lambda: all(_owner_seen(node, slot) == target.primary.port for node in cluster.nodes),
        timeout=TIMEOUT,
        what=f"every node to see slot {slot} on {target.primary.name}",
    )


def _owner_seen(node: ClusterNode, slot: int) -> int:
    with node.client() as client:
        ranges: Any = client.execute_command("CLUSTER", "SLOTS")
    for start, end, primary, *_ in ranges:
        if int(start) <= slot <= int(end):
            return int(primary[1])
    return 0


def test_a_channel_whose_slot_moves_is_subscribed_again_on_its_new_primary(
    valkey_cluster: ValkeyCluster,
) -> None:
    """A primary that gives a slot away unsubscribes its sharded channels by itself (a
    ``sunsubscribe`` nobody asked for): the hub subscribes to them on the new owner, and the
    stream catches up from the log."""
    asyncio.run(_slot_moves(valkey_cluster))


async def _slot_moves(cluster: ValkeyCluster) -> None:
    source, target = cluster.shards[0], cluster.shards[1]
    with source.primary.client() as node:
        # A slot moves only empty, and the session's other tests leave keys in some slots.
        while True:
            job_id = job_on(source)
            slot = key_slot(KEYS.job_channel(job_id).encode())
            if node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0:
                break
    async with cluster_hub(cluster) as (hub, client):
        viewer = await watch(hub, job_id)
        assert set(hub.links) == {address(source)}
        try:
            await asyncio.to_thread(move_slot, cluster, slot, source, target)

            await eventually(
                lambda: _listening(cluster, job_id), "the hub's subscription on the new primary"
            )
            assert address(target) in hub.links
            event_id, heard = await append(client, job_id, "progress", current=1)
            assert heard == 1
            items = await asyncio.wait_for(viewer.take(), timeout=TIMEOUT)
            assert RESYNC in items, "the stream was not told to catch up from the log"
            received = [i.job_event_id for i in items if isinstance(i, Frame)]
            if not received:  # the live frame may come after the RESYNC's wake-up
                received = [f.job_event_id for f in await frames(viewer)]
            assert received == [parse_stream_id(event_id)]
        finally:
            hub.unsubscribe(viewer)
            # Back where it was, for the other tests of the module (a slot moves only empty).
            with target.primary.client() as node:
                node.delete(KEYS.job_events(job_id))
            await asyncio.to_thread(move_slot, cluster, slot, target, source)


class TurnsAfterCheck(ClusterSlots):
    """A primary that passes the hub's check before subscribing, then turns replica before
    the ``SSUBSCRIBE`` lands: what a killed primary restarted at its old address does in the
    moment it still claims its slots (here a manual failover, run right after the check)."""

    def __init__(self, cluster: RedisCluster, valkey_cluster: ValkeyCluster, shard: Shard) -> None:
        super().__init__(cluster)
        self.valkey_cluster = valkey_cluster
        self.shard = shard
        self.turned: ClusterNode | None = None

    async def check(self, connection: AbstractConnection) -> None:
        await super().check(connection)
        if self.turned is None:
            self.turned = self.shard.primary
            await asyncio.to_thread(self.valkey_cluster.fail_over, self.shard)


def test_a_primary_that_turns_replica_before_the_subscription_lands_is_left_for_the_new_one(
    own_cluster: ValkeyCluster,
) -> None:
    """A replica confirms an ``SSUBSCRIBE`` but, not yet in sync, hears nothing of what its
    primary publishes: checked only before subscribing, a killed primary restarted at its old
    address passed the check while it still claimed its slots, took the subscription as a
    replica, and its streams missed the events between their catch-up and its sync (a gap in
    one ``bench.chaos --cluster`` run in fifteen). The hub checks the server again once a
    subscription is confirmed, and a stream reads the log only once it is held by a primary."""
    asyncio.run(_turned_replica(own_cluster))


async def _turned_replica(cluster: ValkeyCluster) -> None:
    shard = cluster.shards[0]
    job_id = job_on(shard)
    router = TurnsAfterCheck(cluster_client(cluster), cluster, shard)
    async with cluster_hub(cluster, router=router) as (hub, client):
        viewer = await watch(hub, job_id)
        assert router.turned is not None, "the primary never turned: nothing was tested"
        assert router.turned.role() == "slave"
        await held_by_the_primary(viewer, client, shard, router.turned, "held by a replica")


class GatedSlots(ClusterSlots):
    """Once armed, holds the checks of the connections made from then on, then their
    verifications, until the test lets each go."""

    def __init__(self, cluster: RedisCluster) -> None:
        super().__init__(cluster)
        self.armed = False
        self.reconnecting = asyncio.Event()
        self.check_gate = asyncio.Event()
        self.verifying = asyncio.Event()
        self.verify_gate = asyncio.Event()

    async def check(self, connection: AbstractConnection) -> None:
        if self.armed:
            self.reconnecting.set()
            await self.check_gate.wait()
        await super().check(connection)

    async def verify(self, address: str) -> None:
        if self.armed:
            self.verifying.set()
            await self.verify_gate.wait()
        await super().verify(address)


def test_an_event_heard_while_a_resubscription_is_verified_waits_for_the_catch_up(
    valkey_cluster: ValkeyCluster,
) -> None:
    """A confirmation counts only once its node is verified a primary, and a stream catches up
    from the log then. An event heard in between must reach the stream after that catch-up:
    before it, it would move the stream's cursor past the events the catch-up is for."""
    asyncio.run(_held_for_the_catch_up(valkey_cluster))


async def _held_for_the_catch_up(cluster: ValkeyCluster) -> None:
    shard = cluster.shards[0]
    job_id = job_on(shard)
    router = GatedSlots(cluster_client(cluster))
    async with cluster_hub(cluster, router=router) as (hub, client):
        store = JobStore(cast(Redis, client), Settings(prefix=PREFIX))
        cursor, _ = await append(client, job_id, "progress", current=1)
        stream = JobStream(store, hub, store.settings, running_record(job_id), cursor)
        reading = asyncio.create_task(stream_ids(stream))
        await eventually(lambda: _listening(cluster, job_id), "the stream's subscription")
        router.armed = True
        with shard.primary.client() as node:
            assert node.client_kill_filter(_type="pubsub") >= 1
        await asyncio.wait_for(router.reconnecting.wait(), timeout=TIMEOUT)
        _, heard = await append(client, job_id, "progress", current=2)
        assert heard == 0, "appended while the hub's connection was down"
        router.check_gate.set()
        await asyncio.wait_for(router.verifying.wait(), timeout=TIMEOUT)
        # The first confirmation may be the hub's own channel's, the job's routed again after
        # it: once the server has the job's, it is held by the verification (gated) too.
        await eventually(lambda: _listening(cluster, job_id), "the resubscription")
        _, heard = await append(client, job_id, "progress", current=3)
        assert heard == 1, "appended while the resubscription awaited its verification"
        await asyncio.sleep(0.3)  # the live message reaches the hub
        router.verify_gate.set()
        await append(client, job_id, "completed")
        ids = await asyncio.wait_for(reading, timeout=TIMEOUT)
        rows = await client.xrange(KEYS.job_events(job_id))
        assert ids == [event_id for event_id, _ in rows][1:], "a gap, a repeat or a reordering"


def test_after_a_resubscription_the_streams_of_every_partition_catch_up(
    valkey_cluster: ValkeyCluster,
) -> None:
    """With the log plane's partitions, a job's channel begins with its partition's tag, and
    the tags differ in length ({2}, {27}, {114}): the streams of each must be told to catch
    up once their channel holds again, whatever the tag (one in five partitions was not, and
    missed the events appended while its hub's connection was down: bench.chaos --cluster)."""
    asyncio.run(_every_partition_catches_up(valkey_cluster))


async def _every_partition_catches_up(cluster: ValkeyCluster) -> None:
    settings = Settings(cluster_url=cluster.url, prefix=PREFIX, cluster_partitions=24)
    names = Keys.of_deployment(settings)
    by_tag: dict[int, str] = {}
    while len(by_tag) < 3:  # one job for each length of tag
        job_id = new_job_id()
        by_tag.setdefault(len(names.job_channel(job_id).split("}")[0]), job_id)
    router = GatedSlots(cluster_client(cluster))
    async with cluster_hub(cluster, router=router, names=names) as (hub, client):
        store = JobStore(cast(Redis, client), settings)
        readers = {}
        for job_id in by_tag.values():
            cursor, _ = await append(client, job_id, "progress", names=names, current=1)
            stream = JobStream(store, hub, settings, running_record(job_id), cursor)
            readers[job_id] = asyncio.create_task(stream_ids(stream))
            await eventually(lambda: _held(hub, len(readers)), "the stream's subscription")
        router.armed = True
        for shard in cluster.shards:
            with shard.primary.client() as node:
                node.client_kill_filter(_type="pubsub")
        await asyncio.wait_for(router.reconnecting.wait(), timeout=TIMEOUT)
        for job_id in by_tag.values():
            _, heard = await append(client, job_id, "progress", names=names, current=2)
            assert heard == 0, "appended while the hub's connections were down"
        router.check_gate.set()
        router.verify_gate.set()
        await eventually(lambda: _held(hub, len(by_tag)), "every subscription again")
        for job_id in by_tag.values():
            await append(client, job_id, "completed", names=names)
        for job_id, reading in readers.items():
            ids = await asyncio.wait_for(reading, timeout=TIMEOUT)
            rows = await client.xrange(names.job_events(job_id))
            assert ids == [event_id for event_id, _ in rows][1:], f"{job_id}: a gap"


async def _held(hub: Hub, channels: int) -> bool:
    held = [c for c in hub.channels if hub.ready(c).done()]
    return len(held) == channels and hub.connected.is_set()
