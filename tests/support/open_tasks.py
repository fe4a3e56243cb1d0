"""A task whose input model takes fields it does not declare, and a recurring job whose input
has a misspelt field: for the unknown-input-field tests only (their own stacks load these)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from stepstream import TaskContext, task


class OpenInput(BaseModel):
    # The opt-in: without it, a field this model does not declare is refused at submission.
    model_config = ConfigDict(extra="allow")

    label: str = "open"


class OpenOutput(BaseModel):
    label: str
    extra: dict[str, Any]


@task("open_echo", steps=["echo"], input=OpenInput, output=OpenOutput, max_attempts=1)
async def open_echo(ctx: TaskContext, data: OpenInput) -> OpenOutput:
    """Returns the fields its input carried beyond ``label``."""
    async with ctx.step("echo"):
        return OpenOutput(label=data.label, extra=dict(data.model_extra or {}))
