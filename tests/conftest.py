"""Shared fixtures: a real Valkey for the session, and real web and worker processes."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.support.cluster import ValkeyCluster
from tests.support.processes import Valkey, Web, Worker, stack_env

_prefixes = itertools.count(1)


# Fixtures that start web and worker processes (each ~1.5 s to start, and their tests wait on
# real jobs running in them).
PROCESS_FIXTURES = frozenset({"stack", "make_stack", "module_stacks", "make_stack_module"})


# The longest files, measured (wall time each, summed per file, in a whole `./dev test` run),
# longest first: four test processes (`--no-loadscope-reorder`) each take the next file as they
# finish one, so with the long ones handed out first none is left running alone at the end. The
# rest (each under 25 s) run in file order.
LONGEST_FIRST = (
    "test_dashboard.py",
    "test_recovery.py",
    "test_contract.py",
    "test_chaos.py",
    "test_client.py",
    "test_creation.py",
    "test_cli.py",
    "test_auth.py",
    "test_sentinel.py",
    "test_inputs.py",
    "test_browser_client.py",
    "test_owner_limits.py",
    "test_cluster_store.py",
    "test_webhooks.py",
    "test_install.py",
    "test_hub.py",
    "test_ops.py",
    "test_output.py",
    "test_up.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Slow by nature, so `-m "not slow"` (the quick loop) leaves them out: a test that drives
    # Chromium, and one that runs real web and worker processes. What is left runs in-process
    # against one Valkey: the pure logic, and the app through ASGI.
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("browser") is not None or uses & PROCESS_FIXTURES:
            item.add_marker(pytest.mark.slow)
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Valkey]:
    server = Valkey(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.stop()


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[Valkey]:
    """A Valkey of the test's own, for tests that stop or restart it."""
    server = Valkey(tmp_path / "valkey").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """A Valkey Cluster of 3 primaries, each with a replica, shared by the tests of a module
    that leave its nodes alone (``own_cluster`` for one that kills a node)."""
    cluster = ValkeyCluster(tmp_path_factory.mktemp("valkey-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[ValkeyCluster]:
    """A Valkey Cluster (3 primaries, 3 replicas) of the test's own, for tests that kill a node."""
    cluster = ValkeyCluster(tmp_path / "valkey-cluster").start()
    yield cluster
    cluster.stop()


@dataclass
class Stack:
    """Web processes and workers sharing one Redis and one key prefix."""

    valkey: Valkey
    prefix: str
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    webs: list[Web] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return stack_env(self.valkey.url, self.prefix, **self.extra_env)

    def add_web(self, port: int | None = None) -> Web:
        web = Web(self.env, self.log_dir, port=port).start()
        self.webs.append(web)
        return web

    def add_worker(self) -> Worker:
        worker = Worker(self.env, self.log_dir).start()
        self.workers.append(worker)
        return worker

    def add(self, webs: int, workers: int) -> None:
        """Launched together, then waited for: the processes start in the time of the slowest
        (a worker, ~1.5 s) instead of the sum of them all."""
        new = len(self.webs), len(self.workers)
        for _ in range(webs):
            self.webs.append(Web(self.env, self.log_dir).launch())
        for _ in range(workers):
            self.workers.append(Worker(self.env, self.log_dir).launch())
        for process in [*self.webs[new[0] :], *self.workers[new[1] :]]:
            process.wait_ready()

    @property
    def url(self) -> str:
        return self.webs[0].url

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.valkey.url, decode_responses=True)

    def stop(self) -> None:
        for process in [*self.webs, *self.workers]:
            process.stop()


StackFactory = Callable[..., Stack]


def _stack_factory(valkey: Valkey, log_dir: Path) -> Iterator[StackFactory]:
    stacks: list[Stack] = []

    def build(webs: int = 1, workers: int = 1, **env: str) -> Stack:
        stack = Stack(valkey, f"t{next(_prefixes)}:", log_dir, dict(env))
        stacks.append(stack)
        try:
            stack.add(webs, workers)
        except BaseException:
            stack.stop()
            raise
        return stack

    yield build
    for stack in stacks:
        stack.stop()


@pytest.fixture
def make_stack(valkey: Valkey, tmp_path: Path) -> Iterator[StackFactory]:
    """Build a stack of its own for a test: ``make_stack(webs=2, workers=2, **env)``."""
    yield from _stack_factory(valkey, tmp_path)


@pytest.fixture(scope="module")
def module_stacks(
    valkey: Valkey, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackFactory]:
    """Like ``make_stack``, for stacks shared by the tests of one module."""
    yield from _stack_factory(valkey, tmp_path_factory.mktemp("module-stacks"))


@pytest.fixture(scope="module")
def make_stack_module(valkey: Valkey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of the module's own (one web, one worker), for tests that inspect the store."""
    own = Stack(valkey, f"m{next(_prefixes)}:", tmp_path_factory.mktemp("module-logs"))
    try:
        own.add(webs=1, workers=1)
        yield own
    finally:
        own.stop()


@pytest.fixture(scope="session")
def stack(valkey: Valkey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One web process and one worker shared by the tests that only submit and watch jobs."""
    shared = Stack(valkey, "shared:", tmp_path_factory.mktemp("shared-logs"))
    try:
        shared.add(webs=1, workers=1)
        yield shared
    finally:
        shared.stop()
