"""A real Valkey Cluster (3 primaries, 3 replicas, formed from redis-py) and the rules the
store must follow on it (docs/scaling.md): jobs' keys spread over every primary, one Lua call's
keys share a hash slot, live events go over sharded pub/sub, and a killed primary's slots come
back on its promoted replica. These drive the cluster with a plain key layout and the store's
command mix, through redis-py's asyncio cluster client; the store itself on a cluster:
tests/test_cluster_store.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Connection
from redis.asyncio.cluster import RedisCluster
from redis.cluster import key_slot
from redis.exceptions import RedisClusterException, ResponseError

from stepstream.tasks.connection import connect_cluster
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import new_job_id
from stepstream.tasks.settings import Settings
from tests.support.cluster import SLOTS, ValkeyCluster
from tests.support.processes import wait_until

KEYS = Keys("cl:")

# The store's command mix for one event, in one script: the log, the record, the live channel.
APPEND = """
local id = redis.call('XADD', KEYS[1], '*', 'event', ARGV[1])
redis.call('HSET', KEYS[2], 'last_event_id', id)
redis.call('SPUBLISH', KEYS[3], ARGV[1])
return id
"""
# A script that builds a key name from ARGV: the cluster cannot route it, nor may it run it.
UNDECLARED = "return redis.call('GET', ARGV[1])"


def job_keys(job_id: str) -> list[str]:
    return [KEYS.job_events(job_id), KEYS.job(job_id), KEYS.job_channel(job_id)]


@contextlib.asynccontextmanager
async def cluster_client(cluster: ValkeyCluster) -> AsyncIterator[RedisCluster]:
    client = cluster.client(decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def test_three_primaries_and_their_replicas_form_a_cluster(valkey_cluster: ValkeyCluster) -> None:
    for node in valkey_cluster.nodes:
        info = node.cluster_info()
        assert info["cluster_state"] == "ok", node.name
        assert info["cluster_slots_assigned"] == str(SLOTS)
        assert info["cluster_size"] == "3"  # primaries serving slots
        assert info["cluster_known_nodes"] == "6"
    for shard in valkey_cluster.shards:
        assert shard.primary.role() == "master"
        assert valkey_cluster.owner(shard.slots[0]) == ("127.0.0.1", shard.primary.port)
        [replica] = shard.replicas
        with replica.client() as client:
            replication = client.info("replication")
        assert replication["role"] == "slave"
        assert replication["master_port"] == shard.primary.port
        assert replication["master_link_status"] == "up"


def test_jobs_spread_over_every_primary(valkey_cluster: ValkeyCluster) -> None:
    jobs = [new_job_id() for _ in range(300)]

    async def create() -> None:
        async with cluster_client(valkey_cluster) as client:
            for job_id in jobs:
                await client.hset(KEYS.job(job_id), mapping={"state": "queued"})

    asyncio.run(create())
    held = {}
    for shard in valkey_cluster.shards:
        with shard.primary.client() as client:
            held[shard.primary.name] = sum(1 for _ in client.scan_iter(f"{KEYS.prefix}job:*"))
    assert sum(held.values()) == len(jobs), held  # every record landed, once
    # Even hashing gives each about 100; under 50 would be a six-sigma fluke, or no spread.
    assert all(count >= 50 for count in held.values()), held


def test_one_script_call_runs_on_keys_of_one_slot_only(valkey_cluster: ValkeyCluster) -> None:
    job_id, other = new_job_id(), new_job_id()
    assert len({key_slot(k.encode()) for k in job_keys(job_id)}) == 1
    spanning = [KEYS.job_events(job_id), KEYS.job(other), KEYS.job_channel(job_id)]
    assert key_slot(KEYS.job(job_id).encode()) != key_slot(KEYS.job(other).encode())

    async def run() -> None:
        async with cluster_client(valkey_cluster) as client:
            event_id = await client.eval(APPEND, 3, *job_keys(job_id), '{"type":"progress"}')
            assert await client.hget(KEYS.job(job_id), "last_event_id") == event_id
            assert await client.xlen(KEYS.job_events(job_id)) == 1
            # redis-py refuses to send it: no one node holds all its keys.
            with pytest.raises(RedisClusterException, match="same key slot"):
                await client.eval(APPEND, 3, *spanning, "{}")

    asyncio.run(run())
    # And the server refuses it, whatever a client does: the node of the first key says so.
    shard = valkey_cluster.shard_of(key_slot(spanning[0].encode()))
    with shard.primary.client() as node:
        with pytest.raises(ResponseError, match="CROSSSLOT"):
            node.eval(APPEND, 3, *spanning, "{}")
        assert node.xlen(spanning[0]) == 1  # the refused call appended nothing
        # A key named in ARGV instead of KEYS, in a slot of another node: refused as well.
        first, last = shard.slots
        elsewhere = next(k for k in map(KEYS.job, job_ids()) if not first <= _slot(k) <= last)
        with pytest.raises(ResponseError, match="non local key"):
            node.eval(UNDECLARED, 0, elsewhere)


def _slot(key: str) -> int:
    return int(key_slot(key.encode()))


def job_ids() -> Iterator[str]:
    while True:
        yield new_job_id()


def test_sharded_pub_sub_delivers_a_jobs_events(valkey_cluster: ValkeyCluster) -> None:
    """redis-py 5's asyncio cluster client has no ``pubsub()`` nor ``ssubscribe``: the
    subscriber is a connection to the node that the client's slot map names for the channel.
    ``SPUBLISH`` goes through the cluster client (as a command: it has no method for it)."""
    channel = KEYS.job_channel(new_job_id())

    async def run() -> None:
        async with cluster_client(valkey_cluster) as client:
            await client.initialize()
            node = client.get_node_from_key(channel)
            assert node is not None
            subscriber = Connection(host=node.host, port=node.port, decode_responses=True)
            try:
                await subscriber.send_command("SSUBSCRIBE", channel)
                reply = await subscriber.read_response(timeout=5)
                assert reply == ["ssubscribe", channel, 1]
                receivers = await client.execute_command("SPUBLISH", channel, "event 1")
                assert receivers == 1
                message = await subscriber.read_response(timeout=5)
                assert message == ["smessage", channel, "event 1"]
            finally:
                await subscriber.disconnect()

    asyncio.run(run())


def test_a_killed_primarys_replica_takes_its_slots(own_cluster: ValkeyCluster) -> None:
    """The log plane's client (``connect_cluster``) waits out the failover: a write sent just
    after the kill, to a slot of the dead primary, completes on the promoted replica. The
    primary killed is the client's seed and the first of its slot map, the one redis-py asks
    again while it re-reads the map (which it did outside its retries)."""
    shard = own_cluster.shards[0]
    assert own_cluster.url.endswith(f":{shard.primary.port}")
    job_id = next(i for i in job_ids() if own_cluster.shard_of(_slot(KEYS.job(i))) is shard)
    dead = shard.primary
    [replica] = shard.replicas

    async def run() -> None:
        client = connect_cluster(Settings(cluster_url=own_cluster.url))
        try:
            await client.eval(APPEND, 3, *job_keys(job_id), "event 1")
            with dead.client() as primary:
                assert primary.wait(1, 5_000) == 1  # the replica has it before the kill
            failover = asyncio.create_task(asyncio.to_thread(own_cluster.kill_primary, shard))
            await asyncio.to_thread(wait_until, lambda: not dead.alive(), 10, what="the kill")
            # Sent while the slot map still names the dead primary.
            await client.eval(APPEND, 3, *job_keys(job_id), "event 2")
            assert await failover is replica
            assert replica.role() == "master"
            assert own_cluster.owner(shard.slots[0]) == ("127.0.0.1", replica.port)
            events = await client.xrange(KEYS.job_events(job_id))
            assert [fields["event"] for _, fields in events] == ["event 1", "event 2"]
        finally:
            await client.aclose()

    asyncio.run(run())
    with replica.client() as new_primary:
        assert new_primary.xlen(KEYS.job_events(job_id)) == 2
