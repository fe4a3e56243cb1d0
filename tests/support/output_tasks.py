"""Tasks that stream text into a step, for the streamed-output tests.

Loaded by those tests' stacks with
``STEPSTREAM_TASK_MODULES="tests.support.tasks,tests.support.output_tasks"``.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from stepstream.tasks import TaskContext, TransientError, task
from stepstream.tasks.registry import Backoff

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
