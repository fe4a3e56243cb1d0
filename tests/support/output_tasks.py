"""Tasks that stream text into a step, for the streamed-output tests.

Loaded by those tests' stacks with
``STEPSTREAM_TASK_MODULES="tests.support.tasks,tests.support.output_tasks"``.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel, Field

from stepstream.tasks import TaskContext, TransientError, task
from stepstream.tasks.registry import Backoff
from tests.support.tasks import gate_key

STREAM_STEPS = ["prepare", "write", "finish"]


def word(i: int) -> str:
    """The ``i``-th word a streamer writes: unique, so a repeated or lost delta shows, and not
    all ASCII, so offsets that count bytes or UTF-16 units instead of characters show too."""
    return f"wörd{i:04d}{'🙂' if i % 7 == 0 else ''} "


def streamed_text(words: int) -> str:
    return "".join(word(i) for i in range(words))


class StreamerInput(BaseModel):
    words: int = Field(default=200, ge=0, le=100_000)
    word_seconds: float = Field(default=0.0, ge=0, le=5)
    llm: bool = Field(default=False, description="stream an offline LLM reply instead")
    fail_finish_attempts: int = Field(default=0, description="fail 'finish' on the first N")
    gate_at: int | None = Field(
        default=None, description="before this word, wait until the test opens the job's gate"
    )


class StreamerOutput(BaseModel):
    text: str


@task(
    "streamer",
    steps=STREAM_STEPS,
    input=StreamerInput,
    output=StreamerOutput,
    max_attempts=3,
    backoff=Backoff(min_seconds=0.2, max_seconds=0.5, jitter=0.0),
)
async def streamer(ctx: TaskContext, data: StreamerInput) -> StreamerOutput:
    """Writes ``words`` words into the step "write", ``word_seconds`` apart, checkpointed."""
    await ctx.run_step("prepare", _nothing)
    if data.llm:
        prompt = streamed_text(data.words).strip()
        text = await ctx.llm([{"role": "user", "content": prompt}], stream=True, step="write")
    else:

        async def write() -> str:
            async with ctx.output() as out:
                for i in range(data.words):
                    if i == data.gate_at:
                        # Mid-stream for as long as the test needs, however loaded the machine.
                        redis = ctx.store.redis
                        await redis.blpop([gate_key(ctx.job_id)], timeout=60)  # type: ignore[misc]
                    if data.word_seconds:
                        await asyncio.sleep(data.word_seconds)
                    await out.write(word(i))
            return streamed_text(data.words)

        text = await ctx.run_step("write", write, output=lambda t: {"characters": len(t)})

    async def finish() -> bool:
        if ctx.attempt <= data.fail_finish_attempts:
            raise TransientError(f"flaky finish on attempt {ctx.attempt}")
        return True

    await ctx.run_step("finish", finish)
    return StreamerOutput(text=text)


async def _nothing() -> bool:
    return True


class TokenStreamInput(BaseModel):
    tokens: int = Field(default=2_000, ge=1, le=1_000_000)
    rate: float = Field(default=200.0, gt=0, description="tokens per second")
    token: str = Field(default="tok ", description="each token's text, unless stamp")
    stamp: bool = Field(default=False, description="each token is its write time (time.time())")
    gate: bool = Field(default=False, description="wait for a push to the gate first")


class TokenStreamOutput(BaseModel):
    tokens: int


@task(
    "token_stream",
    steps=["write"],
    input=TokenStreamInput,
    output=TokenStreamOutput,
    max_attempts=1,
)
async def token_stream(ctx: TaskContext, data: TokenStreamInput) -> TokenStreamOutput:
    """bench/output.py's model: ``tokens`` deltas at ``rate`` per second into one step."""

    async def write() -> int:
        if data.gate:
            redis = ctx.store.redis
            await redis.blpop([gate_key(ctx.job_id)], timeout=120)  # type: ignore[misc]
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with ctx.output() as out:
            for i in range(data.tokens):
                delay = start + i / data.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await out.write(f"{time.time():.6f} " if data.stamp else data.token)
        return data.tokens

    tokens = await ctx.run_step("write", write, output=lambda n: {"tokens": n})
    return TokenStreamOutput(tokens=tokens)
