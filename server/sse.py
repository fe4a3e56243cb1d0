"""SSE frames, encoded once as bytes and shared by every subscriber.

Every ``data`` is compact JSON (newlines escaped) and every ``event`` name is one of ours, so
no user text can add or split an SSE field. Every frame is ASCII too: a client that splits
lines on more than the standard's CR and LF (U+2028, U+2029, U+0085, as httpx-sse before 0.4.2
did) still reads each ``data`` whole.
"""

from __future__ import annotations

import json
import re
from typing import Any

HEARTBEAT = b": keep-alive\n\n"
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def frame(event: str, data: str, event_id: str | None = None) -> bytes:
    if not data.isascii():  # O(1) for a str: events from json.dumps never pay for this
        data = ascii_json(data)
    head = f"id: {event_id}\nevent: {event}\n" if event_id else f"event: {event}\n"
    return f"{head}data: {data}\n\n".encode()


def ascii_json(text: str) -> str:
    """JSON ``text`` with every non-ASCII character escaped as ``\\uXXXX`` (a pair of them past
    U+FFFF), as ``json.dumps`` writes it: in JSON such characters can only be inside strings,
    where the escape means the same character (a snapshot comes from pydantic's
    ``model_dump_json``, which writes them raw)."""
    return _NON_ASCII.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def firehose_data(event_json: str, job_event_id: str) -> str:
    """The firehose carries each event with its id in its job's log as ``event_id``."""
    return f'{event_json[:-1]},"event_id":"{job_event_id}"}}'


def json_data(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
