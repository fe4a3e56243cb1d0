"""``stepstream up``: an embedded Valkey (unless REDIS_URL is set), the web server and a worker.

It starts processes; it imports nothing from ``stepstream.server``, and from ``stepstream.tasks``
only the settings and registry, to check the configuration before anything starts.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from stepstream.serve import EXIT_CONFIG, configuration_problem, task_env, web_argv, worker_argv
from stepstream.valkey import start_valkey

DEFAULT_SHUTDOWN_GRACE = 20.0
# Time past the worker's grace for its hand-back writes and arq's own shutdown.
HAND_BACK_MARGIN_SECONDS = 10.0


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # As uvicorn binds: a port whose last connections sit in TIME_WAIT (right after a
        # Ctrl-C) is free to listen on again.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _shutdown_grace(env: dict[str, str]) -> float:
    try:
        return float(env.get("STEPSTREAM_SHUTDOWN_GRACE_SECONDS", DEFAULT_SHUTDOWN_GRACE))
    except ValueError:
        return DEFAULT_SHUTDOWN_GRACE


def run_up(
    host: str,
    port: int,
    workers: int,
    data_dir: Path,
    tasks: str | None = None,
    demo: bool | None = None,
) -> int:
    if not _port_free(host, port):
        print(f"stepstream: port {port} is in use; choose another with --port", file=sys.stderr)
        return 1
    env = task_env(tasks, demo)
    problem = configuration_problem(host, tasks, demo)
    if problem:
        print(f"stepstream: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    valkey = None
    if "REDIS_URL" not in env:
        data_dir.mkdir(parents=True, exist_ok=True)
        # A port of its own, never 6379: a machine may already run Redis there.
        valkey = start_valkey(data_dir, _free_port())
        env["REDIS_URL"] = f"redis://127.0.0.1:{valkey.port}/0"
        print(f"stepstream: embedded Valkey at {env['REDIS_URL']}, data in {data_dir}")
    else:
        print(f"stepstream: using REDIS_URL={env['REDIS_URL']}")
    children: list[subprocess.Popen[bytes]] = []
    presses = 0  # Ctrl-C (or SIGTERM): the first stops, the second hands running jobs back now

    def stop(*_: object) -> None:
        nonlocal presses
        presses += 1

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    grace = _shutdown_grace(env)
    try:
        # Own sessions: Ctrl-C reaches only us, and we stop the children in order.
        web = web_argv(host, port, graceful_shutdown_seconds=5)
        children.append(subprocess.Popen(web, env=env, start_new_session=True))
        for _ in range(workers):
            children.append(subprocess.Popen(worker_argv(), env=env, start_new_session=True))
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        print(f"stepstream: dashboard and API on {url}/  (Ctrl-C stops everything)")
        print(f"stepstream: from another terminal: STEPSTREAM_URL={url} {_cli()} jobs")
        while not presses:
            exited = [child for child in children if child.poll() is not None]
            if exited:
                name = "the web process" if exited[0] is children[0] else "a worker"
                print(
                    f"stepstream: {name} exited (code {exited[0].returncode}); stopping the others",
                    file=sys.stderr,
                )
                return_code = 1
                break
            time.sleep(0.2)
        else:
            return_code = 0
    finally:
        _stop_children(children, grace, lambda: presses)
        if valkey is not None:
            valkey.stop()
        print("stepstream: stopped")
    return return_code


def _stop_children(
    children: list[subprocess.Popen[bytes]], grace: float, presses: Callable[[], int]
) -> None:
    """SIGTERM to each; a second Ctrl-C sends it again, which makes a worker hand its running
    jobs back at once instead of at the end of its grace period."""
    # A worker with running jobs says what it waits for, and what a second Ctrl-C does, itself
    # (it shares our terminal): only it knows how many jobs run.
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    seen = min(presses(), 1)  # a press from here on, even the first, hands jobs back now
    # A worker lets running jobs finish for the grace period, then hands them back: waiting
    # less would kill it mid-hand-back and charge the job an attempt.
    deadline = time.monotonic() + grace + HAND_BACK_MARGIN_SECONDS
    while time.monotonic() < deadline and any(child.poll() is None for child in children):
        if presses() > seen:
            seen = presses()
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            # From here the workers need only their hand-back writes.
            deadline = min(deadline, time.monotonic() + HAND_BACK_MARGIN_SECONDS)
        time.sleep(0.1)
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()


def _cli() -> str:
    """How to call the CLI from another terminal: the venv's bin is often not on PATH."""
    script = Path(sys.executable).with_name("stepstream")
    if not script.exists() or shutil.which("stepstream") == str(script):
        return "stepstream"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)
