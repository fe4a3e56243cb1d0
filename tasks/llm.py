"""LLM calls as job steps: ``await ctx.llm(messages, response_model=Model, step="Summarise")``.

Two providers speak one small interface (:class:`Provider`): :class:`OpenAIProvider` posts to
``{STEPSTREAM_LLM_BASE_URL}/chat/completions`` of any OpenAI-compatible server, and
:class:`OfflineProvider` answers deterministically without a network (demos, tests, CI). Pick
one with ``STEPSTREAM_LLM_PROVIDER=offline|openai``.

Failure rules (docs/ai-workloads.md):

- 429, 5xx, timeouts and dropped connections are transient. They are retried *inside* the call
  up to ``STEPSTREAM_LLM_MAX_RETRIES`` times, waiting what ``Retry-After`` (or
  ``retry-after-ms``) asks when that is at most ``STEPSTREAM_LLM_MAX_INLINE_WAIT_SECONDS``, else
  a short exponential backoff. A short wait inside the call is cheaper than a job retry (no
  ``retrying``/``started`` events, the step's other work is kept); a long one would hold a
  worker slot idle, so past that limit, or when the retries run out, the call raises
  :class:`~tasks.errors.RetryAfter` (or a ``TransientError`` when the server named no delay)
  and the *job* retries after exactly that delay; its completed steps are restored from their
  checkpoints, so no succeeded call is made (or paid for) twice.
- A content-policy refusal (an HTTP 400 whose error code says so, ``finish_reason ==
  "content_filter"``, or a ``refusal`` in the message) is permanent: :class:`LLMRefused`.
  Any other 4xx (a bad key, an unknown model) is permanent too: :class:`LLMRequestError`.
- With ``response_model`` the reply must be a JSON object that validates. An invalid reply is
  asked again once, with the validation error in the conversation; a second invalid reply is
  permanent: :class:`LLMInvalidReply`. Both calls are counted and paid for.

Every call that got an answer is accounted for at once: a ``log`` event carries its ``usage``
and the job record's ``usage`` and ``cost`` totals move in the same atomic append; the step's
``step_completed`` carries the step's ``usage``. A budget check before each call refuses the
call (``BudgetExceeded``, permanent) when it would take the job past its budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from stepstream._backoff import Backoff
from stepstream._sse import AnyTypeEventSource
from stepstream.tasks import tracing
from stepstream.tasks.cost import Pricing, estimate_tokens
from stepstream.tasks.errors import PermanentError, RetryAfter, TransientError
from stepstream.tasks.models import Usage
from stepstream.tasks.settings import Settings

if TYPE_CHECKING:
    from stepstream.tasks.context import TaskContext

Message = dict[str, Any]
M = TypeVar("M", bound=BaseModel)


class LLMRefused(PermanentError):
    """The provider refused the request on content-policy grounds: no retry can change that."""


class LLMRequestError(PermanentError):
    """The provider rejected the request itself (4xx other than 429): a key, model or body
    problem that retrying does not fix."""


class LLMInvalidReply(PermanentError):
    """The reply did not fit the response model, twice (the second ask quoted the error)."""


class LLMUnavailable(TransientError):
    """5xx, a timeout or a dropped connection, after the retries inside the call."""


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


# -- the OpenAI-compatible provider ---------------------------------------------------------

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
            body, timeout, None, lambda r, t: _read_stream(r, model, t, prompt, on_delta)
        )

    async def _post(
        self,
        body: dict[str, Any],
        timeout: float | None,
        parse: Callable[[httpx.Response, float], Completion | None] | None,
        read: Callable[[httpx.Response, float], Awaitable[Completion]] | None = None,
    ) -> Completion:
        """One request with the retry rules of the module docstring: ``parse`` reads a whole
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


