"""The soak's processes: a Valkey, the web processes and the workers, and the faults they take
(each blocking until the stack is whole again)."""

from __future__ import annotations

import os
import random
import signal
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import redis

from bench.chaos.record import Run
from bench.common import LIFTED, rss_kib
from tests.support.processes import Process, Valkey, Web, Worker, stack_env

PREFIX = "chaos:"
# The test tasks, and the fan-out ones (a parent mapping ``fan_leaf`` over its inputs).
TASK_MODULES = "tests.support.tasks,tests.support.fanout_tasks"


class Stack:
    """Valkey, the web processes and the workers; every process stopped by ``close``."""

    def __init__(self, log_dir: Path, webs: int, workers: int) -> None:
        self.log_dir = log_dir
        self.valkey = Valkey(log_dir / "valkey")
        self.env = stack_env("", PREFIX, **LIFTED, STEPSTREAM_TASK_MODULES=TASK_MODULES)
        self.web_count, self.worker_count = webs, workers
        self.webs: list[Web] = []
        self.workers: list[Worker] = []
        self.retired: list[Process] = []  # killed on purpose; their logs stay for excerpts
        self.started_rss: dict[str, int] = {}  # a replacement's RSS (KiB) as it started

    def start(self) -> None:
        self.valkey.start()
        self.env["REDIS_URL"] = self.valkey.url
        for _ in range(self.web_count):
            self.webs.append(Web(self.env, self.log_dir).start())
        for _ in range(self.worker_count):
            self.workers.append(Worker(self.env, self.log_dir).start())

    def close(self) -> None:
        for process in [*self.workers, *self.webs]:
            with suppress(Exception):
                process.stop()
        with suppress(Exception):
            if self.valkey.server is not None:
                os.kill(self.valkey.server._process.pid, signal.SIGCONT)
        with suppress(Exception):
            self.valkey.stop()

    def redis(self) -> Any:  # redis.Redis, whose sync methods are typed as maybe awaitable
        return redis.Redis.from_url(self.valkey.url, decode_responses=True, socket_timeout=10)

    def pids(self) -> dict[str, int]:
        found = {p.name: p.proc.pid for p in [*self.webs, *self.workers] if p.proc and p.alive}
        if self.valkey.server is not None:
            found["valkey"] = self.valkey.server._process.pid
        return found

    # faults, each blocking until the stack is whole again

    def worker_sigkill(self) -> str:
        victim = random.choice(self.workers)
        victim.kill()
        return self._replace_worker(victim)

    def worker_sigterm(self) -> str:
        victim = random.choice(self.workers)
        victim.signal(signal.SIGTERM)
        with suppress(Exception):
            assert victim.proc is not None
            victim.proc.wait(timeout=15)  # the grace period (2 s) and the hand-back
        victim.kill()
        return self._replace_worker(victim)

    def _replace_worker(self, victim: Worker) -> str:
        victim.stop()
        self.workers.remove(victim)
        self.retired.append(victim)
        worker = Worker(self.env, self.log_dir).start()
        self.workers.append(worker)
        with suppress(OSError, RuntimeError):
            assert worker.proc is not None
            self.started_rss[worker.name] = rss_kib(worker.proc.pid)
        return victim.name

    def web_sigkill(self) -> str:
        victim = random.choice(self.webs)
        victim.kill()
        victim.stop()
        index = self.webs.index(victim)
        self.retired.append(victim)
        self.webs[index] = self._start_web(victim.port)
        return victim.name

    def _start_web(self, port: int) -> Web:
        deadline = time.monotonic() + 30
        while True:  # the port may linger for a moment after a SIGKILL
            try:
                return Web(self.env, self.log_dir, port=port).start()
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def valkey_restart(self) -> str:
        self.valkey.restart(down_for=random.uniform(0.2, 2.0))
        return "valkey"

    def valkey_pause(self) -> str:
        with self.valkey.paused():
            time.sleep(random.uniform(1.0, 4.0))
        return "valkey"

    def reap(self, run: Run) -> None:
        """A process that exited by itself is a defect: record it, then put it back."""
        for worker in list(self.workers):
            if not worker.alive:
                run.unexpected_exits.append((worker.name, tail(worker.log(), 25)))
                self._replace_worker(worker)
        for index, web in enumerate(list(self.webs)):
            if not web.alive:
                run.unexpected_exits.append((web.name, tail(web.log(), 25)))
                web.stop()
                self.retired.append(web)
                self.webs[index] = self._start_web(web.port)


def tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def measure_rss(stack: Stack) -> dict[str, int]:
    found = {}
    for name, pid in stack.pids().items():
        with suppress(OSError, RuntimeError):
            found[name] = rss_kib(pid)
    return found
