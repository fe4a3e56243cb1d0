"""stepstream/_stream_id.py: the one event-id type, and its order, every side compares with."""

from __future__ import annotations

import pytest

from stepstream._stream_id import LAST, PART_MAX, StreamId


def test_ids_order_by_time_then_sequence_not_as_text() -> None:
    ids = ["10-0", "9-5", "9-10", "0"]
    assert sorted(ids, key=StreamId.parse) == ["0", "9-5", "9-10", "10-0"]
    assert sorted(ids) != ["0", "9-5", "9-10", "10-0"]  # what comparing the text would give


def test_an_id_prints_as_redis_writes_it() -> None:
    assert str(StreamId.parse("1733580000000-3")) == "1733580000000-3"
    assert StreamId.parse("0") == StreamId(0, 0)


@pytest.mark.parametrize("bad", ["", "-1", "1-", "1-2-3", "abc", " 1-2", f"{PART_MAX + 1}-0"])
def test_anything_else_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a stream id"):
        StreamId.parse(bad)
    assert StreamId.parse_or_none(bad) is None


def test_the_last_possible_id_is_the_largest() -> None:
    assert StreamId.parse(f"{PART_MAX}-{PART_MAX}") == LAST
    assert StreamId.parse(f"{PART_MAX}-0") < LAST
