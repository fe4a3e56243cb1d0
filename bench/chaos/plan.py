"""Which fault, and when: one every ``--fault-min`` to ``--fault-max`` seconds, each kind once
in a random order and then again (on a cluster, a primary's SIGKILL twice, first), so a short
run sees every kind."""

from __future__ import annotations

import asyncio
import random
import time

from bench.chaos import report
from bench.chaos.record import Run
from bench.chaos.stack import Stack

# Each names the Stack method that injects it.
FAULTS = ("worker_sigkill", "worker_sigterm", "web_sigkill", "valkey_restart", "valkey_pause")
# With the log plane on a cluster (--cluster) the Valkey faults hit the queue plane, and a
# cluster primary's SIGKILL is added.
CLUSTER_FAULTS = (*FAULTS, "primary_sigkill")


def new_round() -> list[str]:
    """Every kind once, in a random order (popped from the end)."""
    return random.sample(FAULTS, len(FAULTS))


def new_cluster_round() -> list[str]:
    """On a cluster a primary's SIGKILL twice, the fault this mode is for: once in a random
    place, and once first, so that even a short run tests a failover."""
    return [*random.sample(CLUSTER_FAULTS, len(CLUSTER_FAULTS)), "primary_sigkill"]


async def inject_faults(
    stack: Stack,
    run: Run,
    stop: asyncio.Event,
    every: tuple[float, float],
    enough: asyncio.Event,
    min_faults: int,
) -> None:
    """Faults until ``stop``; ``enough`` is set once ``min_faults`` are in."""
    if min_faults <= 0:
        enough.set()
    next_at = time.monotonic() + random.uniform(*every)
    deck: list[str] = []  # every kind once, in a random order, then again: a short run sees all
    while not stop.is_set():
        await asyncio.to_thread(stack.reap, run)
        if time.monotonic() >= next_at:
            if not deck:
                deck = new_round() if stack.cluster is None else new_cluster_round()
            kind = deck.pop()
            victim = await asyncio.to_thread(getattr(stack, kind))
            run.faults[kind] += 1
            if sum(run.faults.values()) >= min_faults:
                enough.set()
            report.fault(kind, victim)
            next_at = time.monotonic() + random.uniform(*every)
        await asyncio.sleep(0.5)
