"""Options every demo task takes: a pace to watch it by, and failures on purpose."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from stepstream.tasks.context import TaskContext
from stepstream.tasks.errors import PermanentError, TransientError


class DemoOptions(BaseModel):
    pace: float = Field(
        default=0.0, ge=0.0, le=10.0, description="Seconds to wait before each step and event"
    )
    fail_at: str | None = Field(
        default=None, description="A step name at which the job fails on purpose (permanently)"
    )
    flaky_attempts: int = Field(
        default=0,
        ge=0,
        le=10,
        description="Fail the first N attempts at `fail_at` (or the first step) with a "
        "transient error, then succeed",
    )


async def checkpoint(ctx: TaskContext, options: DemoOptions, step: str) -> None:
    """Wait ``pace`` seconds, then raise the failure the options ask for at ``step``.

    Called inside ``ctx.step(step)``, so a failure is recorded against the step it names.
    """
    if options.pace:
        await asyncio.sleep(options.pace)
    target = options.fail_at or ctx.spec.steps[0]
    if step != target:
        return
    if options.flaky_attempts and ctx.attempt <= options.flaky_attempts:
        raise TransientError(f"simulated transient failure at {step} (attempt {ctx.attempt})")
    if options.fail_at and not options.flaky_attempts:
        raise PermanentError(f"simulated failure at step {step!r}, as the input asked")


async def paced_progress(
    ctx: TaskContext, options: DemoOptions, current: int, total: int, message: str
) -> None:
    if options.pace:
        await asyncio.sleep(options.pace)
    await ctx.progress(current, total, message)
