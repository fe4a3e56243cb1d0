"""Two registries in one module, for tests/test_registry.py: ``ALPHA`` holds the task ``alpha``,
``BETA`` the task ``beta`` and a recurring job of it every 2 seconds. Nothing here goes into the
default registry.

``python -m tests.support.registries alpha|beta`` runs a worker of that registry alone, with
the settings from the environment.
"""

from __future__ import annotations

import sys

from pydantic import BaseModel

from stepstream.tasks.context import TaskContext
from stepstream.tasks.recurring import recurring
from stepstream.tasks.registry import TaskRegistry, task

ALPHA = TaskRegistry()
BETA = TaskRegistry()


class Note(BaseModel):
    text: str = ""


class Ran(BaseModel):
    task: str
    text: str
    reply: str = ""


@task("alpha", steps=["only"], input=Note, output=Ran, registry=ALPHA)
async def alpha(ctx: TaskContext, data: Note) -> Ran:
    async with ctx.step("only"):
        # Through the worker's LLM providers (the offline one unless configured).
        reply = await ctx.llm([{"role": "user", "content": data.text or "Hello there."}])
        return Ran(task="alpha", text=data.text, reply=reply)


@task("beta", steps=["only"], input=Note, output=Ran, registry=BETA)
async def beta(ctx: TaskContext, data: Note) -> Ran:
    async with ctx.step("only"):
        return Ran(task="beta", text=data.text)


recurring("beta-tick", task="beta", cron="* * * * * */2", input={"text": "tick"}, registry=BETA)

REGISTRIES = {"alpha": ALPHA, "beta": BETA}


def main() -> None:
    from stepstream.tasks.worker import worker

    worker(registry=REGISTRIES[sys.argv[1]]).run()


if __name__ == "__main__":
    main()
