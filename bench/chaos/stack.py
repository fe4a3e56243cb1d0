"""The soak's processes: a Valkey, the web processes and the workers (and with ``--cluster`` a
Valkey Cluster for the log plane), and the faults they take (each blocking until the stack is
whole again)."""

from __future__ import annotations

import os
import random
import signal
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import redis
from redis.cluster import ClusterNode

from bench.chaos.record import Run
from bench.common import LIFTED, rss_kib
from stepstream.tasks.keyspace import Keys
from tests.support.cluster import ValkeyCluster
from tests.support.processes import Process, Valkey, Web, Worker, stack_env

PREFIX = "chaos:"
PARTITIONS = 24  # the log plane's partitions on the cluster (STEPSTREAM_CLUSTER_PARTITIONS)
# The test tasks, and the fan-out ones (a parent mapping ``fan_leaf`` over its inputs).
TASK_MODULES = "tests.support.tasks,tests.support.fanout_tasks"


class Stack:
    """Valkey, the web processes and the workers; every process stopped by ``close``. With
    ``cluster``, the log plane (records, logs, firehose, live delivery) is on a Valkey Cluster of
    3 primaries and 3 replicas, and the Valkey holds arq's queue only (the queue plane)."""

    def __init__(self, log_dir: Path, webs: int, workers: int, cluster: bool = False) -> None:
        self.log_dir = log_dir
        self.valkey = Valkey(log_dir / "valkey")
        self.cluster = ValkeyCluster(log_dir / "cluster") if cluster else None
        self.keys = Keys(PREFIX, PARTITIONS if cluster else 0)
        self.env = stack_env("", PREFIX, **LIFTED, STEPSTREAM_TASK_MODULES=TASK_MODULES)
        if cluster:
            self.env["STEPSTREAM_CLUSTER_PARTITIONS"] = str(PARTITIONS)
        self.web_count, self.worker_count = webs, workers
        self.webs: list[Web] = []
        self.workers: list[Worker] = []
        self.retired: list[Process] = []  # killed on purpose; their logs stay for excerpts
        self.started_rss: dict[str, int] = {}  # a replacement's RSS (KiB) as it started

    def start(self) -> None:
        self.valkey.start()
        self.env["REDIS_URL"] = self.valkey.url
        if self.cluster is not None:
            self.cluster.start()
        for _ in range(self.web_count):
            self.webs.append(Web(self.process_env(), self.log_dir).start())
        for _ in range(self.worker_count):
            self.workers.append(Worker(self.process_env(), self.log_dir).start())

    def process_env(self) -> dict[str, str]:
        """A new process's environment: on a cluster, a live node as its seed (a process
        started after a kill must not be given the dead node's address)."""
        env = dict(self.env)
        if self.cluster is not None:
            env["STEPSTREAM_CLUSTER_URL"] = self.cluster.url
        return env

    def close(self) -> None:
        for process in [*self.workers, *self.webs]:
            with suppress(Exception):
                process.stop()
        with suppress(Exception):
            if self.valkey.server is not None:
                os.kill(self.valkey.server._process.pid, signal.SIGCONT)
        with suppress(Exception):
            self.valkey.stop()
        if self.cluster is not None:
            with suppress(Exception):
                self.cluster.stop()

    def redis(self) -> Any:  # redis.Redis, whose sync methods are typed as maybe awaitable
        """A client of the log plane: the Valkey, or the cluster (found from a live node)."""
        if self.cluster is not None:
            # Every live node a seed: one may be killed while the client starts.
            seeds = [ClusterNode("127.0.0.1", node.port) for node in self.cluster.live_nodes]
            return redis.RedisCluster(startup_nodes=seeds, decode_responses=True, socket_timeout=10)
        return self.queue_redis()

    def queue_redis(self) -> Any:
        """A client of the queue plane (arq's queue): the Valkey."""
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
        worker = Worker(self.process_env(), self.log_dir).start()
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
                return Web(self.process_env(), self.log_dir, port=port).start()
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

    def primary_sigkill(self) -> str:
        """SIGKILL a cluster primary; once its replica has taken its slots, start the killed
        node again, as a replica of the promoted one, so that the next kill has one to promote."""
        assert self.cluster is not None
        shard = random.choice(self.cluster.shards)
        dead = shard.primary
        promoted = self.cluster.kill_primary(shard)
        self.cluster.rejoin(dead)
        return f"{dead.name}, {promoted.name} promoted"

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
