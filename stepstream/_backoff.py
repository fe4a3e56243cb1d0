"""Exponential backoff with a cap and jitter: the one rule every retry loop in Python uses.

Pure (no I/O, no clock): the task runtime, the LLM provider, the webhook outbox and the script
client each keep their own numbers and ask this for the delay. It lives with the client because
the client may import neither the job side nor the HTTP side; both of those may import it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between attempts: ``min * 2**(attempt-1)``, capped, with jitter."""

    min_seconds: float = 1.0
    max_seconds: float = 60.0
    jitter: float = 0.5  # the delay is scaled by a random factor in [1 - jitter, 1]

    def base_delay(self, attempt: int) -> float:
        """The delay before retry ``attempt`` (1, 2, ...) without jitter."""
        return float(min(self.max_seconds, self.min_seconds * 2.0 ** max(attempt - 1, 0)))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before retry ``attempt``, jittered. ``rng``: a seeded generator when every
        process must compute the same delay (the ``random`` module's otherwise)."""
        if not self.jitter:
            return self.base_delay(attempt)
        uniform = rng.uniform if rng is not None else random.uniform
        return self.base_delay(attempt) * uniform(1.0 - self.jitter, 1.0)
