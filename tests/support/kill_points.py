"""Create one job, and SIGKILL this process just before its Nth command to Redis.

    python -m tests.support.kill_points submit|tick N

``submit``: a scheduled submission (``delay``, with an Idempotency-Key) through the web app's
own handler (the app and its lifespan in this process, over ASGI). ``tick``: one recurring
tick, as a worker's cron job makes it (``recurring.create_job``). Only the commands the
creation sends count (a context variable marks them), not the app's background ones. A run that
reaches its end without being killed prints ``done <status> <commands sent>``.

Each command is counted as it is handed to the connection, real Valkey on the other side: a
kill before command N leaves exactly what commands 1..N-1 stored.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import sys
from typing import Any

import httpx
from redis.asyncio.connection import AbstractConnection

_armed: contextvars.ContextVar[bool] = contextvars.ContextVar("armed", default=False)
_sent = 0


def _install(kill_at: int) -> None:
    original = AbstractConnection.send_packed_command

    async def send_packed_command(self: AbstractConnection, *args: Any, **kwargs: Any) -> None:
        global _sent
        if _armed.get():
            _sent += 1
            if _sent == kill_at:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        await original(self, *args, **kwargs)

    AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]


async def _submit() -> str:
    from stepstream.server.app import create_app

    app = create_app()
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            _armed.set(True)  # ASGITransport runs the app in this task: its commands count
            response = await client.post(
                "/api/jobs",
                json={"task": "ai_echo", "input": {"counter": "kill"}, "delay": 300},
                headers={"Idempotency-Key": os.environ["KILL_POINTS_KEY"]},
            )
            _armed.set(False)
    return str(response.status_code)


async def _tick() -> str:
    from stepstream.tasks.connection import arq_pool, connect
    from stepstream.tasks.recurring import create_job
    from stepstream.tasks.registry import load_tasks
    from stepstream.tasks.settings import get_settings
    from stepstream.tasks.store import JobStore

    settings = get_settings()
    registry = load_tasks(settings.task_modules, demo=settings.loads_demo_tasks)
    redis = connect(settings)
    arq = arq_pool(settings)
    try:
        (entry,) = [r for r in registry.recurring_jobs() if r.name == "tick"]
        _armed.set(True)
        record = await create_job(JobStore(redis, settings), arq, registry, entry)
        _armed.set(False)
    finally:
        await redis.aclose()
        await arq.aclose()
    return "created" if record is not None else "refused"


def main() -> None:
    mode, kill_at = sys.argv[1], int(sys.argv[2])
    _install(kill_at)
    outcome = asyncio.run(_submit() if mode == "submit" else _tick())
    print(f"done {outcome} {_sent}", flush=True)


if __name__ == "__main__":
    main()
