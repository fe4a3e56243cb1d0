"""SSE frames, encoded once as bytes and shared by every subscriber.

Every ``data`` is compact JSON from ``json.dumps`` (ASCII, newlines escaped) and every ``event``
name is one of ours, so no user text can add or split an SSE field.
"""

from __future__ import annotations

import json
from typing import Any

HEARTBEAT = b": keep-alive\n\n"


def frame(event: str, data: str, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\nevent: {event}\n" if event_id else f"event: {event}\n"
    return f"{head}data: {data}\n\n".encode()


def retry_frame(milliseconds: int) -> bytes:
    return f"retry: {milliseconds}\n\n".encode()


def firehose_data(event_json: str, job_event_id: str) -> str:
    """The firehose carries each event with its id in its job's log as ``event_id``."""
    return f'{event_json[:-1]},"event_id":"{job_event_id}"}}'


def json_data(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
