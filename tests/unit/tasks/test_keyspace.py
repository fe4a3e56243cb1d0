"""The log plane's key layout (tasks/keyspace.py): plain names on one server, partitions with
evenly spread hash tags on a cluster, and a job's partition from its id alone."""

from __future__ import annotations

from collections import Counter

import pytest
from redis.crc import key_slot

from stepstream.tasks.children import child_id
from stepstream.tasks.keyspace import Keys, partition_tags
from stepstream.tasks.settings import Settings

SLOTS = 16_384


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """As a cluster's primaries hold them (valkey-cli, tests/support/cluster.py)."""
    bounds = [SLOTS * i // primaries for i in range(primaries + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(primaries)]


def test_one_server_keeps_every_name_as_it_was() -> None:
    keys = Keys.of_deployment(Settings())
    assert not keys.partitioned
    assert keys.every_partition() == [keys]
    assert keys.of("J") is keys
    named = [
        keys.job("J"),
        keys.job_events("J"),
        keys.job_text("J"),
        keys.job_cancel("J"),
        keys.job_channel("J"),
        keys.batch_counts("J"),
        keys.firehose,
        keys.jobs,
        keys.firehose_channel,
        keys.owner_unfinished("o"),
        keys.owner_home("o").owner_unfinished("o"),
        keys.subject_jobs("s"),
        keys.submissions("o", 7),
        keys.transitions("completed"),
        keys.webhook_outbox,
        keys.idempotency("x"),
        keys.queue,
    ]
    assert named == [
        "stepstream:job:{J}",
        "stepstream:job:{J}:events",
        "stepstream:job:{J}:text",
        "stepstream:job:{J}:cancel",
        "stepstream:job:{J}:live",
        "stepstream:job:{J}:counts",
        "stepstream:events",
        "stepstream:jobs",
        "stepstream:live",
        "stepstream:unfinished:o",
        "stepstream:unfinished:o",
        "stepstream:subject:s",
        "stepstream:rate:o:7",
        "stepstream:count:completed",
        "stepstream:webhooks",
        "stepstream:idem:x",
        "stepstream:queue",
    ]
    # A fan-out's child keeps its id too (a parent resumed after an upgrade finds its children).
    assert child_id(keys, "parent", "g", 3) == "iqIVXpclahNyVzYheWE7"


@pytest.mark.parametrize("primaries", [1, 2, 3, 4, 6])
def test_the_default_partitions_spread_evenly_over_the_primaries(primaries: int) -> None:
    partitions = Settings().cluster_partitions
    tags = partition_tags(partitions)
    assert len(set(tags)) == partitions
    held = Counter(
        next(i for i, (low, high) in enumerate(slot_ranges(primaries)) if low <= slot(t) <= high)
        for t in (f"{{{tag}}}" for tag in tags)
    )
    assert sorted(held.values()) == [partitions // primaries] * primaries
    # What the table avoids: bare indexes land where CRC16 puts them.
    bare = Counter(
        next(i for i, (low, high) in enumerate(slot_ranges(6)) if low <= slot(f"{{{n}}}") <= high)
        for n in range(partitions)
    )
    assert max(bare.values()) > partitions // 6


def test_a_jobs_keys_and_its_partitions_share_one_slot() -> None:
    keys = Keys("s:", 24)
    job_id = keys.new_job_id(5)
    assert keys.partition_of(job_id) == 5
    part = keys.of(job_id)
    assert part == keys.at(5)
    names = [
        keys.job(job_id),
        keys.job_events(job_id),
        keys.job_text(job_id),
        keys.job_cancel(job_id),
        keys.job_channel(job_id),
        keys.batch_counts(job_id),
        keys.batch_ended(job_id),
        part.firehose,
        part.jobs,
        part.firehose_channel,
        part.owner_unfinished("o"),
        part.subject_jobs("s"),
        part.submissions("o", 7),
        part.transitions("completed"),
        part.transitions_window("completed", 900),
        part.webhook_outbox,
        part.webhooks_dropped,
        part.queue_outbox,
        part.idempotency("x"),
    ]
    assert {slot(name) for name in names} == {slot(f"{{{partition_tags(24)[5]}}}")}
    assert keys.job(job_id) == f"s:{{{partition_tags(24)[5]}}}:job:{{{job_id}}}"
    # A partition-wide name with no partition named is a mistake, not a global key.
    with pytest.raises(ValueError, match="name its partition"):
        _ = keys.firehose


def test_a_jobs_partition_comes_from_its_id_and_random_ids_spread() -> None:
    keys = Keys("s:", 24)
    ids = [keys.new_job_id() for _ in range(2_400)]
    spread = Counter(keys.partition_of(job_id) for job_id in ids)
    assert set(spread) == set(range(24))
    assert min(spread.values()) >= 50  # about 100 each
    # Another process, from the id alone, finds the same keys.
    assert all(Keys("s:", 24).job(i) == keys.job(i) for i in ids[:50])
    # A child is derived, the same in every process, in its parent's partition.
    parent = ids[0]
    children = [child_id(keys, parent, "g", i) for i in range(30)]
    assert children == [child_id(Keys("s:", 24), parent, "g", i) for i in range(30)]
    assert {keys.partition_of(c) for c in children} == {keys.partition_of(parent)}
    assert len(set(children)) == 30
