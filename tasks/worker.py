"""The arq worker: ``arq tasks.worker.WorkerSettings``.

Plain and inspectable, as arq intends. The arq job id is the Stepstream job id, so enqueueing a
job twice is a no-op; results live in the job record, so arq keeps none (which also lets a job id
be enqueued again for a manual retry, see arq#432).
"""

from __future__ import annotations

from typing import Any

from arq.connections import RedisSettings
from arq.worker import func
from redis.asyncio import Redis

from tasks.keys import Keys
from tasks.registry import load_tasks
from tasks.runtime import RUN_JOB, CancelWatcher, run_job
from tasks.settings import get_settings
from tasks.store import JobStore

settings = get_settings()
load_tasks(settings.task_module_list)


async def startup(ctx: dict[str, Any]) -> None:
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    store = JobStore(redis, settings)
    watcher = CancelWatcher(store)
    watcher.start()
    ctx.update(store=store, cancel_watcher=watcher, store_redis=redis)


async def shutdown(ctx: dict[str, Any]) -> None:
    if "cancel_watcher" in ctx:
        await ctx["cancel_watcher"].stop()
    if "store_redis" in ctx:
        await ctx["store_redis"].aclose()


class WorkerSettings:
    functions = [
        # Attempts are counted by Stepstream (max_attempts per task); arq's own cap only guards
        # against a job that crashes its worker forever.
        func(run_job, name=RUN_JOB, max_tries=1_000, timeout=settings.job_timeout_seconds),
    ]
    queue_name = Keys(settings.prefix).queue
    redis_settings = RedisSettings.from_dsn(settings.redis_url)
    on_startup = startup
    on_shutdown = shutdown
    max_jobs = settings.max_jobs
    # arq polls the queue every 0.5 s by default: an idle worker would add up to that before a
    # job starts.
    poll_delay = settings.poll_delay_seconds
    keep_result = 0
    health_check_key = f"{settings.prefix}worker-health"
