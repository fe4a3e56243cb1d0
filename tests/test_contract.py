"""The OpenAPI document is a contract: schemathesis, driven by ``/openapi.json`` alone, fuzzes a
live server (uvicorn, a worker, Valkey) and every answer must be one the document describes.

The checks and bounds are in tests/schemathesis.toml: no 5xx; a status the operation lists;
its content type; a body that fits its schema; its required headers. Both modes: development
(credentials are optional) and production (a key on every request; the document needs it too).

Streams: ``GET /api/events`` never ends on its own, and neither does a live job's stream. The
fuzzer reads each stream response for at most one event and one second (``max-stream-events``,
``request-timeout`` in the config), so both stream operations are fuzzed, 4xx and 200 alike,
with fewer examples than the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.support import http
from tests.support.processes import ROOT, Valkey

CONFIG = ROOT / "tests" / "schemathesis.toml"

FUZZ_STACK = {
    # The demo tasks only: the test suite's own tasks include ones that write 100,000 events.
    "STEPSTREAM_TASK_MODULES": "",
    # The document states this bound (`maxItems`), so generated batches stay small.
    "STEPSTREAM_MAX_BATCH_SIZE": "5",
    # Callback hosts are rewritten to this address (tests/support/contract_hooks.py), where
    # nothing listens: a job's webhook never leaves the machine.
    "STEPSTREAM_WEBHOOK_ALLOW_PUBLIC": "false",
    "STEPSTREAM_WEBHOOK_ALLOWED_HOSTS": "127.0.0.9",
}
KEY = "key-fuzz-0123456789abcdef"
PRODUCTION = {
    "STEPSTREAM_MODE": "production",
    "STEPSTREAM_SECRET": "s3cret-for-tests-only-0123456789abcdef",
    "STEPSTREAM_API_KEYS": f"fuzz:{KEY}",
    # Production refuses to start with webhooks configured and no secret to sign them.
    "STEPSTREAM_WEBHOOK_SECRET": "whsec-for-tests-only-0123456789abcdef",
}
# Operations whose positive cases need no job that exists: some must have been accepted, or
# the run never got past authentication and tested nothing.
MUST_ACCEPT = [
    "POST /api/jobs",
    "GET /api/jobs",
    "POST /api/batches",
    "POST /api/events/token",
    "GET /api/events",
    "GET /api/tasks",
    "GET /api/stats",
]


# Slow: schemathesis walks every operation for about a minute per mode.
pytestmark = pytest.mark.slow


def schemathesis(url: str, report: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--no-color",
        *args,
    ]
    # The hooks module is imported from the repository (PYTHONPATH).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False
        )
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout
        pytest.fail(f"schemathesis ran for more than {exc.timeout:g} s:\n{partial}")


def accepted(report: dict[str, Any], operation: str) -> int:
    phases = report["valid_rates"].get(operation, {})
    return sum(phase["accepted"] for phase in phases.values())


@pytest.fixture(scope="module", params=["development", "production"])
def fuzzed(
    request: pytest.FixtureRequest, valkey: Valkey, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Stack]]:
    """A stack per mode, stopped before the next mode's starts: on two cores, a worker still
    busy with the first run's jobs would slow the second."""
    mode: str = request.param
    env = {**FUZZ_STACK, **(PRODUCTION if mode == "production" else {})}
    stack = Stack(valkey, f"contract-{mode}:", tmp_path_factory.mktemp(f"contract-{mode}"), env)
    try:
        stack.add_web()
        stack.add_worker()
        yield mode, stack
    finally:
        stack.stop()


# About 60 s idle; under twice CI's load one run took more than the 150 s it once had.
@pytest.mark.timeout(480)
def test_every_answer_is_one_the_openapi_document_describes(
    fuzzed: tuple[str, Stack], tmp_path: Path
) -> None:
    mode, stack = fuzzed
    args = ["--header", f"Authorization: Bearer {KEY}"] if mode == "production" else []
    report_path = tmp_path / "schemathesis.json"

    result = schemathesis(stack.url, report_path, *args)

    output = result.stdout[-20_000:] + result.stderr[-5_000:]
    assert result.returncode == 0, output
    report = json.loads(report_path.read_text())
    operations = report["operations"]
    assert operations["tested"] == operations["total"] == 18, (operations, output)
    assert report["test_cases"]["errored"] == 0, output
    refused = [op for op in MUST_ACCEPT if accepted(report, op) == 0]
    assert not refused, (refused, report["valid_rates"])


def test_every_401_names_the_scheme_to_use(fuzzed: tuple[str, Stack]) -> None:
    """RFC 9110: a 401 carries ``WWW-Authenticate``; the document says every 401 does."""
    mode, stack = fuzzed
    key = {"Authorization": f"Bearer {KEY}"} if mode == "production" else {}
    job = http.post(
        f"{stack.url}/api/jobs",
        json={"task": "analyze_document", "input": {"text": "One sentence."}},
        headers=key,
        timeout=10,
    )
    assert job.status_code == 202, job.text
    job_token = job.json()["stream_token"]
    refusals = [
        http.get(f"{stack.url}/api/events", params={"token": job_token}, timeout=10),
        http.get(f"{stack.url}/api/jobs", params={"token": job_token}, timeout=10),
        http.get(f"{stack.url}/api/jobs", headers={"Authorization": "Bearer nope"}, timeout=10),
    ]
    if mode == "production":
        refusals.append(http.get(f"{stack.url}/api/jobs", timeout=10))
    for response in refusals:
        assert response.status_code == 401, (response.request.url, response.text)
        assert response.headers["www-authenticate"] == "Bearer", response.request.url
