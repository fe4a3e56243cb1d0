"""The README's first command: `stepstream up` starts Valkey, web and worker; Ctrl-C stops all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from stepstream import Client, Event, RetryingEvent, StartedEvent
from tests.support import http
from tests.support.api import DOC, get_job, submit, wait_state
from tests.support.processes import ROOT, free_port, wait_until

# Slow: starts whole deployments with `stepstream up` and stops them with Ctrl-C.
pytestmark = pytest.mark.slow


def start_up(
    data_dir: Path, port: int, log: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "STEPSTREAM_"))}
    env.update(extra_env or {})
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
        return http.get(f"{url}/readyz", timeout=1).status_code == 200
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


def time_wait_sockets(port: int) -> int:
    """Sockets on this local port in TIME_WAIT (state 06 in /proc/net/tcp)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "06":
                count += 1
    return count


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
        # A keep-alive connection the server closes as it stops leaves the port in TIME_WAIT,
        # as a browser tab does; starting again at once must still work.
        browser_like = httpx.Client(timeout=5)
        assert browser_like.get(f"{url}/healthz").status_code == 200
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
        browser_like.close()
    printed = log.read_text()
    assert f"http://127.0.0.1:{port}/" in printed
    # The exact line to reach this server from the CLI, and Valkey on a port of its own.
    assert f"STEPSTREAM_URL=http://127.0.0.1:{port} " in printed
    valkey_url = re.search(r"embedded Valkey at redis://127.0.0.1:(\d+)/0", printed)
    assert valkey_url is not None and valkey_url.group(1) != "6379", printed
    assert time_wait_sockets(port) > 0, "no TIME_WAIT left: the restart below proves nothing"

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


def test_ctrl_c_waits_out_the_workers_grace_so_a_running_job_costs_no_attempt(
    tmp_path: Path,
) -> None:
    # A grace longer than the 15 s after which `up` used to kill its children.
    grace = 16
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    env = {"STEPSTREAM_SHUTDOWN_GRACE_SECONDS": str(grace)}
    first = start_up(tmp_path / "data", port, log, env)
    try:
        wait_until(lambda: ready(url), 60, 0.2, "stepstream up to be ready")
        job = submit(url, "analyze_document", {"text": DOC, "pace": 4})
        wait_state(url, job["id"], {"running"}, timeout=30)
        pressed = time.monotonic()
        ctrl_c(first)
        assert first.wait(timeout=grace + 30) == 0, log.read_text()
        # The job outlasted the grace, so the worker handed it back rather than finishing it.
        assert time.monotonic() - pressed >= grace - 1
    finally:
        if first.poll() is None:
            first.kill()

    second = start_up(tmp_path / "data", port, log, env)
    try:
        wait_until(lambda: ready(url), 60, 0.2, "the second start to be ready")
        seen: list[Event] = []
        with Client(url) as client:
            for event in client.events(job["id"], after="0"):
                seen.append(event)
                if (
                    isinstance(event, StartedEvent)
                    and len([e for e in seen if isinstance(e, StartedEvent)]) == 2
                ):
                    break
        retrying = [e for e in seen if isinstance(e, RetryingEvent)]
        assert len(retrying) == 1, [e.type for e in seen]
        assert retrying[0].error is not None and retrying[0].error.type == "WorkerShutdown"
        # Handed back, the attempt is not charged: max_attempts went up by one with it.
        first_start, second_start = [e for e in seen if isinstance(e, StartedEvent)]
        assert second_start.max_attempts == first_start.max_attempts + 1
        # Nothing left running, so this stop need not wait out the grace a second time.
        http.post(f"{url}/api/jobs/{job['id']}/cancel", timeout=10)
        wait_state(url, job["id"], {"cancelled"}, timeout=30)
    finally:
        ctrl_c(second)
        try:
            second.wait(timeout=grace + 30)
        except subprocess.TimeoutExpired:
            second.kill()


def test_a_second_ctrl_c_hands_running_jobs_back_at_once(tmp_path: Path) -> None:
    """The first Ctrl-C waits out the grace period and says so; the second hands back now."""
    grace = 600  # far past any wait below: only the second Ctrl-C can end the stop in time
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    env = {"STEPSTREAM_SHUTDOWN_GRACE_SECONDS": str(grace)}
    first = start_up(tmp_path / "data", port, log, env)
    try:
        wait_until(lambda: ready(url), 60, 0.2, "stepstream up to be ready")
        job = submit(url, "analyze_document", {"text": DOC, "pace": 4})
        wait_state(url, job["id"], {"running"}, timeout=30)
        ctrl_c(first)
        said = f"waiting up to {grace} s for 1 running job(s)"
        wait_until(lambda: said in log.read_text(), 20, 0.2, "the worker to say what it waits for")
        assert "Ctrl-C again" in log.read_text()
        assert first.poll() is None, "the first Ctrl-C waits for the running job"
        ctrl_c(first)
        assert first.wait(timeout=60) == 0, log.read_text()
    finally:
        if first.poll() is None:
            first.kill()
    assert "handing back 1 running job(s) now" in log.read_text()

    second = start_up(tmp_path / "data", port, log)
    try:
        wait_until(lambda: ready(url), 60, 0.2, "the second start to be ready")
        with Client(url) as client:
            seen: list[Event] = []
            for event in client.events(job["id"], after="0"):
                seen.append(event)
                if isinstance(event, RetryingEvent):
                    break
        assert isinstance(seen[-1], RetryingEvent), [e.type for e in seen]
        assert seen[-1].error is not None and seen[-1].error.type == "WorkerShutdown"
        http.post(f"{url}/api/jobs/{job['id']}/cancel", timeout=10)
        wait_state(url, job["id"], {"cancelled", "completed"}, timeout=30)
    finally:
        ctrl_c(second)
        try:
            second.wait(timeout=40)
        except subprocess.TimeoutExpired:
            second.kill()
