"""The offline model: deterministic replies without a network (demos, tests, CI)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from stepstream.tasks.llm.completion import SCHEMA_MARK, Completion, Message
from stepstream.tasks.models import Usage

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")


class OfflineProvider:
    """A deterministic stand-in that needs no network: the same messages give the same reply.

    Plain calls answer with the first sentence of the last user message; in JSON mode the reply
    fills the JSON schema found in the conversation (the one ``ctx.llm`` adds for a response
    model) with values drawn from that message. Tokens are counted as words.
    """

    name = "offline"

    def __init__(self, word_seconds: float = 0.0) -> None:
        self.word_seconds = word_seconds  # a streamed reply's pause before each word

    async def aclose(self) -> None:
        return None

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
        """The reply ``complete`` gives, a word at a time, ``word_seconds`` apart."""
        started = time.perf_counter()
        completion = await self.complete(messages, model=model, max_tokens=max_tokens)
        for word in re.findall(r"\S+\s*", completion.text):
            if self.word_seconds:
                await asyncio.sleep(self.word_seconds)
            await on_delta(word)
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        return dataclasses.replace(
            completion, usage=completion.usage.model_copy(update={"duration_ms": duration_ms})
        )

    async def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        json_mode: bool = False,
        timeout: float | None = None,
    ) -> Completion:
        started = time.perf_counter()
        prompt = " ".join(str(m.get("content") or "") for m in messages)
        last_user = next(
            (str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"),
            "",
        )
        words = _WORD.findall(last_user) or ["nothing"]
        schema = _schema_in(messages) if json_mode else None
        if schema is not None:
            text = json.dumps(_fill(schema, schema, words, 0))
        else:
            first = re.split(r"(?<=[.!?])\s+", last_user.strip(), maxsplit=1)[0]
            text = first[:400] or "Nothing to say."
        if max_tokens is not None:
            text = " ".join(text.split(" ")[:max_tokens]) if schema is None else text
        await asyncio.sleep(0)  # a real await, like a network call
        return Completion(
            text=text,
            model=f"offline:{model}",
            usage=Usage(
                calls=1,
                input_tokens=len(prompt.split()),
                output_tokens=len(text.split()),
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            ),
            finish_reason="stop",
        )


def _schema_in(messages: Sequence[Message]) -> dict[str, Any] | None:
    for message in messages:
        content = str(message.get("content") or "")
        if message.get("role") == "system" and SCHEMA_MARK in content:
            try:
                schema = json.loads(content.split(SCHEMA_MARK, 1)[1])
            except ValueError:
                return None
            return schema if isinstance(schema, dict) else None
    return None


def _fill(node: dict[str, Any], root: dict[str, Any], words: list[str], depth: int) -> Any:
    """A value that fits ``node`` (a JSON schema), made from ``words`` deterministically."""
    if "$ref" in node:
        name = str(node["$ref"]).rsplit("/", 1)[-1]
        return _fill(root.get("$defs", {}).get(name, {}), root, words, depth + 1)
    for combined in ("anyOf", "oneOf", "allOf"):
        if combined in node:
            options = [o for o in node[combined] if o.get("type") != "null"] or node[combined]
            return _fill(options[0], root, words, depth + 1)
    if "const" in node:
        return node["const"]
    if "enum" in node:
        return node["enum"][0]
    if "default" in node:
        return node["default"]
    digest = int(hashlib.sha256(" ".join(words).encode()).hexdigest()[:8], 16)
    kind = node.get("type", "string")
    if kind == "object":
        return {
            key: _fill(child, root, words, depth + 1)
            for key, child in node.get("properties", {}).items()
        }
    if kind == "array":
        count = max(1, int(node.get("minItems", 1)))
        count = min(count, int(node.get("maxItems", count)))
        item = node.get("items", {"type": "string"})
        return [_fill(item, root, words[i:] or words, depth + 1) for i in range(count)]
    if kind == "integer":
        low = int(node.get("minimum", 0))
        return max(low, min(int(node.get("maximum", low + 100)), low + digest % 100))
    if kind == "number":
        floor = float(node.get("minimum", 0.0))
        return max(floor, min(float(node.get("maximum", 1.0)), floor + (digest % 100) / 100))
    if kind == "boolean":
        return digest % 2 == 0
    if kind == "null":
        return None
    length = int(node.get("maxLength", 200))
    return " ".join(words[:12])[:length] or "x" * int(node.get("minLength", 1))
