"""A Redis command another one runs with: a job's event append takes a list of them (``then=``)
and runs them in the same script, so the event and its effects land together or not at all.

A command names its keys apart from its other arguments: the append script (tasks/scripts/
append.lua) receives the keys in ``KEYS`` and the rest as arguments, so every key the script
touches is declared. That is what lets Redis check a script's keys (ACLs, a cluster's slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Arg = str | bytes | int | float


@dataclass(frozen=True)
class Command:
    """``name keys... args...``: every key the command touches (a channel counts as one) in
    ``keys``, before its other arguments, as Redis takes them."""

    name: str
    keys: Sequence[str]
    args: Sequence[Arg] = ()
    # A command of the queue plane (arq's queue, on REDIS_URL): in the script on one server; on
    # a cluster, run after it through the queue outbox (tasks/planes.py).
    queue: bool = False
