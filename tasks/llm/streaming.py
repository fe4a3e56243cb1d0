"""A streamed chat completion (``stream: true``): server-sent events of
``chat.completion.chunk``, read with the one SSE decoder (stepstream/_sse.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from stepstream._sse import AnyTypeEventSource
from stepstream.tasks.cost import estimate_tokens
from stepstream.tasks.llm.completion import Completion
from stepstream.tasks.llm.errors import LLMRefused, LLMUnavailable
from stepstream.tasks.models import Usage


async def read_stream(
    response: httpx.Response,
    model: str,
    started: float,
    prompt: str,
    on_delta: Callable[[str], Awaitable[None]],
) -> Completion:
    """A streamed chat completion (server-sent events of ``chat.completion.chunk``): each
    ``choices[0].delta.content`` to ``on_delta``; the usage from the last chunk that has one
    (estimated from the text when none has)."""
    parts: list[str] = []
    usage: dict[str, Any] = {}
    finish_reason: str | None = None
    answered_model = model
    try:
        async for sse in AnyTypeEventSource(response).aiter_sse():
            payload = sse.data.strip()
            if not payload:
                continue  # a frame with only a comment, an event name or a retry
            if payload == "[DONE]":
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                raise LLMUnavailable(f"the LLM stream broke off: {chunk['error']}")
            answered_model = str(chunk.get("model") or answered_model)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                if delta.get("refusal") or choice.get("finish_reason") == "content_filter":
                    raise LLMRefused(
                        "the LLM refused to answer: "
                        + str(delta.get("refusal") or choice.get("finish_reason"))
                    )
                finish_reason = choice.get("finish_reason") or finish_reason
                content = delta.get("content")
                if content:
                    parts.append(str(content))
                    await on_delta(str(content))
    except httpx.TimeoutException as exc:
        raise LLMUnavailable("the LLM stream stalled past the timeout") from exc
    except httpx.TransportError as exc:
        raise LLMUnavailable(f"the LLM stream broke off: {exc!r}") from exc
    text = "".join(parts)
    return Completion(
        text=text,
        model=answered_model,
        usage=Usage(
            calls=1,
            input_tokens=int(usage.get("prompt_tokens") or estimate_tokens(prompt)),
            output_tokens=int(usage.get("completion_tokens") or estimate_tokens(text)),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        ),
        finish_reason=finish_reason,
    )
