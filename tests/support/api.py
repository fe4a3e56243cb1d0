"""Small helpers to drive the HTTP API from tests."""

from __future__ import annotations

import time
from typing import Any

from tests.support import http

DOC = (
    "Stepstream takes long jobs off the request path. Workers record every step in a durable "
    "log. Browsers watch progress live and resume after a dropped connection. Scripts follow "
    "the same streams. Nothing is missed and the result is kept."
)


def submit(base: str, task: str, input: dict[str, Any] | None = None) -> dict[str, Any]:
    response = http.post(f"{base}/api/jobs", json={"task": task, "input": input or {}}, timeout=10)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def get_job(base: str, job_id: str) -> dict[str, Any]:
    response = http.get(f"{base}/api/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def wait_state(base: str, job_id: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job = get_job(base, job_id)
    while job["state"] not in states:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is {job['state']}, not {states}, after {timeout}s")
        time.sleep(0.05)
        job = get_job(base, job_id)
    return job
