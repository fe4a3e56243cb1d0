"""Stepstream mounted at ``/progress`` inside a host app (FastAPI, and plain Starlette).

Real uvicorn runs the host app, a real worker runs the jobs: submit, stream and the dashboard
work under the prefix, every path the API hands out carries it, and the host's own routes,
response headers and logging are untouched.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.routing import Mount

from stepstream import Client, JobState
from stepstream.server import create_app
from stepstream.tasks.settings import Settings
from tests.conftest import Valkey
from tests.support import http, readme
from tests.support.host_app import HOST_FORMAT
from tests.support.processes import (
    Process,
    Uvicorn,
    Worker,
    free_port,
    stack_env,
    wait_until,
)
from tests.support.sse import StreamReader
from tests.support.tasks import gate_key

PREFIX = "/progress"


class Host(Uvicorn):
    """``uvicorn --factory tests.support.host_app:<factory>`` at uvicorn's own log level."""

    ready_path = f"{PREFIX}/readyz"

    def __init__(self, factory: str, env: dict[str, str], log_dir: Path) -> None:
        app = f"tests.support.host_app:{factory}"
        super().__init__(app, env, log_dir, options=("--factory",), name=factory)


@pytest.fixture(scope="module")
def worker(valkey: Valkey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    process = Worker(stack_env(valkey.url, "mount:"), tmp_path_factory.mktemp("mount-worker"))
    process.start()
    yield process
    process.stop()


@pytest.fixture(params=["fastapi_host", "starlette_host"])
def host(
    request: pytest.FixtureRequest, valkey: Valkey, worker: Worker, tmp_path: Path
) -> Iterator[Host]:
    # Text, so a line in Stepstream's own format would be told from the host's at a glance;
    # the JSON default would do as well (the test refuses JSON lines too).
    env = stack_env(valkey.url, "mount:", STEPSTREAM_LOG_FORMAT="text")
    process = Host(request.param, env, tmp_path)
    try:
        yield process.start()
    finally:
        process.stop()


def test_submit_and_stream_under_the_prefix(host: Host, valkey: Valkey) -> None:
    response = http.post(
        f"{host.url}{PREFIX}/api/jobs", json={"task": "gated", "input": {"events": 2}}, timeout=10
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"{PREFIX}/api/jobs/{job['id']}"
    assert job["links"] == {
        "self": f"{PREFIX}/api/jobs/{job['id']}",
        "events": f"{PREFIX}/api/jobs/{job['id']}/events",
    }
    # Stepstream's own responses keep their security headers.
    assert response.headers["x-frame-options"] == "DENY"

    # Live through the mount: the job waits on its gate until the stream is open.
    stream = StreamReader(f"{host.url}{job['links']['events']}?after=0").start()
    try:
        stream.wait_for(lambda events: any(e.type == "step" for e in events))
        gate = redis.Redis.from_url(valkey.url)
        for _ in range(2):
            gate.rpush(gate_key(job["id"]), "go")
        events = stream.wait_closed()
    finally:
        stream.close()
    assert stream.status == 200
    assert [e.data["message"] for e in events if e.type == "progress"] == ["event 1", "event 2"]
    assert events[-1].type == "completed"

    record = http.get(f"{host.url}{job['links']['self']}", timeout=10).json()
    assert record["state"] == "completed"
    assert record["links"] == job["links"]
    listed = http.get(f"{host.url}{PREFIX}/api/jobs", timeout=10).json()["jobs"]
    assert all(j["links"]["self"].startswith(f"{PREFIX}/api/jobs/") for j in listed)

    token = http.post(f"{host.url}{job['links']['self']}/token", timeout=10).json()["token"]
    with_token = f"{host.url}{job['links']['events']}?after=0&token={token}"
    replay = StreamReader(with_token).start().wait_closed()
    assert [e.id for e in replay] == [e.id for e in events]

    spec = http.get(f"{host.url}{PREFIX}/openapi.json", timeout=10).json()
    assert spec["servers"] == [{"url": PREFIX}]


def test_the_python_client_takes_the_prefix_in_its_base_url(host: Host) -> None:
    with Client(f"{host.url}{PREFIX}") as client:
        job = client.submit("counted", {})
        types = [event.type for event in client.events(job.id, after="0")]
        assert client.wait(job.id, timeout=30).state is JobState.completed
    assert types[-1] == "completed"


def test_batch_location_carries_the_prefix(host: Host) -> None:
    response = http.post(
        f"{host.url}{PREFIX}/api/batches",
        json={"task": "counted", "inputs": [{}, {}]},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    batch = response.json()
    assert response.headers["location"] == f"{PREFIX}/api/batches/{batch['id']}"
    assert batch["links"]["self"] == f"{PREFIX}/api/jobs/{batch['id']}"


def test_dashboard_loads_under_the_prefix(host: Host) -> None:
    bare = http.get(f"{host.url}{PREFIX}", timeout=10)
    assert bare.status_code in (307, 308)
    assert urljoin(f"{host.url}{PREFIX}", bare.headers["location"]) == f"{host.url}{PREFIX}/"

    page = http.get(f"{host.url}{PREFIX}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>Stepstream</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]

    # Every file the page asks for resolves under the mount, as a browser resolves it.
    assets = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', page.text)
    assert any(a.endswith("app.js") for a in assets), assets
    for asset in assets:
        url = urljoin(f"{host.url}{PREFIX}/", asset)
        assert url.startswith(f"{host.url}{PREFIX}/"), f"{asset} leaves the mount"
        assert http.get(url, timeout=10).status_code == 200, url

    script = http.get(f"{host.url}{PREFIX}/static/app.js", timeout=10)
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]


def test_host_routes_headers_and_logging_are_its_own(host: Host) -> None:
    home = http.get(f"{host.url}/", timeout=10)
    assert home.status_code == 200
    assert home.text == "the host's own home page"
    # Stepstream's security headers stay on Stepstream's routes.
    assert "content-security-policy" not in home.headers
    assert "x-frame-options" not in home.headers
    assert http.post(f"{host.url}{PREFIX}/api/jobs", json={"task": "counted"}).status_code == 202

    state = http.get(f"{host.url}/logging", timeout=10).json()
    assert state["root_formats"] == [HOST_FORMAT]
    assert state["root_handlers"] == 1
    # uvicorn keeps the handlers it configured for itself.
    assert state["uvicorn_handlers"] == {"uvicorn": 1, "uvicorn.access": 1}
    assert state["uvicorn_propagates"] == {"uvicorn": False, "uvicorn.access": False}

    def logged() -> bool:
        return '"POST /progress/api/jobs HTTP/1.1" 202' in host.log()

    wait_until(logged, timeout=10, what="uvicorn's access line for the submit")
    lines = host.log().splitlines()
    # The host's lines, and Stepstream's, in the host's format.
    assert "host-log INFO host | host home served" in lines
    assert any(
        line.startswith("host-log WARNING stepstream.web | Stepstream in development mode")
        for line in lines
    ), lines
    # uvicorn's in uvicorn's own format.
    assert "INFO:     Application startup complete." in lines
    assert any(
        line.startswith("INFO:     127.0.0.1:") and '"POST /progress/api/jobs HTTP/1.1" 202' in line
        for line in lines
    ), lines
    # And nothing in Stepstream's formats (text: "12:00:01 INFO name: ...", or JSON).
    own = re.compile(r"^(\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) |\{)")
    assert [line for line in lines if own.match(line)] == []


def test_a_host_that_forgets_the_lifespan_is_told_how_to_run_it() -> None:
    # No Redis, no worker: the app refuses before any route reads its state.
    host = Starlette(routes=[Mount(PREFIX, app=create_app(Settings(demo_tasks=False)))])

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(transport=transport, base_url="http://host") as client:
            return await client.get(f"{PREFIX}/api/jobs")

    response = asyncio.run(get())
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "not_started"
    assert "progress.lifespan" in error["message"]


@pytest.mark.slow
def test_the_readme_mount_guide_as_written_serves_a_users_task(tmp_path: Path) -> None:
    """`stepstream valkey`, the guide's exports, `uvicorn myapp:app` and `stepstream worker`, in
    a directory holding the README's tasks.py and the guide's myapp.py: a submit completes."""
    code, shell = readme.mount_guide()
    assert shell[0] == "stepstream valkey" and shell[1].startswith("export ")
    assert shell[2].startswith("uvicorn myapp:app") and shell[3] == "stepstream worker"
    app_dir = tmp_path / "myapp"
    app_dir.mkdir()
    (app_dir / "myapp.py").write_text(code)
    (app_dir / "tasks.py").write_text(readme.task_module())
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPSTREAM_", "REDIS_URL"))}
    env.pop("PYTHONPATH", None)  # only what the guide sets: the user's directory is enough
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONUNBUFFERED="1")

    def shell_process(name: str, line: str, extra: dict[str, str]) -> Process:
        # A low open-file limit: a mounted app must not warn about the host's process limits.
        argv = ["bash", "-c", f"ulimit -n 512 && cd {app_dir} && exec {line}"]
        return Process(name, argv, {**env, **extra}, tmp_path).launch()

    valkey_port = free_port()
    valkey = shell_process(
        "valkey", f"{shell[0]} --port {valkey_port} --data-dir {tmp_path / 'data'}", {}
    )
    processes = [valkey]
    try:
        wait_until(lambda: "export REDIS_URL=" in valkey.log(), 20, what="stepstream valkey")
        printed = next(line for line in valkey.log().splitlines() if line.startswith("export "))
        assert printed == f"export REDIS_URL=redis://127.0.0.1:{valkey_port}/0", valkey.log()
        exported = dict(item.split("=", 1) for item in shell[1].split()[1:])
        assert set(exported) == {"REDIS_URL", "STEPSTREAM_TASK_MODULES"}, shell[1]
        # The guide's exports with the URL `stepstream valkey` printed (its port is the test's).
        exported["REDIS_URL"] = printed.split("=", 1)[1]
        port = free_port()
        host = shell_process("host", f"{shell[2]} --port {port}", exported)
        worker = shell_process("worker", shell[3], exported)
        processes += [host, worker]
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            for process in (host, worker):
                if not process.alive:
                    raise RuntimeError(f"{process.name} exited:\n{process.log()}")
            try:
                return http.get(f"{url}{PREFIX}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, what="the guide's app")
        assert http.get(f"{url}/", timeout=10).json() == {"hello": "the host's own page"}
        with Client(f"{url}{PREFIX}") as client:
            job = client.submit("pack_order", {"item": "teapot"})
            done = client.wait(job.id, timeout=30)
        assert done.state is JobState.completed, worker.log()
        assert done.result == {"line": "1 x teapot from shelf B4, parcel 1"}
        assert "STEPSTREAM_MAX_STREAMS" not in host.log(), host.log()
    finally:
        for process in reversed(processes):
            process.stop()
    assert "Valkey stopped" in valkey.log()
