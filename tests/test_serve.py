"""``stepstream web`` and ``stepstream worker`` refuse a configuration that cannot work with one
plain line (exit code 78), before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import StackFactory, Valkey
from tests.support import http
from tests.support.processes import ROOT, Process, free_port, wait_until


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEPSTREAM_")}
    clean.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "stepstream.cli", *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"STEPSTREAM_MODE": "prod"}, ["STEPSTREAM_MODE", "'production'"]),
        ({"STEPSTREAM_LOG_FORMAT": "xml"}, ["STEPSTREAM_LOG_FORMAT", "'json'"]),
        ({"STEPSTREAM_LLM_PROVIDER": "opeani"}, ["STEPSTREAM_LLM_PROVIDER", "'openai'"]),
        ({"STEPSTREAM_TASK_MODULES": "no_such_jobs"}, ["no_such_jobs", "PYTHONPATH"]),
        (
            {
                "STEPSTREAM_SENTINELS": "10.0.0.5:26379,sentinel-b",
                "STEPSTREAM_SENTINEL_MASTER": "m",
            },
            ["STEPSTREAM_SENTINELS", "'sentinel-b' is not host:port"],
        ),
        ({"STEPSTREAM_SENTINELS": "10.0.0.5:26379"}, ["STEPSTREAM_SENTINEL_MASTER", "set both"]),
        (
            {"STEPSTREAM_CLUSTER_URL": "10.0.0.5:7000"},
            ["STEPSTREAM_CLUSTER_URL", "is not redis://host:port"],
        ),
        (
            {"STEPSTREAM_CLUSTER_URL": "redis://10.0.0.5:7000/3"},
            ["STEPSTREAM_CLUSTER_URL", "a cluster has only 0"],
        ),
    ],
)
def test_a_bad_setting_stops_the_worker_with_one_plain_line(
    env: dict[str, str], names: list[str], tmp_path: Path
) -> None:
    result = run(["worker"], tmp_path, REDIS_URL="redis://127.0.0.1:1/0", **env)
    assert result.returncode == 78, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert name in result.stderr


def test_production_without_a_secret_stops_the_web_process_with_one_plain_line(
    tmp_path: Path,
) -> None:
    port = str(free_port())
    result = run(["web", "--host", "0.0.0.0", "--port", port], tmp_path)
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1 and "STEPSTREAM_SECRET" in result.stderr


def test_a_users_tasks_py_is_found_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text("raise SystemExit('the users tasks.py was imported')\n")
    result = run(["worker", "--tasks", "tasks"], tmp_path, REDIS_URL="redis://127.0.0.1:1/0")
    # Importing it ran its code (which stops here on purpose): it was found by its plain name.
    assert "the users tasks.py was imported" in result.stderr


DEMOS = {"analyze_document", "generate_quote"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "env", "demos"),
    [
        ([], {}, True),  # nothing of the user's named: the demos, as `stepstream up` shows them
        (["--tasks", "tests.support.open_tasks"], {}, False),
        (["--tasks", "tests.support.open_tasks", "--demo"], {}, True),
        ([], {"STEPSTREAM_TASK_MODULES": "tests.support.open_tasks"}, False),
        (
            [],
            {"STEPSTREAM_TASK_MODULES": "tests.support.open_tasks", "STEPSTREAM_DEMO_TASKS": "1"},
            True,
        ),
    ],
)
def test_the_demo_tasks_come_beside_a_users_module_only_when_asked_for(
    options: list[str], env: dict[str, str], demos: bool, valkey: Valkey, tmp_path: Path
) -> None:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEPSTREAM_")}
    clean.update(env, PYTHONPATH=str(ROOT), REDIS_URL=valkey.url, STEPSTREAM_PREFIX=f"demo{port}:")
    argv = [sys.executable, "-m", "stepstream.cli", "web", "--port", str(port), *options]
    web = Process("web", argv, clean, tmp_path).launch()
    url = f"http://127.0.0.1:{port}/api/tasks"

    def served() -> set[str] | None:
        if not web.alive:
            raise RuntimeError(f"stepstream web exited:\n{web.log()}")
        try:
            response = http.get(url, timeout=1)
        except httpx.HTTPError:
            return None
        return (
            {t["name"] for t in response.json()["tasks"]} if response.status_code == 200 else None
        )

    try:
        wait_until(lambda: served() is not None, 30, what="stepstream web")
        names = served()
    finally:
        web.stop()
    assert names is not None
    assert DEMOS & names == (DEMOS if demos else set()), names
    assert ("open_echo" in names) is bool(options or env), names


def test_the_web_process_queues_as_many_connections_as_the_streams_it_may_hold(
    make_stack: StackFactory,
) -> None:
    """A reconnect storm's herd arrives faster than a web process accepts: the kernel queues up
    to STEPSTREAM_MAX_STREAMS connections (capped by net.core.somaxconn) instead of uvicorn's
    2,048, past which it drops their SYNs and the clients try again only 1, 3 or 7 s later."""
    cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert cap > 2048, "this kernel caps every backlog at 2,048: nothing to see"
    s = make_stack(workers=0, STEPSTREAM_MAX_STREAMS="3000")
    port = s.url.rsplit(":", 1)[1]
    listening = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
    ).stdout.split()
    assert listening[0] == "LISTEN", listening
    assert int(listening[2]) == min(3000, cap)  # ss shows a listening socket's backlog in Send-Q
