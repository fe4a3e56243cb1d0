"""Tasks for the AI-workload tests (LLM calls, budgets, caching, batches, schedules).

Loaded by the stacks of those tests with
``STEPSTREAM_TASK_MODULES="tests.support.tasks,tests.support.ai_tasks"``.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel, Field

from stepstream.tasks import PermanentError, TaskContext, TransientError, task
from stepstream.tasks.cost import Pricing
from stepstream.tasks.registry import Backoff

FAST = Backoff(min_seconds=0.2, max_seconds=0.5, jitter=0.0)


class Summary(BaseModel):
    summary: str
    words: int = Field(ge=0)


class SummariseInput(BaseModel):
    text: str = "Stepstream runs long jobs. It streams their progress."
    fail_after_call_on_attempts: int = Field(
        default=0, description="raise a transient error after the call on the first N attempts"
    )


class SummariseOutput(BaseModel):
    summary: Summary
    note: str


@task(
    "llm_summarise",
    steps=["summarise", "check", "note"],
    input=SummariseInput,
    output=SummariseOutput,
    max_attempts=3,
    backoff=FAST,
    # 1.0 per 1k tokens in, 2.0 per 1k out, 0.001 per call: small numbers that add up exactly.
    pricing=Pricing(input_per_1k=1.0, output_per_1k=2.0, per_call=0.001),
)
async def llm_summarise(ctx: TaskContext, data: SummariseInput) -> SummariseOutput:
    """A structured LLM call, a step that may fail after it, and a plain-text call."""
    summary = await ctx.llm(
        [{"role": "user", "content": f"Summarise: {data.text}"}],
        response_model=Summary,
        step="summarise",
    )
    async with ctx.step("check"):
        if ctx.attempt <= data.fail_after_call_on_attempts:
            raise TransientError(f"flaky after the call on attempt {ctx.attempt}")
    note = await ctx.llm([{"role": "user", "content": "One word."}], step="note")
    return SummariseOutput(summary=summary, note=note)


class SpendInput(BaseModel):
    calls: int = Field(default=5, ge=1, le=5)


class SpendOutput(BaseModel):
    replies: list[str]


SPEND_STEPS = ["call 1", "call 2", "call 3", "call 4", "call 5"]


@task(
    "llm_spend",
    steps=SPEND_STEPS,
    input=SpendInput,
    output=SpendOutput,
    max_attempts=3,
    backoff=FAST,
    pricing=Pricing(per_call=0.01),
    budget=0.025,  # two calls fit, the third would not
)
async def llm_spend(ctx: TaskContext, data: SpendInput) -> SpendOutput:
    """Up to five checkpointed calls at 0.01 each."""
    replies = [
        await ctx.llm([{"role": "user", "content": f"Call {i}."}], step=SPEND_STEPS[i - 1])
        for i in range(1, data.calls + 1)
    ]
    return SpendOutput(replies=replies)


class OfflineInput(BaseModel):
    text: str = "Offline providers answer without a network. They are deterministic."


@task("llm_offline", steps=["summarise"], input=OfflineInput, output=Summary, max_attempts=1)
async def llm_offline(ctx: TaskContext, data: OfflineInput) -> Summary:
    """A structured call to whatever provider is configured (offline by default)."""
    return await ctx.llm(
        [{"role": "user", "content": data.text}], response_model=Summary, step="summarise"
    )


def executions_key(name: str) -> str:
    return f"test:ai:executions:{name}"


class EchoInput(BaseModel):
    value: int = 0
    fail: bool = False
    counter: str = Field(default="echo", description="the Redis counter this run increments")
    sleep: float = Field(default=0.0, ge=0, le=30)


class EchoOutput(BaseModel):
    value: int
    started_at: float


@task("ai_echo", steps=["echo"], input=EchoInput, output=EchoOutput, max_attempts=1)
async def ai_echo(ctx: TaskContext, data: EchoInput) -> EchoOutput:
    """Counts its executions; fails on request; returns its input and when it ran."""
    return await _echo(ctx, data)


async def _echo(ctx: TaskContext, data: EchoInput) -> EchoOutput:
    started = time.time()
    await ctx.store.redis.incr(executions_key(data.counter))
    async with ctx.step("echo"):
        if data.sleep:
            await asyncio.sleep(data.sleep)
        if data.fail:
            raise PermanentError(f"item {data.value} refused")
    return EchoOutput(value=data.value * 2, started_at=started)


@task(
    "ai_cached",
    steps=["echo"],
    input=EchoInput,
    output=EchoOutput,
    max_attempts=1,
    cache_ttl=60,
)
async def ai_cached(ctx: TaskContext, data: EchoInput) -> EchoOutput:
    """Like ``ai_echo``, with its results cached for a minute."""
    return await _echo(ctx, data)
