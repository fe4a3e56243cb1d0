"""Run the ``stepstream`` command as a real process, with a deadline on every wait."""

from __future__ import annotations

import os
import pty
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from tests.support.processes import ROOT

COMMAND = [sys.executable, "-m", "stepstream.cli"]


def cli_env(url: str) -> dict[str, str]:
    env = {**os.environ, "STEPSTREAM_URL": url, "PYTHONUNBUFFERED": "1", "PYTHONUTF8": "1"}
    env.pop("STEPSTREAM_API_KEY", None)
    return env


def run_cli(
    url: str, *args: str, timeout: float = 60, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; its stdout is a pipe, so the output is plain."""
    return subprocess.run(
        [*COMMAND, *args],
        cwd=ROOT,
        env=cli_env(url),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ctrl_c_as_at_a_terminal() -> None:
    # A test run started in the background (`cmd &` in a script) ignores SIGINT, and so would the
    # command it starts: Python then installs no KeyboardInterrupt, and `interrupt()` would test
    # nothing. The command gets Ctrl-C as it does at a terminal, however the tests were started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LiveCli:
    """A command running in the background whose output lines a test can wait for."""

    def __init__(self, url: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*COMMAND, *args],
            cwd=ROOT,
            env=cli_env(url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_ctrl_c_as_at_a_terminal,
        )
        self.lines: list[str] = []
        self.stderr = ""
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _drain(self, timeout: float) -> bool:
        """Move queued lines into ``lines``; False once the output has ended."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            self.lines.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            open_ = self._drain(0.05)
            for line in self.lines[seen:]:
                if predicate(line):
                    return line
            seen = len(self.lines)
            if not open_:
                break
        raise AssertionError(f"no such line within {timeout}s; output so far: {self.lines}")

    def wait(self, timeout: float = 60) -> int:
        """Wait for the process to exit; collect all its output."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        self._reader.join(timeout=5)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                break
            self.lines.append(item)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        return code

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def run_cli_in_terminal(url: str, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as its stdout: what a person at a terminal sees."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [*COMMAND, *args],
        cwd=ROOT,
        env={**cli_env(url), "COLUMNS": "120"},
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.PIPE,
    )
    os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{args} still running after {timeout}s: {output[-500:]!r}")
            ready, _, _ = select.select([controller], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed: the process has exited
                break
            if not chunk:
                break
            output.extend(chunk)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
        os.close(controller)
    return code, output.decode(errors="replace")
