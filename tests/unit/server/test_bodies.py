"""The document's bodies are the handlers' models: every JSON answer the document lists names a
model of ``server/bodies.py``, and what those models send fits the schemas generated from them
(nullable where a field is sent as null, required where it is always sent)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
from pydantic import BaseModel

from stepstream.server import bodies
from stepstream.server.openapi import document
from stepstream.tasks.models import JobRecord, JobState
from stepstream.tasks.registry import load_tasks
from stepstream.tasks.settings import Settings

TASKS = load_tasks([], demo=True).tasks()
DOC = document("/progress", Settings(), TASKS, production=True)
SCHEMAS = DOC["components"]["schemas"]

RECORD = JobRecord.model_validate(
    {
        "id": "job1",
        "task": "analyze_document",
        "state": "waiting",
        "input": {"text": "A."},
        "created_at": "2026-01-01T00:00:00.000000Z",
        "steps": [{"index": 1, "name": "read", "state": "completed", "output": [1, None]}],
        "step": {"index": 1, "count": 2, "name": "read"},
        "error": {"type": "E", "message": "m", "traceback": "t"},
        "waiting_for": {"name": "review", "schema": {"type": "boolean"}},
        "answers": {"x": {"value": None, "by": "token", "at": "now"}},
        "budget": 2,
        "callback_url": "https://example.com/hook",
    }
)


def _json_bodies() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (f"{method.upper()} {path}", status, response["content"]["application/json"]["schema"])
        for path, item in DOC["paths"].items()
        for method, operation in item.items()
        for status, response in operation["responses"].items()
        if "application/json" in response.get("content", {})
    ]


@pytest.mark.parametrize(("operation", "status", "schema"), _json_bodies())
def test_every_json_answer_the_document_lists_is_a_model_the_handlers_send(
    operation: str, status: str, schema: dict[str, Any]
) -> None:
    names = {model.__name__ for model in bodies.MODELS}
    assert set(schema) == {"$ref"}, f"{operation} {status}: a schema written by hand"
    assert schema["$ref"].rsplit("/", 1)[-1] in names, f"{operation} {status}"


SAMPLES: list[BaseModel] = [
    bodies.Job.of(RECORD, "/progress"),
    bodies.AcceptedJob.of(RECORD, "", stream_token="t", stream_token_expires_at=1.5),
    bodies.CancelRequested.of(RECORD, "", cancel_requested=True),
    bodies.Batch.of(
        RECORD,
        "",
        children=[
            bodies.BatchChild(
                id="c1", index=0, state=JobState.failed, result=None, error={}, cached=False
            ),
            bodies.ExpiredChild(id="c2", index=1, state=None),
        ],
    ),
    bodies.JobList(jobs=[bodies.Job.of(RECORD, "")], next_cursor=None),
    bodies.Token(token="t", expires_at=1, scope="events"),
    bodies.JobToken(token="t", expires_at=1.5, scope="job:job1", may_answer=False),
    bodies.TaskList(tasks=[bodies.Task.of(spec) for spec in TASKS]),
    bodies.Error(error=bodies.ErrorDetail(code="c", message="m", details=None)),
    bodies.Alive(status="ok"),
    bodies.Ready(
        status="ready", redis="ok", hub="connected", webhooks=bodies.WebhooksUnknown(settings="x")
    ),
    bodies.Unready(status="unavailable", redis="unreachable: ConnectionError"),
]


def _counts(value: float | None) -> bodies.Counts:
    return bodies.Counts(
        counts={"queued": 1},
        duration_p50=value,
        duration_p95=value,
        failure_rate=value,
        retried=0,
        queue_depth=1,
        oldest_queued_age=value,
    )


SAMPLES.append(
    bodies.Stats(
        tasks={"a": _counts(None), "b": _counts(2)},
        total=_counts(0.5),
        queue_depth=1,
        oldest_queued_age=None,
        workers_alive=1,
        workers=[{"id": "w", "running": []}],
        streams_open=0,
        window_seconds=86_400,
        scanned_jobs=1,
        scan_truncated=False,
    )
)


@pytest.mark.parametrize("body", SAMPLES, ids=lambda body: type(body).__name__)
def test_what_a_model_sends_fits_the_schema_the_document_gives_it(body: BaseModel) -> None:
    schema = {
        "$ref": f"#/components/schemas/{type(body).__name__}",
        "components": {"schemas": SCHEMAS},
    }
    sent = json.loads(json.dumps(body.model_dump(mode="json")))
    errors = [error.message for error in jsonschema_rs.validator_for(schema).iter_errors(sent)]
    assert errors == []


def test_a_record_field_kept_from_the_api_stays_out_of_body_and_schema() -> None:
    sent = bodies.Job.of(RECORD, "").model_dump(mode="json")
    assert "callback_url" not in sent and "trace" not in sent
    assert "callback_url" not in SCHEMAS["Job"]["properties"]
    assert sent["links"] == {"self": "/api/jobs/job1", "events": "/api/jobs/job1/events"}
    assert sent["budget"] == 2
