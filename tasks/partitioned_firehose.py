"""A cluster's firehose: one stream per partition of the log plane, read as one
(docs/scaling.md, "Global views, merged when read").

A cursor is one stream id per partition, joined by ``SEPARATOR`` (``"0"``: every partition from
its start). Each entry read carries as its id the cursor just past it, so a client resumes
every partition from any event it saw. On one server the firehose is one stream, read by
``JobStore.read_firehose`` directly.
"""

from __future__ import annotations

import heapq
from typing import Any

from redis.asyncio import Redis

from stepstream._stream_id import StreamId
from stepstream.tasks.keyspace import Keys

# Between a cursor's ids (never in a stream id).
SEPARATOR = "."

Row = tuple[str, dict[str, str]]  # (the cursor past the entry, its fields)


def cursor(text: str, partitions: int) -> list[str]:
    """``text`` as one id per partition: one id alone (``"0"``, or a one-server cursor) for
    every partition alike; a ``ValueError`` for another number of ids, or one that is not a
    stream id."""
    ids = text.split(SEPARATOR)
    if len(ids) == 1:
        ids = ids * partitions
    if len(ids) != partitions:
        raise ValueError(f"a firehose cursor of {len(ids)} ids; this log plane has {partitions}")
    for entry_id in ids:
        StreamId.parse(entry_id)
    return ids


async def head(redis: Redis, keys: Keys) -> str:
    """The cursor at every partition's newest entry: where a fresh viewer starts."""
    async with redis.pipeline(transaction=False) as pipe:
        for part in keys.every_partition():
            pipe.xrevrange(part.firehose, count=1)
        newest: list[list[tuple[str, Any]]] = await pipe.execute()
    return SEPARATOR.join(rows[0][0] if rows else "0" for rows in newest)


async def read(redis: Redis, keys: Keys, after: str, count: int) -> tuple[list[Row], str, bool]:
    """The first ``count`` entries after the cursor ``after`` over every partition's stream,
    in the order of their ids (one pipeline, one ``XRANGE`` per partition): (rows, the cursor
    past the last, whether more may follow). Exact: a partition that filled its page of
    ``count`` ends after the last entry taken."""
    parts = keys.every_partition()
    position = cursor(after, len(parts))
    async with redis.pipeline(transaction=False) as pipe:
        for part, last in zip(parts, position, strict=True):
            pipe.xrange(part.firehose, min=f"({last}", max="+", count=count)
        pages: list[list[tuple[str, dict[str, str]]]] = await pipe.execute()
    tagged = (
        [(StreamId.parse(entry_id), p, entry_id, fields) for entry_id, fields in page]
        for p, page in enumerate(pages)
    )
    merged = list(heapq.merge(*tagged, key=lambda row: (row[0], row[1])))
    more = any(len(page) == count for page in pages) or len(merged) > count
    rows: list[Row] = []
    for _, p, entry_id, fields in merged[:count]:
        position[p] = entry_id
        rows.append((SEPARATOR.join(position), fields))
    return rows, SEPARATOR.join(position), more
