"""What a key holds, as one comparable string: for the "a refused request changes nothing"
tests, which compare every key before and after."""

from __future__ import annotations

import json
from typing import Any


def key_value(client: Any, key: str) -> str:
    """``key``'s content (a hash, a sorted set, a string) or, for a stream, its last id."""
    kind = client.type(key)
    if kind == "hash":
        return json.dumps(client.hgetall(key), sort_keys=True)
    if kind == "stream":
        return str(client.xinfo_stream(key)["last-generated-id"])
    if kind == "zset":
        return json.dumps(client.zrange(key, 0, -1, withscores=True))
    return str(client.get(key)) if kind == "string" else str(kind)