async def _read_stream(
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


# -- the offline provider -------------------------------------------------------------------

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


_SCHEMA_MARK = "JSON schema:\n"


def _schema_in(messages: Sequence[Message]) -> dict[str, Any] | None:
    for message in messages:
        content = str(message.get("content") or "")
        if message.get("role") == "system" and _SCHEMA_MARK in content:
            try:
                schema = json.loads(content.split(_SCHEMA_MARK, 1)[1])
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


# -- the provider a worker uses -------------------------------------------------------------


class Providers:
    """A worker's LLM providers, made on first use and kept for its lifetime (each HTTP client
    pools its connections); the worker closes them as it shuts down."""

    def __init__(self) -> None:
        self._made: dict[tuple[Any, ...], Provider] = {}

    def get(self, settings: Settings) -> Provider:
        """The provider ``settings`` configure."""
        key = (
            settings.llm_provider,
            settings.llm_base_url,
            settings.llm_api_key,
            settings.llm_timeout_seconds,
            settings.llm_max_retries,
            settings.llm_max_inline_wait_seconds,
            settings.llm_offline_word_seconds,
        )
        provider = self._made.get(key)
        if provider is None:
            provider = self._made[key] = make_provider(settings)
        return provider

    async def aclose(self) -> None:
        """Close the providers' HTTP clients (the worker's shutdown)."""
        made = list(self._made.values())
        self._made.clear()
        for provider in made:
            await provider.aclose()


def make_provider(settings: Settings) -> Provider:
    """A new provider as ``settings`` configure it (``STEPSTREAM_LLM_PROVIDER``)."""
    if settings.llm_provider == "openai":
        return OpenAIProvider(
            settings.llm_base_url,
            settings.llm_api_key,
            timeout=settings.llm_timeout_seconds,
            max_retries=settings.llm_max_retries,
            max_inline_wait=settings.llm_max_inline_wait_seconds,
        )
    return OfflineProvider(settings.llm_offline_word_seconds)


# -- a call made by a task ------------------------------------------------------------------


def schema_message(model: type[BaseModel]) -> Message:
    """The system message that asks for a JSON object fitting ``model``."""
    schema = json.dumps(model.model_json_schema(), separators=(",", ":"))
    return {
        "role": "system",
        "content": "Reply with one JSON object and nothing else. It must fit this "
        + _SCHEMA_MARK
        + schema,
    }


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_reply(text: str, model: type[M]) -> M:
    """The reply as ``model``; a reply wrapped in a Markdown code fence is accepted."""
    fenced = _FENCE.match(text)
    return model.model_validate_json(fenced.group(1) if fenced else text)


async def ask(
    ctx: TaskContext,
    messages: Sequence[Message],
    *,
    response_model: type[BaseModel] | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    pricing: Pricing | None = None,
    timeout: float | None = None,
    stream: bool = False,
) -> Any:
    """One logical LLM call: a JSON-ready value (the reply's text, or the validated model
    dumped to JSON), with the budget checked before each request and each answered request
    accounted on the job. With ``stream`` the reply is written into the current step as it
    arrives (``ctx.output()``, tasks/output.py) and its text returned."""
    if stream and response_model is not None:
        raise TypeError("stream=True streams text: it cannot be combined with response_model")
    settings = ctx.store.settings
    provider = ctx.llm_providers.get(settings)
    model_name = model or ctx.spec.model or settings.llm_model
    price = pricing or ctx.spec.pricing
    conversation: list[Message] = list(messages)
    if response_model is not None:
        conversation.insert(0, schema_message(response_model))
    for ask_number in (1, 2):
        prompt = " ".join(str(m.get("content") or "") for m in conversation)
        estimate = price.estimate(estimate_tokens(prompt), max_tokens)
        with _call_span(provider.name, model_name, max_tokens, temperature) as span:
            async with ctx.reserve_budget(estimate):
                if stream:
                    async with ctx.output() as out:
                        completion = await provider.stream(
                            conversation,
                            model=model_name,
                            on_delta=out.write,
                            max_tokens=max_tokens,
                            temperature=temperature,
                            timeout=timeout,
                        )
                    await _account(ctx, span, completion, price)
                    return completion.text
                completion = await provider.complete(
                    conversation,
                    model=model_name,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    json_mode=response_model is not None,
                    timeout=timeout,
                )
            await _account(ctx, span, completion, price)
        if response_model is None:
            return completion.text
        try:
            return parse_reply(completion.text, response_model).model_dump(mode="json")
        except (ValidationError, ValueError) as exc:
            problem = str(exc)[:2000]
            if ask_number == 2:
                raise LLMInvalidReply(
                    f"the LLM reply does not fit {response_model.__name__} after asking again: "
                    f"{problem}"
                ) from exc
            await ctx.log(
                f"the LLM reply does not fit {response_model.__name__}; asking again", "warning"
            )
            conversation += [
                {"role": "assistant", "content": completion.text},
                {
                    "role": "user",
                    "content": "Your reply does not fit the JSON schema: "
                    + problem
                    + "\nReply again with only a JSON object that fits it.",
                },
            ]
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def _call_span(
    system: str, model: str, max_tokens: int | None, temperature: float | None
) -> Iterator[tracing.Span]:
    """One model request's span, after the GenAI semantic conventions (``chat {model}``)."""
    span = tracing.start_span(
        f"chat {model}",
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": system,
            "gen_ai.provider.name": system,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.request.temperature": temperature,
        },
        kind="client",
    )
    try:
        with span.current():
            yield span
    except Exception as exc:
        span.fail(exc)
        raise
    finally:
        span.end()  # a no-op after ``_account`` ended it with its event


async def _account(
    ctx: TaskContext, span: tracing.Span, completion: Completion, price: Pricing
) -> None:
    """Record an answered call's spending on the job, and end its span with that event."""
    cost = price.cost(completion.usage)
    span.set(
        {
            "gen_ai.response.model": completion.model,
            "gen_ai.usage.input_tokens": completion.usage.input_tokens,
            "gen_ai.usage.output_tokens": completion.usage.output_tokens,
            "gen_ai.response.finish_reasons": completion.finish_reason,
            "stepstream.llm.cost": cost,
        }
    )
    span.end(await ctx.record_llm_usage(completion.usage, cost, completion.model))


async def llm_step(
    ctx: TaskContext,
    messages: Sequence[Message],
    *,
    response_model: type[M] | None = None,
    step: str | None = None,
    **options: Any,
) -> M | str:
    """``ask`` as the checkpointed step ``step`` (when given): a call that succeeded is stored
    with the step and, when the job runs again, restored instead of made (and paid) again."""

    async def call() -> Any:
        return await ask(ctx, messages, response_model=response_model, **options)

    if step is None:
        value = await call()
    elif options.get("stream"):
        # The step's text is the reply already: its step_completed says how long it is.
        value = await ctx.run_step(step, call, output=lambda text: {"characters": len(text)})
    else:
        value = await ctx.run_step(step, call)
    if response_model is None:
        return str(value)
    return response_model.model_validate(value)
