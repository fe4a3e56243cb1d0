"""A task's LLM call: ``ctx.llm(...)``, as a checkpointed step, with its budget, its
accounting on the job and its span."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from stepstream.tasks import tracing
from stepstream.tasks.cost import Pricing, estimate_tokens
from stepstream.tasks.llm.completion import SCHEMA_MARK, Completion, Message
from stepstream.tasks.llm.errors import LLMInvalidReply

if TYPE_CHECKING:
    from stepstream.tasks.context import TaskContext

M = TypeVar("M", bound=BaseModel)


def schema_message(model: type[BaseModel]) -> Message:
    """The system message that asks for a JSON object fitting ``model``."""
    schema = json.dumps(model.model_json_schema(), separators=(",", ":"))
    return {
        "role": "system",
        "content": "Reply with one JSON object and nothing else. It must fit this "
        + SCHEMA_MARK
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
