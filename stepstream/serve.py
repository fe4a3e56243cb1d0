"""``stepstream web`` and ``stepstream worker``: the two processes of a deployment.

One place says how each is started, so the Procfile, ``stepstream up`` and the tests run the
same command lines. Both put the current directory first on ``sys.path`` (``python -m`` and
``python -c`` do): a user's own ``tasks.py`` next to the Procfile is importable by its plain
name.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

WEB_APP = "stepstream.server.app:app"
WORKER_MODULE = "stepstream.tasks.worker"
EXIT_CONFIG = 78  # EX_CONFIG


def web_argv(
    host: str, port: int, *, graceful_shutdown_seconds: float = 10, log_level: str = "info"
) -> list[str]:
    """uvicorn serving the app, started through :func:`run_uvicorn` (not uvicorn's CLI, which
    cannot take a protocol class): see ``server/protocol.py``."""
    return [
        sys.executable,
        "-m",
        "stepstream.serve",
        "--host",
        host,
        "--port",
        str(port),
        "--timeout-graceful-shutdown",
        f"{graceful_shutdown_seconds:g}",
        "--log-level",
        log_level,
    ]


def run_uvicorn(argv: list[str] | None = None) -> None:
    """``python -m stepstream.serve``: uvicorn on :data:`WEB_APP` with limits on request heads,
    their time (``STEPSTREAM_HEADER_TIMEOUT_SECONDS``) and size (``STEPSTREAM_MAX_HEADER_BYTES``),
    and on idle keep-alive connections (5 s)."""
    import argparse

    import uvicorn

    from stepstream.server.protocol import http_protocol
    from stepstream.tasks.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m stepstream.serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--timeout-graceful-shutdown", type=float, default=10)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    settings = get_settings()
    uvicorn.run(
        WEB_APP,
        host=args.host,
        port=args.port,
        http=http_protocol(settings.header_timeout_seconds, settings.max_header_bytes),
        h11_max_incomplete_event_size=settings.max_header_bytes,  # uvicorn without httptools
        timeout_keep_alive=5,
        backlog=listen_backlog(settings.max_streams),
        timeout_graceful_shutdown=int(args.timeout_graceful_shutdown),
        log_level=args.log_level,
    )


# uvicorn's own listen backlog; the kernel caps any backlog at net.core.somaxconn.
UVICORN_BACKLOG = 2048


def listen_backlog(max_streams: int) -> int:
    """Connections the kernel may queue before the process accepts them: as many as the streams
    it may hold (up to the kernel's cap, ``net.core.somaxconn``). A reconnect storm's herd
    arrives faster than a process accepts; past a full queue the kernel drops a connection's
    SYN, and the client tries again only 1, 3, 7 or 15 s later: a storm's tail."""
    return max(UVICORN_BACKLOG, max_streams)


def worker_argv() -> list[str]:
    # Not arq's CLI: our Worker subclass survives a Redis error inside arq's WATCH section.
    # `-c` puts the working directory first on sys.path, as `-m` does for the web process.
    return [sys.executable, "-c", f"from {WORKER_MODULE} import main; main()"]


def task_env(tasks: str | None, demo: bool | None) -> dict[str, str]:
    """The environment that points both processes at the user's task modules."""
    env = dict(os.environ)
    if tasks is not None:
        env["STEPSTREAM_TASK_MODULES"] = tasks
    if demo is not None:
        env["STEPSTREAM_DEMO_TASKS"] = "true" if demo else "false"
    # arq's own CLI appends the working directory to sys.path; `python -m` already put it
    # first. PYTHONPATH keeps it there for anything the process starts in turn.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    return env


def configuration_problem(
    web_host: str | None, tasks: str | None = None, demo: bool | None = None
) -> str | None:
    """The first thing in the configuration that cannot work, as one plain line.

    Checked before a process starts, so an operator reads one sentence instead of the end of a
    traceback inside a JSON log line. ``web_host`` is None for a worker. The settings are read
    as the process will read them: this environment, with ``--tasks`` and ``--demo`` over it
    (:func:`task_env`). The task modules are imported from ``sys.path``: the caller puts the
    working directory there first, as ``python -m`` does for the processes.
    """
    try:
        from pydantic import ValidationError

        from stepstream.tasks.errors import ConfigurationError
        from stepstream.tasks.registry import load_tasks
        from stepstream.tasks.settings import Settings, describe_errors

        overrides: dict[str, Any] = {}
        if tasks is not None:
            overrides["task_modules"] = tasks
        if demo is not None:
            overrides["demo_tasks"] = demo
        try:
            settings = Settings(**overrides)
        except ValidationError as exc:
            return "; ".join(describe_errors(exc))
        problem = (
            settings.production_problem(web_host)
            if web_host is not None
            else settings.worker_problem()
        )
        if problem:
            return problem
        try:
            registry = load_tasks(settings.task_modules, demo=settings.loads_demo_tasks)
            if web_host is None:  # a worker fires the recurring jobs: each must fit its task
                from stepstream.tasks.recurring import check_declarations

                check_declarations(registry)
        except ConfigurationError as exc:
            return str(exc)
        return None
    except ImportError as exc:
        return (
            "the web server and the worker need the server extra: "
            f'pip install "/path/to/stepstream[server]", from a checkout or a wheel built from one '
            f"({exc})"
        )


def run_web(host: str, port: int, tasks: str | None, demo: bool | None) -> NoReturn:
    env = task_env(tasks, demo)
    _exit_on_problem(configuration_problem(host, tasks, demo))
    argv = web_argv(host, port)
    os.execve(argv[0], argv, env)


def run_worker(tasks: str | None, demo: bool | None) -> NoReturn:
    env = task_env(tasks, demo)
    _exit_on_problem(configuration_problem(None, tasks, demo))
    argv = worker_argv()
    os.execve(argv[0], argv, env)


def _exit_on_problem(problem: str | None) -> None:
    if problem:
        print(f"stepstream: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)


if __name__ == "__main__":
    run_uvicorn()
