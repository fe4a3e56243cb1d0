"""The README's first command: `stepstream up` starts Valkey, web and worker; Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.api import DOC, get_job, submit, wait_state
from tests.support.processes import ROOT, free_port, wait_until


def start_up(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "STEPSTREAM_"))}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stepstream.cli",
                "up",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own, as in a terminal
        )


def ctrl_c(proc: subprocess.Popen[bytes]) -> None:
    """What Ctrl-C in a terminal does: SIGINT to every process of the foreground group."""
    os.killpg(proc.pid, signal.SIGINT)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines()[1:]:
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_up_runs_everything_stops_cleanly_and_keeps_jobs(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    first = start_up(tmp_path / "data", port, log)
    try:
        wait_until(lambda: ready(url), 60, 0.2, "stepstream up to be ready")
        children = descendants(first.pid)
        assert len(children) >= 3, "Valkey, web and worker"
        job = submit(url, "analyze_document", {"text": DOC})
        done = wait_state(url, job["id"], {"completed"}, timeout=30)
        pressed = time.monotonic()
        ctrl_c(first)
        assert first.wait(timeout=30) == 0
        # Valkey outlives the web process and the worker, which finish with it and exit at
        # once; a Valkey stopped first leaves the worker retrying Redis until it is killed.
        assert time.monotonic() - pressed < 10, "Ctrl-C stops everything within seconds"
        wait_until(
            lambda: all(not Path(f"/proc/{pid}").exists() for pid in children),
            20,
            0.2,
            "every child process to exit",
        )
    finally:
        if first.poll() is None:
            first.kill()
    assert f"http://127.0.0.1:{port}/" in log.read_text()

    second = start_up(tmp_path / "data", port, log)
    try:
        wait_until(lambda: ready(url), 60, 0.2, "the second start to be ready")
        again = get_job(url, job["id"])
        assert again["state"] == "completed" and again["result"] == done["result"]
    finally:
        ctrl_c(second)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
