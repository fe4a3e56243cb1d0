"""A Redis stream entry id (``<ms>-<seq>``): every event's id, and a stream's resume cursor.

Ids compare as Redis orders entries, by time then sequence, which their text does not
(``"10-0" < "9-0"``). Pure, like the client it sits with, so the job side, the HTTP side and
the client all parse and compare ids through this one type.
"""

from __future__ import annotations

import re
from typing import NamedTuple

PART_MAX = 2**64 - 1  # Redis refuses an id with a larger part in every command
_PATTERN = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


class StreamId(NamedTuple):
    """An entry id as a pair, ordered as Redis orders entries. ``0`` is ``0-0``."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, value: str) -> StreamId:
        """``<ms>-<seq>`` or ``0``; ValueError for anything else (a part past 2**64 - 1 too)."""
        if value == "0":
            return cls(0, 0)
        match = _PATTERN.fullmatch(value)
        if match is None:
            raise ValueError(f"not a stream id: {value!r}")
        parsed = cls(int(match[1]), int(match[2]))
        if max(parsed) > PART_MAX:
            raise ValueError(f"not a stream id: {value!r}")
        return parsed

    @classmethod
    def parse_or_none(cls, value: str) -> StreamId | None:
        try:
            return cls.parse(value)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


LAST = StreamId(PART_MAX, PART_MAX)  # no entry can follow it: Redis refuses to read after it
