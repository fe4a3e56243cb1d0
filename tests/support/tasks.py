"""Tasks that exist only for tests: they count their executions and wait on gates in Redis,
so a test can interleave its own actions with a running job exactly."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from pydantic import BaseModel, Field

from stepstream.tasks import PermanentError, RetryAfter, TaskContext, TransientError, task
from stepstream.tasks.registry import Backoff

COUNTED_STEPS = ["one", "two", "three", "four", "five"]


class CountedInput(BaseModel):
    transient_failures: int = Field(default=0, description="fail this many attempts at `fail_at`")
    permanent_failure: bool = False
    fail_at: str = "three"
    gate_at: str | None = Field(default=None, description="wait for a push to the gate here")


class CountedOutput(BaseModel):
    steps: list[str]


def executions_key(job_id: str) -> str:
    # A hash tag: the key and its tokens set share a slot, for the script below on a cluster.
    return f"test:executions:{{{job_id}}}"


# Counts once per execution even when the client sends it again after a lost reply (a Valkey
# restart between running it and answering): each execution's token is added to a set first.
_COUNT_ONCE = """
if redis.call('SADD', KEYS[2], ARGV[2]) == 1 then
  redis.call('EXPIRE', KEYS[2], 3600)
  return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
end
return redis.call('HGET', KEYS[1], ARGV[1])
"""


async def count_execution(redis: Any, job_id: str, step: str) -> None:
    key = executions_key(job_id)
    await redis.eval(_COUNT_ONCE, 2, key, f"{key}:tokens", step, secrets.token_hex(8))


def gate_key(job_id: str) -> str:
    return f"test:gate:{job_id}"


@task(
    "counted",
    steps=COUNTED_STEPS,
    input=CountedInput,
    output=CountedOutput,
    max_attempts=3,
    backoff=Backoff(min_seconds=0.2, max_seconds=1.0, jitter=0.0),
)
async def counted(ctx: TaskContext, data: CountedInput) -> CountedOutput:
    """Five checkpointed steps that count how often each one really ran."""
    redis = ctx.store.redis
    done: list[str] = []
    for name in COUNTED_STEPS:

        async def body(name: str = name) -> str:
            await count_execution(redis, ctx.job_id, name)
            if data.gate_at == name:
                await redis.blpop([gate_key(ctx.job_id)], timeout=60)  # type: ignore[misc]
            if name == data.fail_at and data.permanent_failure:
                raise PermanentError(f"refused at {name}")
            if name == data.fail_at and ctx.attempt <= data.transient_failures:
                raise TransientError(f"flaky at {name} on attempt {ctx.attempt}")
            return name

        done.append(await ctx.run_step(name, body))
    return CountedOutput(steps=done)


class GatedInput(BaseModel):
    events: int = Field(default=5, ge=1, le=10_000)


class GatedOutput(BaseModel):
    events: int


@task("gated", steps=["emit"], input=GatedInput, output=GatedOutput, max_attempts=1)
async def gated(ctx: TaskContext, data: GatedInput) -> GatedOutput:
    """Emits one progress event each time the test pushes to the job's gate."""
    redis = ctx.store.redis
    async with ctx.step("emit"):
        for i in range(1, data.events + 1):
            await redis.blpop([gate_key(ctx.job_id)], timeout=60)  # type: ignore[misc]
            await ctx.progress(i, data.events, f"event {i}")
    return GatedOutput(events=data.events)


STAGED_STEPS = ["one", "two", "three", "four"]


class StagedInput(BaseModel):
    progress_per_step: int = Field(default=5, ge=1, le=1_000)


@task("staged", steps=STAGED_STEPS, input=StagedInput, output=GatedOutput, max_attempts=1)
async def staged(ctx: TaskContext, data: StagedInput) -> GatedOutput:
    """Every event waits for a push to the job's gate: each step's ``step``, its progress, its
    ``step_completed``, and the ``completed`` at the end (bench.fanout times each type)."""
    redis = ctx.store.redis
    gate = [gate_key(ctx.job_id)]
    events = 0
    for name in STAGED_STEPS:
        await redis.blpop(gate, timeout=60)  # type: ignore[misc]
        async with ctx.step(name):
            for i in range(1, data.progress_per_step + 1):
                await redis.blpop(gate, timeout=60)  # type: ignore[misc]
                await ctx.progress(i, data.progress_per_step, f"{name} {i}")
            await redis.blpop(gate, timeout=60)  # type: ignore[misc]
        events += data.progress_per_step + 2
    await redis.blpop(gate, timeout=60)  # type: ignore[misc]
    return GatedOutput(events=events + 1)


class BlockingInput(BaseModel):
    burst: int = Field(default=20, ge=1, le=1_000)
    block: float = Field(default=1.5, ge=0, le=10)


@task("blocking", steps=["work"], input=BlockingInput, output=GatedOutput, max_attempts=1)
async def blocking(ctx: TaskContext, data: BlockingInput) -> GatedOutput:
    """A burst of progress, some work, one more event, then synchronous work that blocks the
    event loop (as CPU-bound code written without ``asyncio.to_thread`` does)."""
    async with ctx.step("work"):
        for i in range(1, data.burst + 1):
            await ctx.progress(i, data.burst + 1, f"burst {i}")
        await asyncio.sleep(0.01)  # the work that leads to the next event
        await ctx.progress(data.burst, data.burst + 1, "before the block")
        time.sleep(data.block)  # noqa: ASYNC251 - blocking on purpose
        await ctx.progress(data.burst + 1, data.burst + 1, "after the block")
    return GatedOutput(events=data.burst + 2)


class BurstInput(BaseModel):
    events: int = Field(default=100, ge=1, le=100_000)
    padding: int = Field(default=0, ge=0, le=100_000, description="extra bytes per message")
    interval: float = Field(default=0, ge=0, le=1, description="seconds between events")


