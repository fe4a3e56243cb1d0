"""A web process whose submission-rate clock the test sets, so that a test about the
per-second limit (``STEPSTREAM_SUBMISSIONS_PER_SECOND``) never waits for, or aligns to, the
wall-clock second.

The test holds a :class:`SetClock` (a file); the web process, started by :func:`add_clocked_web`
as ``uvicorn tests.support.clock:app``, reads the time from that file on every submit, and the
real time while the file is absent.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tests.support.processes import Uvicorn

CLOCK_FILE_ENV = "STEPSTREAM_TEST_CLOCK_FILE"


class SetClock:
    """The test's side: ``set(t)`` stops the web process's clock at ``t``; ``release()`` lets
    it run with the real time again."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, seconds: float) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(repr(seconds))
        partial.replace(self.path)  # whole, or not yet: never half a number

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


class _FileClock:
    """The web process's side: the time in the file, or the real time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> float:
        try:
            return float(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return time.time()


def add_clocked_web(stack: Any, clock: SetClock) -> Uvicorn:
    """A web process for ``stack`` (a tests.conftest.Stack) with ``clock``, stopped with it."""
    env = {**stack.env, CLOCK_FILE_ENV: str(clock.path)}
    web = Uvicorn("tests.support.clock:app", env, stack.log_dir).start()
    stack.webs.append(web)
    return web


def __getattr__(name: str) -> Any:
    if name == "app":  # built on first access, in the web process, as stepstream.server.app
        from stepstream.server.app import create_app

        clock = _FileClock(Path(os.environ[CLOCK_FILE_ENV]))
        return create_app(configure_logging=True, owns_process=True, clock=clock)
    raise AttributeError(name)
