"""What every provider speaks: chat messages in, one :class:`Completion` out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from stepstream.tasks.models import Usage

Message = dict[str, Any]

# Where the system message asking for a response model's JSON starts the schema: the step
# helpers write it (steps.schema_message), the offline model reads the schema after it.
SCHEMA_MARK = "JSON schema:\n"


@dataclass(frozen=True)
class Completion:
    """One answered chat-completions request."""

    text: str
    model: str
    usage: Usage  # calls=1, tokens in and out, the request's duration (retries included)
    finish_reason: str | None = None


class Provider(Protocol):
    """What a task's LLM calls need from a provider: one chat completion, retries included."""

    name: str

    async def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        json_mode: bool = False,
        timeout: float | None = None,
    ) -> Completion: ...

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        on_delta: Callable[[str], Awaitable[None]],
        max_tokens: int | None = None,
        temperature: float | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """``complete`` with the reply's text given to ``on_delta`` as it arrives."""
        ...

    async def aclose(self) -> None: ...
