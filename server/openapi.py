"""``GET /openapi.json``: the HTTP API as an OpenAPI 3.1 document, with each task's input schema."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stepstream.server import subjects
from stepstream.server.state import AppState
from stepstream.server.urls import root_path
from stepstream.tasks.models import JobRecord, JobState
from stepstream.tasks.registry import all_tasks

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {},
            },
        }
    },
}
CURSOR = {"type": "string", "pattern": "^(0|[0-9]+-[0-9]+)$"}
SUBJECT: dict[str, Any] = {
    "type": "string",
    "pattern": f"^{subjects.SUBJECT.pattern}$",
    "maxLength": subjects.MAX_LENGTH,
    "description": "the end user the job belongs to, as the owner's app names them",
}
SUBMIT_OPTIONS: dict[str, Any] = {
    "budget": {"type": "number", "minimum": 0, "description": "most this job may spend"},
    "run_at": {"type": ["string", "null"], "format": "date-time", "description": "start then"},
    "delay": {"type": "number", "minimum": 0, "description": "start after so many seconds"},
    "callback_url": {
        "type": "string",
        "format": "uri",
        "maxLength": 2048,
        "description": "http(s) URL the terminal event is POSTed to, signed (README, Webhooks); "
        "an address the operator does not allow is a 422 invalid_callback_url. Never shown in "
        "the record.",
    },
    "subject": {**SUBJECT, "type": ["string", "null"]},
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str, ref: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _too_many_streams() -> dict[str, Any]:
    return {
        **_error(
            "Over a stream limit of this web process: the API key's, the stream token's or "
            "the process's (`details.per`: key, token, process; `details.setting` names it)"
        ),
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    }


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
SSE = {"description": "Server-Sent Events", "content": {"text/event-stream": {}}}
TOKEN = {
    "name": "token",
    "in": "query",
    "schema": {"type": "string"},
    "description": "a stream token (read-only): `job:<id>` opens that job; `subject:<s>` the "
    "owner's jobs of subject s and their firehose; `events` all the owner's jobs and firehose",
}
STREAM_PARAMS = [
    {"name": "after", "in": "query", "schema": CURSOR},
    {"name": "Last-Event-ID", "in": "header", "schema": CURSOR},
    TOKEN,
]
TOKEN_REPLY = {"description": "{token, expires_at, scope}"}


def document(root: str) -> dict[str, Any]:
    """The document; ``root`` is the path the API is served under (``/progress`` when mounted)."""
    submissions = [
        {
            "type": "object",
            "title": spec.name,
            "required": ["task"],
            "additionalProperties": False,
            "properties": {
                "task": {"const": spec.name},
                "input": spec.input_model.model_json_schema(ref_template="#/$defs/{model}"),
                **SUBMIT_OPTIONS,
            },
        }
        for spec in all_tasks()
    ]
    job = JobRecord.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = job.pop("$defs", {})
    paths: dict[str, Any] = {
        "/api/jobs": {
            "post": {
                "summary": "Submit a job",
                "parameters": [
                    {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"oneOf": submissions}}},
                },
                "responses": {
                    "202": _json("Accepted; the job is queued", "Job"),
                    "200": _json(
                        "The job an earlier request with this Idempotency-Key made", "Job"
                    ),
                    "400": _error("Malformed JSON"),
                    "409": _error("Idempotency-Key reused with another body"),
                    "413": _error("Body too large"),
                    "422": _error("Unknown task, invalid input, or a callback_url refused"),
                    "429": _error("Over a limit"),
                },
            },
            "get": {
                "summary": "List jobs, newest first",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "comma separated: " + ", ".join(s.value for s in JobState),
                    },
                    {"name": "task", "in": "query", "schema": {"type": "string"}},
                    {"name": "subject", "in": "query", "schema": SUBJECT},
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "{jobs, next_cursor}"}, "400": _error("Bad")},
            },
        },
        "/api/jobs/{job_id}": {
            "get": {
                "summary": "One job's record",
                "parameters": [JOB_ID, TOKEN],
                "responses": {
                    "200": _json("The record", "Job"),
                    "401": _error("No credentials, or a token that has expired"),
                    "404": _error("No such job (or not the caller's, or not in the token's scope)"),
                },
            }
        },
        "/api/jobs/{job_id}/events": {
            "get": {
                "summary": "One job's events (SSE)",
                "parameters": [JOB_ID, *STREAM_PARAMS],
                "responses": {
                    "200": SSE,
                    "204": {"description": "The cursor is at the terminal event"},
                    "400": _error("Bad cursor"),
                    "401": _error("No credentials, or a token that has expired"),
                    "404": _error("No such job (or not the caller's, or not in the token's scope)"),
                    "429": _too_many_streams(),
                },
            }
        },
        "/api/jobs/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a queued or running job",
                "parameters": [JOB_ID],
                "responses": {
                    "200": _json("Cancelled", "Job"),
                    "202": _json("Cancel requested from the worker", "Job"),
                    "409": _error("Already finished"),
                },
            }
        },
        "/api/jobs/{job_id}/retry": {
            "post": {
                "summary": "Run a failed or cancelled job again",
                "parameters": [JOB_ID],
                "responses": {"202": _json("Queued again", "Job"), "409": _error("Not failed")},
            }
        },
        "/api/jobs/{job_id}/token": {
            "post": {
                "summary": "A short-lived token for this job's record and stream (scope job:<id>)",
                "parameters": [JOB_ID],
                "responses": {"200": TOKEN_REPLY, "404": _error("No such job")},
            }
        },
        "/api/events": {
            "get": {
                "summary": "Every job's events (SSE firehose)",
                "parameters": STREAM_PARAMS,
                "responses": {
                    "200": SSE,
                    "400": _error("Bad cursor"),
                    "401": _error("No credentials, or a token scoped to one job"),
                    "429": _too_many_streams(),
                },
            }
        },
        "/api/events/token": {
            "post": {
                "summary": "A short-lived token for the caller's firehose (scope events), or "
                "with a subject for that subject's jobs and firehose (scope subject:<s>)",
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"subject": SUBJECT},
                            }
                        }
                    },
                },
                "responses": {"200": TOKEN_REPLY, "422": _error("Not a subject")},
            }
        },
        "/api/batches": {
            "post": {
                "summary": "One job per input, under a parent job that counts them",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["task", "inputs"],
                                "properties": {
                                    "task": {"type": "string"},
                                    "inputs": {"type": "array", "items": {"type": "object"}},
                                    "budget": SUBMIT_OPTIONS["budget"],
                                    "callback_url": {
                                        **SUBMIT_OPTIONS["callback_url"],
                                        "description": "gets the parent's terminal event",
                                    },
                                    "subject": SUBMIT_OPTIONS["subject"],
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json("The parent job", "Job"),
                    "422": _error("Unknown task, an input that does not fit, a refused callback"),
                },
            }
        },
        "/api/batches/{job_id}": {
            "get": {
                "summary": "A batch: the parent and its children so far",
                "parameters": [JOB_ID],
                "responses": {"200": {"description": "ok"}, "404": _error("No such batch")},
            }
        },
        "/api/batches/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a batch and its children",
                "parameters": [JOB_ID],
                "responses": {"200": _json("Cancelled", "Job"), "409": _error("Finished")},
            }
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "ok"}}}
        },
        "/api/tasks": {"get": {"summary": "Tasks", "responses": {"200": {"description": "ok"}}}},
        "/api/stats": {
            "get": {"summary": "Queue health", "responses": {"200": {"description": "ok"}}}
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
        "/readyz": {
            "get": {
                "summary": "Readiness (Redis reachable)",
                "responses": {"200": {"description": "ok"}, "503": _error("Not ready")},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Stepstream", "version": "0.1.0"},
        # The paths below are relative to this URL (OpenAPI's default is "/").
        "servers": [{"url": root or "/"}],
        "paths": paths,
        "components": {
            "schemas": {"Job": job, "Error": ERROR, **defs},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


async def openapi(request: Request) -> Response:
    """The document lists every task and its input schema, as ``/api/tasks`` does, so in
    production it asks for the same key unless the operator publishes it on purpose."""
    state: AppState = request.app.state.stepstream
    if not state.settings.public_openapi:
        await state.auth.authenticate(request)
    return JSONResponse(document(root_path(request)))
