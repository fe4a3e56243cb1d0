"""The arq worker: ``stepstream worker``, or ``arq stepstream.tasks.worker.WorkerSettings``.

``stepstream worker`` runs :class:`Worker`, arq's worker with one fix and wake-ups (below);
plain ``arq`` runs arq's own, which polls the queue every ``poll_delay`` seconds.

Plain and inspectable, as arq intends. The arq job id is the Stepstream job id, so enqueueing a
job twice is a no-op; results live in the job record, so arq keeps none (which also lets a job id
be enqueued again for a manual retry, see arq#432).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from typing import Any, cast

import arq.worker
from arq.worker import func, get_kwargs
from redis.exceptions import RedisError

from stepstream.tasks import llm, recurring, tracing
from stepstream.tasks.connection import arq_pool, arq_settings
from stepstream.tasks.errors import ConfigurationError
from stepstream.tasks.heartbeat import Heartbeat
from stepstream.tasks.inputs import INPUT_TIMEOUT
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.logs import setup_logging
from stepstream.tasks.outbox import Outbox
from stepstream.tasks.planes import OutboxDrain
from stepstream.tasks.queue import RUN_JOB
from stepstream.tasks.registry import TaskRegistry, load_tasks
from stepstream.tasks.runtime import JobMonitor, input_timeout, run_job
from stepstream.tasks.settings import Settings, get_settings
from stepstream.tasks.store import JobStore
from stepstream.tasks.wakeups import Wakeups
from stepstream.tasks.webhook_settings import Announcer

logger = logging.getLogger("stepstream.worker")


async def startup(ctx: dict[str, Any], *, settings: Settings, registry: TaskRegistry) -> None:
    problem = settings.worker_problem()
    if problem:  # `stepstream worker` said so before starting; arq's own CLI gets here
        raise ConfigurationError(problem)
    store = JobStore.open(settings)
    # Heartbeats and announced settings on REDIS_URL (the queue plane's server, which the CLI
    # and `stepstream doctor` read); the webhook outboxes on the log plane, with the logs.
    redis = store.queue
    monitor = JobMonitor(store, settings.lease_seconds)
    monitor.start()
    # What the jobs read from the worker: its tasks (runtime, recurring ticks) and LLM clients.
    ctx.update(registry=registry, llm_providers=llm.Providers())
    ctx.update(store=store, job_monitor=monitor)
    if store.cluster:  # what a process that died after its script left behind (tasks/planes.py)
        drain = OutboxDrain(store.redis, store.queue, store.keys)
        drain.start()
        ctx.update(queue_outbox=drain)
    beat = Heartbeat(
        redis,
        store.keys,
        lambda: list(monitor.running),
        interval=settings.worker_heartbeat_seconds,
        max_jobs=settings.max_jobs,
    )
    beat.start()
    announcer = Announcer(
        redis,
        store.keys,
        settings,
        role="worker",
        process_id=beat.worker_id,
        interval=settings.worker_heartbeat_seconds,
    )
    try:  # before the first delivery: whether other processes sign decides what it does
        await announcer.announce()
    except Exception:
        logger.warning("could not announce the webhook settings", exc_info=True)
    announcer.start()
    # Webhook deliveries run beside the jobs, never in a job slot (tasks/outbox.py): one reader
    # per partition's outbox (one on one server).
    outboxes = [
        Outbox(
            store.redis,
            part,
            settings,
            consumer=beat.worker_id,
            peers_sign=lambda: announcer.peers_sign,
        )
        for part in store.keys.every_partition()
    ]
    for outbox in outboxes:
        outbox.start()
    ctx.update(heartbeat=beat, outboxes=outboxes, webhook_settings=announcer)


async def shutdown(ctx: dict[str, Any]) -> None:
    if "heartbeat" in ctx:
        await ctx["heartbeat"].stop()  # gone from /api/stats at once, not after its TTL
    if "outboxes" in ctx:
        # Deliveries not done by then stay pending; another worker takes them over.
        await asyncio.gather(*(outbox.stop(grace=5.0) for outbox in ctx["outboxes"]))
    if "queue_outbox" in ctx:
        await ctx["queue_outbox"].stop()
    if "webhook_settings" in ctx:
        await ctx["webhook_settings"].stop()
    if "job_monitor" in ctx:
        await ctx["job_monitor"].stop()
    if "llm_providers" in ctx:
        await ctx["llm_providers"].aclose()  # their HTTP connection pools
    if "store" in ctx:
        await ctx["store"].aclose()


def worker_settings(settings: Settings | None = None, registry: TaskRegistry | None = None) -> type:
    """arq's settings class for a worker of ``settings`` (the environment's by default) that
    runs the tasks and recurring jobs of ``registry`` (by default the default registry, with
    the configured task modules imported).

    A function, not a class built at import: building it sets up logging and imports the task
    modules (their recurring declarations become cron jobs), which importing this module for
    ``main`` or for a test must not do.
    """
    config = settings or get_settings()
    # Before arq's CLI logs its first lines, which come before on_startup runs.
    setup_logging("worker", config)
    tracing.configure(config.tracing, "stepstream-worker")
    served = (
        registry
        if registry is not None
        else load_tasks(config.task_modules, demo=config.loads_demo_tasks)
    )

    class WorkerSettings:
        functions = [
            # Attempts are counted by Stepstream (max_attempts per task). arq counts every
            # pick-up, including a job that waits for a task's concurrency slot: its cap is only
            # a backstop.
            func(run_job, name=RUN_JOB, max_tries=1_000_000, timeout=config.job_timeout_seconds),
            # Ends a wait for input at its timeout (tasks/inputs.py).
            func(input_timeout, name=INPUT_TIMEOUT, max_tries=1_000, timeout=60),
        ]
        queue_name = Keys(config.prefix).queue
        # For arq's own CLI; `stepstream worker` makes its client with connection.arq_pool.
        redis_settings = arq_settings(config)
        # Recurring jobs declared in the task modules (tasks/recurring.py): one job per tick.
        cron_jobs = recurring.cron_jobs(served)
        on_startup = functools.partial(startup, settings=config, registry=served)
        on_shutdown = shutdown
        max_jobs = config.max_jobs
        # Plain arq polls this often. Worker polls as soon as a job is queued (tasks/wakeups.py)
        # and this often otherwise, for what no wake-up announces (a job due later, a retry).
        poll_delay = config.poll_delay_seconds
        keep_result = 0
        job_completion_wait = config.shutdown_grace_seconds
        health_check_key = f"{config.prefix}worker-health"

    return WorkerSettings


@functools.cache
def _environment_settings() -> type:
    return worker_settings()


def __getattr__(name: str) -> Any:
    # `arq stepstream.tasks.worker.WorkerSettings` still works, built when arq asks for it.
    if name == "WorkerSettings":
        return _environment_settings()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Logged when arq's own reads and writes around a job fail (Worker.run_job).
BOOKKEEPING_ERROR = "a Redis error in arq's bookkeeping around it"

# The shortest time between two queue polls, however many wake-ups come: a burst of submits
# costs Redis at most 100 polls a second per worker.
MIN_POLL_GAP_SECONDS = 0.01


class Worker(arq.worker.Worker):
    """arq's worker, woken when a job is queued, and kept alive through a Redis error inside its
    WATCH section.

    Wake-ups: arq sleeps ``poll_delay`` between polls, so a job waits half of it on average
    before it starts, and a short delay costs an idle worker CPU and Redis a poll every few
    milliseconds. This worker waits for a wake-up (tasks/wakeups.py) for at most ``poll_delay``
    instead: a queued job starts at once, and an idle worker polls twice a second.

    Redis errors: arq raises any error from its own Redis calls out of its poll loop, and the
    worker ends. Here none of them ends it (a Valkey restart can close a new connection during
    its handshake, which no client retries: docs/reliability.md, "A Redis error in arq's own
    bookkeeping"):

    - ``start_jobs`` takes a job slot, then WATCHes the job's in-progress key; an error there (a
      connection dropped while watching surfaces as ``WatchError``, see python-arq/arq#498) is
      raised outside the ``try`` that gives the slot back. Here the slot is returned and the next
      poll tries again.
    - ``run_job`` reads the job before running it and records its end after (``finish_job``).
      An error there leaves the queue entry, and the in-progress key lapses within the lease: the
      job is offered again, and Stepstream's ``run_job`` goes on from its record (an end that was
      written is only shown).
    - The poll's own reads (the queue, the health key) are tried again at the next poll.
    """

    _warned_at = 0.0

    def __init__(
        self, *args: Any, settings: Settings, lease_seconds: float, wakeups: str, **kwargs: Any
    ) -> None:
        self._hand_back_now = asyncio.Event()
        self._stop_signals = 0
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.wakeups = Wakeups(wakeups, poll_delay=self.poll_delay_s)
        # arq's loop sleeps what is left of this after each poll, and each poll ends by
        # waiting for a wake-up: so polls come at most this often.
        self.poll_delay_s = MIN_POLL_GAP_SECONDS
        # arq holds a job it takes for the job timeout + 10 s (an hour); the monitor cuts that to
        # the lease only once the job has started. A worker killed in between would leave the
        # job to nobody for the hour: hold it for the lease from the moment it is taken.
        self.in_progress_timeout_s = lease_seconds

    async def main(self) -> None:
        if self._pool is None:
            # As arq's create_pool makes it, from Stepstream's one client factory: arq's own
            # leaves the retry policy out of a Sentinel client.
            pool = arq_pool(self.settings)
            pool.job_serializer = self.job_serializer
            pool.job_deserializer = self.job_deserializer
            pool.expires_extra_ms = self.expires_extra_ms
            self._pool = pool
        await super().main()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        try:
            await super().start_jobs(job_ids)
        except (RedisError, OSError) as exc:
            # arq raised between taking the slot and its own release path: give it back.
            self.job_counter -= 1
            self.sem.release()
            self._warn("Redis error while starting a job; retrying: %r", exc)

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        except (RedisError, OSError) as exc:
            logger.warning(
                "job %s: %s; it is offered again when its lease lapses: %r",
                job_id,
                BOOKKEEPING_ERROR,
                exc,
                extra={"job_id": job_id},
            )

    async def _poll_iteration(self) -> None:
        self.wakeups.listen(self.pool)  # once: the pool exists from the first poll on
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            self._warn("Redis error while polling the queue; retrying: %r", exc)
        await self.wakeups.wait()

    def _warn(self, message: str, exc: BaseException) -> None:
        if time.monotonic() - self._warned_at > 1.0:  # polls can come every 10 ms
            self._warned_at = time.monotonic()
            logger.warning(message, exc)

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self.wakeups.wake()  # a free slot: a job left waiting in the queue can start now

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        """The first SIGINT or SIGTERM: take no new job, let running ones finish for the grace
        period, then hand the rest back (arq's). Said in words, with what a second one does: at
        a terminal the wait would look like a hang. The second: hand them back now."""
        self._stop_signals += 1
        if self._stop_signals > 1:
            running = sum(not task.done() for task in self.tasks.values())
            logger.warning(
                "%s again: handing back %d running job(s) now", signal.Signals(signum).name, running
            )
            self._hand_back_now.set()  # ends the wait below; arq then cancels what still runs
            return
        running = sum(not task.done() for task in self.tasks.values())
        if running:
            logger.warning(
                "stopping: waiting up to %d s for %d running job(s) to finish "
                "(STEPSTREAM_SHUTDOWN_GRACE_SECONDS); Ctrl-C again (or a second SIGTERM) hands "
                "them back to the queue now, at no cost of an attempt",
                self._job_completion_wait,
                running,
            )
        super().handle_sig_wait_for_completion(signum)

    async def _sleep_until_tasks_complete(self) -> None:
        while self.tasks and not self._hand_back_now.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hand_back_now.wait(), 0.1)

    async def close(self) -> None:
        await self.wakeups.close()
        await super().close()


def worker(settings: Settings | None = None, registry: TaskRegistry | None = None) -> Worker:
    """:class:`Worker` with :func:`worker_settings`, as ``stepstream worker`` runs it."""
    settings = settings or get_settings()
    # arq types get_kwargs' values as NameError; they are the settings' values.
    kwargs: dict[str, Any] = get_kwargs(cast(Any, worker_settings(settings, registry)))
    return Worker(
        **kwargs,
        settings=settings,
        lease_seconds=settings.lease_seconds,
        wakeups=Keys(settings.prefix).queue_wakeups,
    )


def main() -> None:
    """``stepstream worker``."""
    worker().run()
