"""Tasks that start child jobs, for tests/test_children.py."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from pydantic import BaseModel, Field

from stepstream.tasks import PermanentError, TaskContext, TransientError, task
from stepstream.tasks.children import ChildFailed
from stepstream.tasks.registry import Backoff
from tests.support.tasks import count_execution, executions_key, gate_key


class LeafInput(BaseModel):
    n: int
    pace: float = 0.0
    fail: bool = False
    transient: bool = Field(default=False, description="fail every attempt, retryably")
    fail_first: bool = Field(default=False, description="fail attempt 1 only, permanently")
    gate: str | None = Field(default=None, description="wait for a push to this gate first")


class LeafOutput(BaseModel):
    square: int


@task(
    "fan_leaf",
    steps=["work"],
    input=LeafInput,
    output=LeafOutput,
    max_attempts=2,
    backoff=Backoff(min_seconds=0.05, max_seconds=0.1, jitter=0.0),
)
async def fan_leaf(ctx: TaskContext, data: LeafInput) -> LeafOutput:
    async with ctx.step("work"):
        await count_execution(ctx.store.redis, ctx.job_id, "work")
        if data.fail or (data.fail_first and ctx.attempt == 1):
            raise PermanentError(f"leaf {data.n} fails")
        await asyncio.sleep(data.pace)
        await ctx.progress(1, 2)
        if data.gate is not None:
            await ctx.store.redis.blpop([gate_key(data.gate)], timeout=60)
        await asyncio.sleep(data.pace)
        await ctx.progress(2, 2)
        if data.transient:
            raise TransientError(f"leaf {data.n} fails again")
    return LeafOutput(square=data.n * data.n)


class FanInput(BaseModel):
    count: int = 10
    pace: float = 0.0
    fail: list[int] = Field(default_factory=list)
    fail_first: list[int] = Field(default_factory=list)
    transient: list[int] = Field(default_factory=list)
    on_failure: str = "fail"
    max_failures: int | None = None
    concurrency: int | None = None
    gate: str | None = Field(default=None, description="every leaf waits for this gate")
    depth: int = Field(default=1, description="1: children are leaves; 2: grandchildren too")
    kill: str | None = Field(
        default=None,
        description="the first run's worker dies by SIGKILL just before it sends the children's "
        "creates (`before_create`), or once it has sent them, before it learns they were stored "
        "(`after_create`)",
    )


class FanOutput(BaseModel):
    squares: list[int | None]
    failed: list[int]


@task("fan_out", steps=["Fan out", "Merge"], input=FanInput, output=FanOutput, max_attempts=1)
async def fan_out(ctx: TaskContext, data: FanInput) -> FanOutput:
    await count_execution(ctx.store.redis, ctx.job_id, "run")
    runs = await ctx.store.redis.hget(executions_key(ctx.job_id), "run")
    if data.kill is not None and runs == "1":
        create_together = ctx.store.create_together

        async def create_and_die(calls: Any) -> Any:
            if data.kill == "after_create":
                await create_together(calls)
            os.kill(os.getpid(), signal.SIGKILL)

        ctx.store.create_together = create_and_die  # type: ignore[method-assign]
    if data.depth > 1:
        sub = {**data.model_dump(), "depth": data.depth - 1, "count": 2}
        results = await ctx.map("fan_out", [sub, sub], step="Fan out")
        squares = [s for r in results for s in r.squares]
        return FanOutput(squares=squares, failed=[])
    inputs = [
        LeafInput(
            n=i,
            pace=data.pace,
            fail=i in data.fail,
            fail_first=i in data.fail_first,
            transient=i in data.transient,
            gate=data.gate,
        )
        for i in range(data.count)
    ]
    results = await ctx.map(
        "fan_leaf",
        inputs,
        step="Fan out",
        concurrency=data.concurrency,
        on_failure="collect" if data.on_failure == "collect" else "fail",
        max_failures=data.max_failures,
    )
    async with ctx.step("Merge"):
        squares = [None if isinstance(r, ChildFailed) else r.square for r in results]
        failed = [r.index for r in results if isinstance(r, ChildFailed)]
    return FanOutput(squares=squares, failed=failed)


class SpawnInput(BaseModel):
    values: list[int]


@task("spawn_join", steps=["Spawn"], input=SpawnInput, output=FanOutput, max_attempts=1)
async def spawn_join(ctx: TaskContext, data: SpawnInput) -> FanOutput:
    handles = [await ctx.spawn("fan_leaf", {"n": v}) for v in data.values]
    results = await ctx.join(handles)
    return FanOutput(squares=[r.square for r in results], failed=[])


class SpendingInput(BaseModel):
    texts: list[str]


class SpendingOutput(BaseModel):
    notes: list[str]


@task("fan_spending", steps=["Summarise"], input=SpendingInput, output=SpendingOutput)
async def fan_spending(ctx: TaskContext, data: SpendingInput) -> SpendingOutput:
    """Children that spend on LLM calls (tests/support/ai_tasks.py's priced task)."""
    results = await ctx.map("llm_summarise", [{"text": t} for t in data.texts], step="Summarise")
    return SpendingOutput(notes=[r.note for r in results])
