"""Prices and budgets for LLM calls.

A task declares what its calls cost (``@task(..., pricing=Pricing(...), budget=...)``); the task
context adds up each call's tokens and cost on the job record and refuses a call that would take
the job past its budget (docs/ai-workloads.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from stepstream.tasks.errors import PermanentError
from stepstream.tasks.models import Usage


@dataclass(frozen=True)
class Pricing:
    """What one LLM call costs: per 1,000 input and output tokens, plus a flat price per call.

    The unit is whatever the task's author counts in (dollars, cents, credits); the job record's
    ``cost`` and ``budget`` use the same unit.
    """

    input_per_1k: float = 0.0
    output_per_1k: float = 0.0
    per_call: float = 0.0

    def cost(self, usage: Usage) -> float:
        return (
            usage.input_tokens * self.input_per_1k / 1000
            + usage.output_tokens * self.output_per_1k / 1000
            + usage.calls * self.per_call
        )

    def estimate(self, input_tokens: int, max_output_tokens: int | None) -> float:
        """The least a call can cost before it is made: its input (estimated from the prompt),
        the output it may produce when ``max_tokens`` bounds it, and the per-call price."""
        return (
            input_tokens * self.input_per_1k / 1000
            + (max_output_tokens or 0) * self.output_per_1k / 1000
            + self.per_call
        )

    @property
    def free(self) -> bool:
        return not (self.input_per_1k or self.output_per_1k or self.per_call)


FREE = Pricing()


class BudgetExceeded(PermanentError):
    """The next LLM call would take the job past its budget; no call was made."""

    def __init__(self, spent: float, estimate: float, budget: float) -> None:
        super().__init__(
            f"budget exceeded: {spent:.6g} spent, the next call costs at least {estimate:.6g}, "
            f"the budget is {budget:.6g}; no further call was made"
        )
        self.spent = spent
        self.estimate = estimate
        self.budget = budget


def estimate_tokens(text: str) -> int:
    """A rough token count (about four characters a token), for budget checks before a call."""
    return max(1, len(text) // 4)
