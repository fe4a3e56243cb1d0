"""The one backoff rule (stepstream/_backoff.py) every Python retry loop asks for its delay."""

from __future__ import annotations

import random

from stepstream import Backoff
from stepstream._backoff import Backoff as ClientBackoff


def test_the_delay_doubles_from_the_minimum_up_to_the_cap() -> None:
    backoff = Backoff(min_seconds=0.25, max_seconds=2.0, jitter=0.0)
    assert [backoff.delay(attempt) for attempt in range(1, 7)] == [0.25, 0.5, 1, 2, 2, 2]
    assert backoff.delay(0) == 0.25  # an attempt before the first waits as the first does


def test_jitter_scales_the_delay_into_its_band_and_never_past_the_cap() -> None:
    backoff = Backoff(min_seconds=1.0, max_seconds=8.0, jitter=0.5)
    rng = random.Random(7)
    delays = [backoff.delay(10, rng) for _ in range(500)]
    assert all(4.0 <= delay <= 8.0 for delay in delays)
    assert max(delays) - min(delays) > 3.0  # spread over the band, not one value


def test_a_seeded_generator_gives_every_process_the_same_delay() -> None:
    """The webhook outbox seeds by entry and attempt, so any worker computes the same due time."""
    backoff = Backoff(min_seconds=2.0, max_seconds=600.0)
    first = backoff.delay(3, random.Random("1-0/3"))
    assert first == backoff.delay(3, random.Random("1-0/3"))
    assert 4.0 <= first <= 8.0


def test_the_task_option_is_the_shared_rule() -> None:
    assert Backoff is ClientBackoff