@task("burst", steps=["emit"], input=BurstInput, output=GatedOutput, max_attempts=1)
async def burst(ctx: TaskContext, data: BurstInput) -> GatedOutput:
    """Emits many progress events as fast as the store takes them (or ``interval`` apart)."""
    pad = "x" * data.padding
    async with ctx.step("emit"):
        for i in range(1, data.events + 1):
            await ctx.progress(i, data.events, f"event {i} {pad}")
            if data.interval:
                await asyncio.sleep(data.interval)
    return GatedOutput(events=data.events)


class SlowStepInput(BaseModel):
    sleep: float = Field(default=1.0, ge=0, le=60)
    timeout: float = Field(default=0.5, gt=0, le=60)


class Done(BaseModel):
    ok: bool = True


@task(
    "slow_step",
    steps=["wait"],
    input=SlowStepInput,
    output=Done,
    max_attempts=2,
    backoff=Backoff(min_seconds=0.1, max_seconds=0.1, jitter=0.0),
)
async def slow_step(ctx: TaskContext, data: SlowStepInput) -> Done:
    """A step that outlives its timeout."""
    async with ctx.step("wait", timeout=data.timeout):
        await asyncio.sleep(data.sleep)
    return Done()


class LimitedInput(BaseModel):
    hold: float = Field(default=0.3, ge=0, le=10)


@task("limited", steps=["hold"], input=LimitedInput, output=Done, max_attempts=1, concurrency=1)
async def limited(ctx: TaskContext, data: LimitedInput) -> Done:
    """At most one runs at a time across all workers; records the most it ever saw at once."""
    redis = ctx.store.redis
    async with ctx.step("hold"):
        now_running = await redis.incr("test:limited:running")
        await redis.eval(  # keep the maximum atomically
            "if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[1]) then "
            "redis.call('SET', KEYS[2], ARGV[1]) end",
            2,
            "test:limited:running",
            "test:limited:max",
            now_running,
        )
        await asyncio.sleep(data.hold)
        await redis.decr("test:limited:running")
    return Done()


class RetryLaterInput(BaseModel):
    seconds: float = Field(default=1.0, ge=0, le=60)


@task("retry_later", steps=["ask"], input=RetryLaterInput, output=Done, max_attempts=2)
async def retry_later(ctx: TaskContext, data: RetryLaterInput) -> Done:
    """Its first attempt asks to be retried after ``seconds`` (as a 429 with Retry-After does)."""
    async with ctx.step("ask"):
        if ctx.attempt == 1:
            raise RetryAfter(data.seconds)
    return Done()


class Decision(BaseModel):
    approved: bool
    note: str = ""
    level: int = Field(default=1, ge=1, le=5)


class AskInput(BaseModel):
    timeout: float | None = Field(default=None, gt=0, le=60)
    default: Decision | None = None
    hold: float = Field(default=0, ge=0, le=10, description="seconds the step before runs")
    hold_after: float = Field(default=0, ge=0, le=10, description="seconds the last step runs")


class AskOutput(BaseModel):
    before: str
    decision: Decision


@task("asks", steps=["before", "after"], input=AskInput, output=AskOutput, max_attempts=2)
async def asks(ctx: TaskContext, data: AskInput) -> AskOutput:
    """A checkpointed step, a wait for the input ``decision``, then a last step; counts each
    run from the top (``runs``) and each real execution of a step."""
    redis = ctx.store.redis
    await count_execution(redis, ctx.job_id, "runs")

    async def before() -> str:
        await count_execution(redis, ctx.job_id, "before")
        await asyncio.sleep(data.hold)
        return "checked"

    done = await ctx.run_step("before", before)
    try:
        decision = await ctx.wait_for_input(
            "decision",
            schema=Decision,
            prompt="Go on?",
            timeout=data.timeout,
            default=data.default,
        )
    except Exception as exc:  # a task's broad handler must not swallow the wait itself
        raise PermanentError(f"the wait was caught as an error: {exc!r}") from exc

    async def after() -> Decision:
        await count_execution(redis, ctx.job_id, "after")
        await asyncio.sleep(data.hold_after)
        return decision

    return AskOutput(before=done, decision=await ctx.run_step("after", after))


class StubbornOutput(BaseModel):
    interruptions: int


@task("stubborn", steps=["hold"], input=GatedInput, output=StubbornOutput, max_attempts=1)
async def stubborn(ctx: TaskContext, data: GatedInput) -> StubbornOutput:
    """Waits at its gate and swallows the interruption a cancel brings (a task with a bare
    ``except BaseException``): the worker can only say where it is stuck."""
    redis = ctx.store.redis
    interruptions = 0
    async with ctx.step("hold"):
        while True:
            try:
                # Said from inside what swallows the interruption: a cancel sent once this is
                # set cannot end the task (one sent earlier, entering the step, would).
                await redis.set(holding_key(ctx.job_id), 1, ex=120)
                await redis.blpop([gate_key(ctx.job_id)], timeout=60)  # type: ignore[misc]
                break
            except asyncio.CancelledError:
                interruptions += 1
    return StubbornOutput(interruptions=interruptions)


def holding_key(job_id: str) -> str:
    """Set by ``stubborn`` once it waits where it swallows an interruption."""
    return f"test:holding:{job_id}"


class RefusesInput(BaseModel):
    message: str


@task("refuses", steps=["check"], input=RefusesInput, output=Done, max_attempts=1)
async def refuses(ctx: TaskContext, data: RefusesInput) -> Done:
    """Fails at once with the message it was given, as a task whose error quotes its input."""
    async with ctx.step("check"):
        raise PermanentError(data.message)
