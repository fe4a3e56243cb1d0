"""The OpenAI-compatible provider: ``POST {base_url}/chat/completions``, with the retry rules
of the package docstring inside the call."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from stepstream._backoff import Backoff
from stepstream.tasks import tracing
from stepstream.tasks.errors import PermanentError, RetryAfter, TransientError
from stepstream.tasks.llm.completion import Completion, Message
from stepstream.tasks.llm.errors import LLMRefused, LLMRequestError, LLMUnavailable
from stepstream.tasks.llm.streaming import read_stream
from stepstream.tasks.models import Usage

_POLICY_CODES = frozenset({"content_policy_violation", "content_filter", "content_filtered"})


def parse_retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, or ``Retry-After`` as seconds
    or an HTTP date; None when it names no delay."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


class OpenAIProvider:
    """``POST {base_url}/chat/completions`` with ``Authorization: Bearer {api_key}``."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        max_inline_wait: float = 10.0,
        backoff: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout = timeout
        self.max_retries = max(0, max_retries)
        self.max_inline_wait = max_inline_wait
        self.backoff = backoff
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._client.aclose()

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
        body = _request_body(messages, model, max_tokens, temperature)
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        return await self._post(body, timeout, lambda r, t: _parse_completion(r, model, t))

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
        """A ``stream: true`` request. Failures before the reply starts are retried as in
        ``complete``; once text has arrived, a broken stream raises ``LLMUnavailable`` (the
        job's next attempt streams the step again from its start)."""
        body = _request_body(messages, model, max_tokens, temperature)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        prompt = " ".join(str(m.get("content") or "") for m in messages)
        return await self._post(
            body, timeout, None, lambda r, t: read_stream(r, model, t, prompt, on_delta)
        )

    async def _post(
        self,
        body: dict[str, Any],
        timeout: float | None,
        parse: Callable[[httpx.Response, float], Completion | None] | None,
        read: Callable[[httpx.Response, float], Awaitable[Completion]] | None = None,
    ) -> Completion:
        """One request with the retry rules of the package docstring: ``parse`` reads a whole
        answer (None: not a completion, retried), ``read`` a streamed one."""
        started = time.perf_counter()
        tries = self.max_retries + 1
        for number in range(1, tries + 1):
            backoff = Backoff(self.backoff, self.max_inline_wait, jitter=0.0).delay(number)
            failure: TransientError
            wait: float
            try:
                request = self._client.build_request(
                    "POST", self.url, json=body, timeout=timeout or self.timeout
                )
                response = await self._client.send(request, stream=read is not None)
            except httpx.TimeoutException:
                failure = LLMUnavailable(
                    f"the LLM call timed out after {timeout or self.timeout:g}s ({number} of "
                    f"{tries} tries)"
                )
                wait = backoff
            except httpx.TransportError as exc:
                failure = LLMUnavailable(f"the LLM server could not be reached: {exc!r}")
                wait = backoff
            else:
                status = response.status_code
                if read is not None and status < 400:
                    async with contextlib.aclosing(response):
                        return await read(response, started)
                if read is not None:
                    await response.aread()  # the error's body, for the message
                    await response.aclose()
                if status == 429 or status >= 500:
                    asked = parse_retry_after(response.headers)
                    message = f"the LLM server answered {status} ({number} of {tries} tries)"
                    if asked is None:
                        failure, wait = LLMUnavailable(message), backoff
                    else:
                        failure = RetryAfter(asked, f"{message}; retry after {asked:g}s")
                        wait = asked
                        if asked > self.max_inline_wait:
                            raise failure  # too long to hold a worker slot: the job retries
                elif status >= 400:
                    raise _request_error(response)
                else:
                    assert parse is not None  # a stream's 2xx was read above
                    completion = parse(response, started)
                    if completion is not None:
                        return completion
                    failure = LLMUnavailable(
                        "the LLM server sent a reply that is not a chat completion"
                    )
                    wait = backoff
            if number == tries:
                raise failure
            # The wait is the call's own: its span shows it (GenAI spans have no such field).
            tracing.add_event(
                "retry_wait",
                {"error.type": type(failure).__name__, "stepstream.wait_seconds": wait},
            )
            await self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def _request_body(
    messages: Sequence[Message], model: str, max_tokens: int | None, temperature: float | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": list(messages)}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    return body


def _request_error(response: httpx.Response) -> PermanentError:
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    code = str(error.get("code") or error.get("type") or "")
    message = str(error.get("message") or response.text[:500])
    if code in _POLICY_CODES or "content policy" in message.lower():
        return LLMRefused(f"the LLM provider refused the request: {message}")
    return LLMRequestError(f"the LLM server answered {response.status_code}: {message}")


def _parse_completion(response: httpx.Response, model: str, started: float) -> Completion | None:
    """The completion in a 2xx answer; None when the body is not one (retried as transient)."""
    try:
        data = response.json()
        choice = data["choices"][0]
        message = choice["message"]
        finish_reason = choice.get("finish_reason")
        if message.get("refusal") or finish_reason == "content_filter":
            raise LLMRefused(
                "the LLM refused to answer: " + str(message.get("refusal") or finish_reason)
            )
        text = message.get("content") or ""
        usage = data.get("usage") or {}
        return Completion(
            text=str(text),
            model=str(data.get("model") or model),
            usage=Usage(
                calls=1,
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            ),
            finish_reason=finish_reason,
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
