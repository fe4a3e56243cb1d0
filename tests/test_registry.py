"""An app and a worker serve the tasks of the registry they hold, not whatever the process
has imported: two apps with two registries in one process each know only their own tasks, and
a worker runs only its registry's tasks and recurring jobs."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from stepstream.server import StepstreamApp, create_app
from stepstream.tasks.registry import TaskRegistry, default_registry
from stepstream.tasks.settings import Settings
from tests.support.processes import Valkey, Worker, stack_env
from tests.support.registries import ALPHA, BETA

_prefixes = itertools.count(1)


def settings(valkey: Valkey, prefix: str) -> Settings:
    # Development: the app runs in this process, bound to no address.
    return Settings.model_validate(
        {"REDIS_URL": valkey.url, "prefix": prefix, "mode": "development"}
    )


@asynccontextmanager
async def serving(app: StepstreamApp) -> AsyncIterator[httpx.AsyncClient]:
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def task_names(client: httpx.AsyncClient) -> list[str]:
    response = await client.get("/api/tasks")
    assert response.status_code == 200, response.text
    return [t["name"] for t in response.json()["tasks"]]


async def jobs(client: httpx.AsyncClient, task: str | None = None) -> list[dict[str, Any]]:
    response = await client.get("/api/jobs", params={"task": task} if task else {})
    assert response.status_code == 200, response.text
    listed: list[dict[str, Any]] = response.json()["jobs"]
    return listed


async def submit(client: httpx.AsyncClient, task: str, text: str) -> dict[str, Any]:
    response = await client.post("/api/jobs", json={"task": task, "input": {"text": text}})
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def finished(client: httpx.AsyncClient, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = (await client.get(f"/api/jobs/{job_id}")).json()
        if job["state"] in ("completed", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {job['state']} after {timeout}s")
        await asyncio.sleep(0.05)


def test_two_apps_in_one_process_serve_only_their_own_tasks(valkey: Valkey) -> None:
    run = next(_prefixes)
    app_a = create_app(settings(valkey, f"reg{run}a:"), registry=ALPHA)
    app_b = create_app(settings(valkey, f"reg{run}b:"), registry=BETA)
    assert (app_a.registry, app_b.registry) == (ALPHA, BETA)

    async def scenario() -> None:
        async with serving(app_a) as a, serving(app_b) as b:
            assert await task_names(a) == ["alpha"]
            assert await task_names(b) == ["beta"]

            # The other app's task is unknown here, and refusing it stores nothing.
            refused = await a.post("/api/jobs", json={"task": "beta", "input": {}})
            assert refused.status_code == 422, refused.text
            error = refused.json()["error"]
            assert error["code"] == "unknown_task"
            assert error["details"] == {"known_tasks": ["alpha"]}
            batch = await b.post("/api/batches", json={"task": "alpha", "inputs": [{}]})
            assert batch.status_code == 422 and batch.json()["error"]["code"] == "unknown_task"
            assert await jobs(a) == [] and await jobs(b) == []

            job = await submit(a, "alpha", "first")
            assert job["task"] == "alpha" and job["state"] == "queued"
            assert [j["id"] for j in await jobs(a)] == [job["id"]]
            assert await jobs(b) == []  # the apps share a Valkey, not a prefix

            for client, own, other in ((a, "alpha", "beta"), (b, "beta", "alpha")):
                schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
                assert f"Input.{own}" in schemas and f"Input.{other}" not in schemas
                stats = (await client.get("/api/stats")).json()
                assert own in stats["tasks"] and other not in stats["tasks"]

    asyncio.run(scenario())
    # Declared into registries of their own: the default registry never saw them.
    assert default_registry.get_task("alpha") is None
    assert default_registry.get_task("beta") is None
    assert "beta-tick" not in [entry.name for entry in default_registry.recurring_jobs()]


def start_worker(valkey: Valkey, prefix: str, registry: str, log_dir: Path) -> Worker:
    """``python -m tests.support.registries <registry>``: a worker of that registry alone."""
    process = Worker(stack_env(valkey.url, prefix), log_dir)
    process.args = [process.args[0], "-m", "tests.support.registries", registry]
    return process.start()


@pytest.mark.slow  # kills, restarts or starts processes, or waits out retries
def test_a_worker_runs_only_the_tasks_and_recurring_jobs_of_its_registry(
    valkey: Valkey, tmp_path: Path
) -> None:
    run = next(_prefixes)
    prefix_a, prefix_b = f"reg{run}wa:", f"reg{run}wb:"
    # A web app that knows both tasks, on the alpha worker's queue, so it can hand it a job
    # of a task that worker's registry does not hold.
    both = create_app(
        settings(valkey, prefix_a), registry=TaskRegistry([*ALPHA.tasks(), *BETA.tasks()])
    )
    app_b = create_app(settings(valkey, prefix_b), registry=BETA)
    workers = [
        start_worker(valkey, prefix_a, "alpha", tmp_path),
        start_worker(valkey, prefix_b, "beta", tmp_path),
    ]

    async def scenario() -> None:
        async with serving(both) as a, serving(app_b) as b:
            ran = await finished(a, (await submit(a, "alpha", "One. Two."))["id"])
            assert ran["state"] == "completed", ran
            assert ran["result"]["task"] == "alpha" and ran["result"]["reply"], ran["result"]
            # The worker's LLM provider answered in the task (ctx.llm): the call is accounted.
            assert ran["usage"]["calls"] == 1, ran["usage"]
            stranger = await finished(a, (await submit(a, "beta", "x"))["id"])
            assert stranger["state"] == "failed", stranger
            assert stranger["error"]["type"] == "UnknownTask"
            assert stranger["error"]["message"] == "no task named 'beta'"

            # The beta worker fires its registry's recurring job every 2 seconds...
            deadline = time.monotonic() + 20
            ticks: list[dict[str, Any]] = []
            while len(ticks) < 2 and time.monotonic() < deadline:
                ticks = [j for j in await jobs(b, "beta") if j["state"] == "completed"]
                await asyncio.sleep(0.2)
            assert len(ticks) >= 2, ticks
            assert {j["result"]["text"] for j in ticks} == {"tick"}
            # ...and the alpha worker, started with it, fired none: its queue has only ours.
            assert sorted(j["id"] for j in await jobs(a)) == sorted([ran["id"], stranger["id"]])

    try:
        asyncio.run(scenario())
    finally:
        for process in workers:
            process.stop()
    assert "beta-tick" not in workers[0].log()
