"""``GET /openapi.json``: the HTTP API as an OpenAPI 3.1 document, with each task's input schema.

The document is a contract: every answer the server gives is listed here, with its body's
schema and its headers. ``tests/test_contract.py`` runs schemathesis against a live server in
both modes and fails on anything the document does not describe.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stepstream.server import subjects
from stepstream.server.state import AppState
from stepstream.server.urls import root_path
from stepstream.tasks import destinations
from stepstream.tasks.models import JobRecord, JobState
from stepstream.tasks.registry import TaskSpec, submitted_input_model
from stepstream.tasks.settings import Settings

Schema = dict[str, Any]

ERROR: Schema = {
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
# An event id as Redis gives them out (each part below 2^64; 19 digits stay below it), or
# empty for none.
CURSOR: Schema = {"type": "string", "pattern": "^(0|[0-9]{1,19}-[0-9]{1,19})?$"}
_STATES = "|".join(s.value for s in JobState)
SUBJECT: Schema = {
    "type": "string",
    "pattern": f"^{subjects.SUBJECT.pattern}$",
    "maxLength": subjects.MAX_LENGTH,
    "description": "the end user the job belongs to, as the owner's app names them",
}
TOKEN: Schema = {
    "type": "object",
    "required": ["token", "expires_at", "scope"],
    "properties": {
        "token": {"type": "string"},
        "expires_at": {"type": "number", "description": "Unix time"},
        "scope": {"type": "string", "description": "`job:<id>`, `subject:<s>` or `events`"},
        "may_answer": {"type": "boolean", "description": "it may also answer the job's input"},
    },
}
TASK: Schema = {
    "type": "object",
    "required": ["name", "title", "description", "steps", "input_schema"],
    "properties": {
        "name": {"type": "string"},
        "title": {"type": "string"},
        "description": {"type": "string"},
        "steps": {"type": "array", "items": {"type": "string"}},
        "max_attempts": {"type": "integer"},
        "timeout": {"type": "number"},
        "concurrency": {"type": ["integer", "null"]},
        "input_schema": {"type": "object"},
        "sample_input": {"type": ["object", "null"]},
        "budget": {"type": ["number", "null"]},
        "cache_ttl": {"type": ["number", "null"]},
    },
}
COUNTS: Schema = {
    "type": "object",
    "required": ["counts", "queue_depth", "oldest_queued_age"],
    "properties": {
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "duration_p50": {"type": ["number", "null"]},
        "duration_p95": {"type": ["number", "null"]},
        "failure_rate": {"type": ["number", "null"]},
        "retried": {"type": "integer"},
        "queue_depth": {"type": "integer"},
        "oldest_queued_age": {"type": ["number", "null"]},
    },
}
STATS: Schema = {
    "type": "object",
    "required": ["tasks", "total", "queue_depth", "workers_alive", "workers", "streams_open"],
    "properties": {
        "tasks": {
            "type": "object",
            "additionalProperties": {"$ref": "#/components/schemas/Counts"},
        },
        "total": {"$ref": "#/components/schemas/Counts"},
        "queue_depth": {"type": "integer"},
        "oldest_queued_age": {"type": ["number", "null"]},
        "workers_alive": {"type": "integer"},
        "workers": {"type": "array", "items": {"type": "object"}},
        "streams_open": {"type": "integer"},
        "window_seconds": {"type": "integer"},
        "scanned_jobs": {"type": "integer"},
        "scan_truncated": {"type": "boolean"},
    },
}
BATCH_CHILD: Schema = {
    "type": "object",
    "required": ["id", "index", "state"],
    "properties": {
        "id": {"type": "string"},
        "index": {"type": "integer"},
        "state": {"anyOf": [{"$ref": "#/components/schemas/JobState"}, {"type": "null"}]},
        "result": {},
        "error": {"type": ["object", "null"]},
        "cached": {"type": "boolean"},
    },
}
STATUS: Schema = {"type": "object", "required": ["status"], "properties": {"status": {}}}

RETRY_AFTER = {
    "description": "seconds to wait before trying again",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}
LOCATION = {
    "description": "the path of the new job",
    "required": True,
    "schema": {"type": "string"},
}


def _error(description: str, headers: dict[str, Any] | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        response["headers"] = headers
    return response


def _json(description: str, schema: Schema, headers: dict[str, Any] | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "schema": {"type": "string", "pattern": "^[!-~]{1,200}$"},
    "description": "a replay within STEPSTREAM_IDEMPOTENCY_TTL_SECONDS answers 200 with what "
    "the first request made",
}
IDEMPOTENCY_REFUSED = {
    "409": _error(
        "`idempotency_conflict`: the Idempotency-Key was used with another body, or its first "
        "request is still in flight"
    )
}

UNAUTHORIZED = {
    "401": _error(
        "`unauthorized`: no credentials (production), a key that is not valid, a stream token "
        "where a key is needed, in `?token=` where it must be in the header (an answer), or "
        "one this server does not accept; `token_expired`; "
        "`token_revoked`: the key that minted the token was revoked; `token_scope`: a job's "
        "token on the firehose",
        {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    )
}
UNAVAILABLE = {
    "503": _error("`unavailable`: the job store is unreachable", {"Retry-After": RETRY_AFTER})
}
BODY_REFUSED = {
    "400": _error("`malformed_json`, or `bad_request`: a Content-Length that is not a number"),
    "408": _error("`body_timeout`: the body did not arrive within STEPSTREAM_BODY_TIMEOUT_SECONDS"),
    "413": _error("`body_too_large`: over STEPSTREAM_MAX_BODY_BYTES"),
    "415": _error(
        "`unsupported_media_type`: a body not sent as `Content-Type: application/json` (or a "
        "`+json` type; `details.expected`)"
    ),
}
# Answered by `stepstream web` itself, before the app sees the request: on every operation.
HEAD_REFUSED = {
    "431": _error(
        "`header_too_large`: the request line and headers over STEPSTREAM_MAX_HEADER_BYTES; "
        "the connection is closed"
    )
}
NOT_FOUND = {"404": _error("`job_not_found`: no such job, or not the caller's, or out of scope")}
TOO_MANY_STREAMS = {
    "429": _error(
        "`too_many_streams`: over a stream limit of this web process: the API key's, the "
        "stream token's or the process's (`details.per`: key, token, process; "
        "`details.setting` names it)",
        {"Retry-After": RETRY_AFTER},
    )
}
SUBMIT_LIMITS = {
    "429": _error(
        "`rate_limited` (STEPSTREAM_SUBMISSIONS_PER_SECOND) or `too_many_unfinished_jobs` "
        "(STEPSTREAM_MAX_UNFINISHED_PER_OWNER)",
        {"Retry-After": RETRY_AFTER},
    )
}
SSE = {
    "description": "Server-Sent Events: `retry:` first, then each event with its `id:`, "
    "`event:` (its type) and one `data:` line of JSON (docs/protocol.md, Streams)",
    "content": {"text/event-stream": {}},
}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
STREAM_PARAMS = [
    {
        "name": "after",
        "in": "query",
        "schema": CURSOR,
        "description": "resume after this event id; `0` replays the whole retained log",
    },
    {
        "name": "Last-Event-ID",
        "in": "header",
        "schema": CURSOR,
        "description": "as `after`, and wins over it (EventSource sends it on reconnect)",
    },
]
# A stream token opens streams and reads records (scope `job:<id>`, `subject:<s>` or `events`).
TOKEN_SECURITY: dict[str, list[str]] = {"streamToken": []}
KEY_SECURITY: dict[str, list[str]] = {"bearer": []}
ANSWER_TOKEN_SECURITY: dict[str, list[str]] = {"answerToken": []}


def _job_schemas() -> dict[str, Schema]:
    job = JobRecord.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = job.pop("$defs", {})
    job["properties"]["links"] = {
        "type": "object",
        "required": ["self", "events"],
        "properties": {"self": {"type": "string"}, "events": {"type": "string"}},
    }
    job["required"] = [*job["required"], "links"]
    accepted = {
        "allOf": [
            _ref("Job"),
            {
                "type": "object",
                "required": ["stream_token", "stream_token_expires_at"],
                "properties": {
                    "stream_token": {"type": "string", "description": "scope `job:<id>`"},
                    "stream_token_expires_at": {"type": "number", "description": "Unix time"},
                },
            },
        ]
    }
    cancel_requested = {
        "allOf": [
            _ref("Job"),
            {
                "type": "object",
                "required": ["cancel_requested"],
                "properties": {"cancel_requested": {"const": True}},
            },
        ]
    }
    # A batch's `children` are its items (a list), where a job's record has its child jobs'
    # counts under that name: the record's schema with that one property replaced.
    batch = {
        **job,
        "properties": {
            **job["properties"],
            "children": {"type": "array", "items": BATCH_CHILD},
        },
        "required": [*job["required"], "children"],
    }
    job_list = {
        "type": "object",
        "required": ["jobs", "next_cursor"],
        "properties": {
            "jobs": {"type": "array", "items": _ref("Job")},
            "next_cursor": {"type": ["string", "null"]},
        },
    }
    return {
        **defs,
        "Job": job,
        "AcceptedJob": accepted,
        "CancelRequested": cancel_requested,
        "Batch": batch,
        "JobList": job_list,
    }


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _task_inputs(tasks: list[TaskSpec]) -> tuple[dict[str, str], dict[str, Schema]]:
    """Each task's input schema as a component, and the models it refers to beside it.

    Pydantic puts a model's nested models in the schema's own ``$defs`` and refers to them from
    the document's root; here they become components named after the task, so the references
    resolve and two tasks' models of one name stay apart.
    """
    names: dict[str, str] = {}
    components: dict[str, Schema] = {}
    for spec in tasks:
        base = "Input." + _UNSAFE.sub("-", spec.name)
        while base in components:  # two task names alike but for their unsafe characters
            base += "_"
        # As submissions are checked: fields the model does not declare are refused.
        schema = submitted_input_model(spec.input_model).model_json_schema(
            ref_template=f"#/components/schemas/{base}.{{model}}"
        )
        for model, definition in schema.pop("$defs", {}).items():
            components[f"{base}.{model}"] = definition
        components[base] = schema
        names[spec.name] = base
    return names, components


def _submit_options(settings: Settings) -> Schema:
    return {
        "budget": {
            "type": ["number", "null"],
            "minimum": 0,
            "description": "most this job may spend on LLM calls",
        },
        "run_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "pattern": RFC3339,
            "description": "start then (RFC 3339 with a zone; a time past means now); at most "
            f"{settings.max_delay_seconds} seconds away, or a 422",
        },
        "delay": {
            "type": ["number", "null"],
            "minimum": 0,
            "maximum": settings.max_delay_seconds,
            "description": "start after so many seconds",
        },
        "callback_url": {
            "type": ["string", "null"],
            "format": "uri",
            "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[!-~]+$",
            "maxLength": destinations.MAX_URL_LENGTH,
            "description": "http(s) URL the terminal event is POSTed to, signed (docs/deploy.md, "
            "Webhooks); an address or port the operator does not allow "
            "(STEPSTREAM_WEBHOOK_ALLOWED_HOSTS), Stepstream's own Redis, or any URL in "
            "production without STEPSTREAM_WEBHOOK_SECRET is a 422 invalid_callback_url. "
            "Never shown in the record.",
        },
        "subject": {**SUBJECT, "type": ["string", "null"]},
    }


# RFC 3339's date-time: a `T` between date and time, and a zone.
RFC3339 = (
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]+)?"
    "([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
# `run_at` and `delay` both set (neither null) is a 422.
ONE_SCHEDULE: Schema = {
    "not": {
        "required": ["run_at", "delay"],
        "properties": {"run_at": {"type": "string"}, "delay": {"type": "number"}},
    }
}


def _needs_input(spec: TaskSpec) -> bool:
    """Whether a submit must carry ``input``: one left out is ``{}``, as the server reads it."""
    try:
        spec.input_model.model_validate({})
    except ValidationError:
        return True
    return False


def _submissions(tasks: list[TaskSpec], inputs: dict[str, str], settings: Settings) -> Schema:
    return {
        "oneOf": [
            {
                "type": "object",
                "title": spec.name,
                "required": ["task", "input"] if _needs_input(spec) else ["task"],
                "additionalProperties": False,
                "properties": {
                    "task": {"const": spec.name},
                    "input": _ref(inputs[spec.name]),
                    **_submit_options(settings),
                },
                **ONE_SCHEDULE,
            }
            for spec in tasks
        ]
    }


def _batches(tasks: list[TaskSpec], inputs: dict[str, str], settings: Settings) -> Schema:
    options = _submit_options(settings)
    return {
        "oneOf": [
            {
                "type": "object",
                "title": spec.name,
                "required": ["task", "inputs"],
                "additionalProperties": False,
                "properties": {
                    "task": {"const": spec.name},
                    "inputs": {
                        "type": "array",
                        "items": _ref(inputs[spec.name]),
                        "minItems": 1,
                        "maxItems": settings.max_batch_size,
                    },
                    "budget": options["budget"],
                    "callback_url": {
                        **options["callback_url"],
                        "description": "gets the parent's terminal event",
                    },
                    "subject": options["subject"],
                },
            }
            for spec in tasks
        ]
    }


def _job_links() -> dict[str, Schema]:
    """What a client does next with a job it got: the operations that take its id."""
    job_id = {"job_id": "$response.body#/id"}
    return {
        name: {"operationId": operation, "parameters": job_id}
        for name, operation in [
            ("GetJob", "getJob"),
            ("GetJobEvents", "getJobEvents"),
            ("CancelJob", "cancelJob"),
            ("RetryJob", "retryJob"),
            ("CreateJobToken", "createJobToken"),
            ("AnswerInput", "answerInput"),
        ]
    }


def document(
    root: str, settings: Settings, tasks: list[TaskSpec], *, production: bool
) -> dict[str, Any]:
    """The document for ``tasks``; ``root`` is the path the API is served under (``/progress``
    when mounted).

    In production every ``/api`` call needs a key (or, where it says so, a stream token); in
    development credentials are optional.
    """
    inputs, input_components = _task_inputs(tasks)
    anonymous: list[dict[str, list[str]]] = [] if production else [{}]
    with_key = [KEY_SECURITY, *anonymous]
    with_key_or_token = [KEY_SECURITY, TOKEN_SECURITY, *anonymous]
    # An answer's token goes in the Authorization header, as a key does (never ?token=).
    with_key_or_answer_token = [KEY_SECURITY, ANSWER_TOKEN_SECURITY, *anonymous]
    job_links = _job_links()
    paths: dict[str, Any] = {
        "/api/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a job",
                "security": with_key,
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _submissions(tasks, inputs, settings)}
                    },
                },
                "responses": {
                    "202": {
                        **_json(
                            "Accepted; the job is queued (or scheduled)",
                            _ref("AcceptedJob"),
                            {"Location": LOCATION},
                        ),
                        "links": job_links,
                    },
                    "200": {
                        **_json(
                            "The job an earlier request with this Idempotency-Key made",
                            _ref("AcceptedJob"),
                            {"Location": LOCATION},
                        ),
                        "links": job_links,
                    },
                    **BODY_REFUSED,
                    "400": _error(
                        "`malformed_json`; `bad_request`: a Content-Length that is not a "
                        "number; `bad_idempotency_key`: not 1 to 200 printable ASCII characters"
                    ),
                    **UNAUTHORIZED,
                    **IDEMPOTENCY_REFUSED,
                    "422": _error(
                        "`invalid_body`, `unknown_task` (details list the known tasks), "
                        "`invalid_input` (details name the fields), `input_too_deep`, "
                        "`string_too_long`, `invalid_callback_url`"
                    ),
                    **SUBMIT_LIMITS,
                    **UNAVAILABLE,
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "List jobs, newest first",
                "security": with_key,
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "pattern": rf"^\s*(({_STATES})\s*)?(,\s*(({_STATES})\s*)?)*$",
                        },
                        "description": "comma separated, any of: "
                        + ", ".join(s.value for s in JobState),
                    },
                    {"name": "task", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "parent",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^([A-Za-z0-9_-]{1,64})?$"},
                        "description": "a job's (or a batch's) children, in the order it "
                        "started them (not newest first)",
                    },
                    {
                        "name": "subject",
                        "in": "query",
                        # Empty: every subject, as for the other filters.
                        "schema": {**SUBJECT, "pattern": f"^({subjects.SUBJECT.pattern})?$"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": settings.list_limit_max,
                            "default": 50,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "the `next_cursor` of the page before",
                    },
                ],
                "responses": {
                    "200": _json("A page of jobs", _ref("JobList")),
                    "400": _error(
                        "`bad_status`, `bad_limit`, `bad_subject`, `bad_parent` or `bad_cursor`"
                    ),
                    **UNAUTHORIZED,
                    **UNAVAILABLE,
                },
            },
        },
        "/api/jobs/{job_id}": {
            "get": {
                "operationId": "getJob",
                "summary": "One job's record",
                "security": with_key_or_token,
                "parameters": [JOB_ID],
                "responses": {
                    "200": _json("The record", _ref("Job")),
                    **UNAUTHORIZED,
                    **NOT_FOUND,
                    **UNAVAILABLE,
                },
            }
        },
        "/api/jobs/{job_id}/events": {
            "get": {
                "operationId": "getJobEvents",
                "summary": "One job's events; the response ends after the terminal event",
                "security": with_key_or_token,
                "parameters": [JOB_ID, *STREAM_PARAMS],
                "responses": {
                    "200": SSE,
                    "204": {"description": "The cursor is at the terminal event: nothing follows"},
                    "400": _error("`bad_cursor`"),
                    **UNAUTHORIZED,
                    **NOT_FOUND,
                    **TOO_MANY_STREAMS,
                    **UNAVAILABLE,
                },
            }
        },
        "/api/jobs/{job_id}/cancel": {
            "post": {
                "operationId": "cancelJob",
                "summary": "Cancel a queued or running job (or a batch, as its own cancel)",
                "security": with_key,
                "parameters": [JOB_ID],
                "responses": {
                    "200": _json("Cancelled before it started", _ref("Job")),
                    "202": _json(
                        "Running: the worker stops it within a second", _ref("CancelRequested")
                    ),
                    **UNAUTHORIZED,
                    **NOT_FOUND,
                    "409": _error("`conflict`: the job has finished (`details.state`)"),
                    **UNAVAILABLE,
                },
            }
        },
        "/api/jobs/{job_id}/retry": {
            "post": {
                "operationId": "retryJob",
                "summary": "Run a failed or cancelled job again",
                "security": with_key,
                "parameters": [JOB_ID],
                "responses": {
                    "202": _json("Queued again", _ref("Job")),
                    **UNAUTHORIZED,
                    **NOT_FOUND,
                    "409": _error("`conflict`: the job is not failed or cancelled"),
                    "422": _error("`unknown_task`: the job's task is no longer declared"),
                    "429": _error(
                        "`too_many_unfinished_jobs`: the job would take a place under "
                        "STEPSTREAM_MAX_UNFINISHED_PER_OWNER and none is left",
                        {"Retry-After": RETRY_AFTER},
                    ),
                    **UNAVAILABLE,
                },
            }
        },
        "/api/jobs/{job_id}/token": {
            "post": {
                "operationId": "createJobToken",
                "summary": "A short-lived token for this job's record and stream (scope job:<id>); "
                "with `may_answer` it may also answer the job's input",
                "security": with_key,
                "parameters": [JOB_ID],
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"may_answer": {"type": "boolean"}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json("The token", _ref("Token")),
                    **BODY_REFUSED,
                    **UNAUTHORIZED,
                    **NOT_FOUND,
                    "422": _error("`invalid_body`: not an object, an unknown field, not a boolean"),
                    **UNAVAILABLE,
                },
            }
        },
        "/api/jobs/{job_id}/input": {
            "post": {
                "operationId": "answerInput",
                "summary": "Give the input a waiting job asks for (its `waiting_for`): the job "
                "is queued again and resumes from its checkpoints",
                "security": with_key_or_answer_token,
                "parameters": [JOB_ID],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name", "value"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "value": {
                                        "description": "fits `waiting_for.schema` (JSON Schema)"
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json("Answered: the job is queued again", _ref("Job")),
                    **BODY_REFUSED,
                    **UNAUTHORIZED,
                    "403": _error(
                        "`forbidden`: a stream token not minted with `may_answer` for this job"
                    ),
                    **NOT_FOUND,
                    "409": _error(
                        "`not_waiting` (`details.state`), `wrong_input`: the job waits for "
                        "another name (`details.waiting_for`), `already_answered`: the first "
                        "answer is kept (`details.by`, `details.at`)"
                    ),
                    "413": _error(
                        "`answer_too_large`: the value over STEPSTREAM_MAX_ANSWER_BYTES as "
                        "compact JSON; `body_too_large`: the body over STEPSTREAM_MAX_BODY_BYTES"
                    ),
                    "422": _error(
                        "`invalid_value`: the value does not fit the schema (`details`: "
                        "`loc`, `msg` per problem; the schema is closed: an undeclared field "
                        "is one); `invalid_body`; `input_too_deep` "
                        "(STEPSTREAM_MAX_INPUT_DEPTH); `string_too_long` "
                        "(STEPSTREAM_MAX_STRING_LENGTH)"
                    ),
                    **UNAVAILABLE,
                },
            }
        },
        "/api/events": {
            "get": {
                "operationId": "streamEvents",
                "summary": "Every job's events the caller may see (the firehose); never ends "
                "on its own",
                "security": with_key_or_token,
                "parameters": STREAM_PARAMS,
                "responses": {
                    "200": SSE,
                    "400": _error("`bad_cursor`"),
                    **UNAUTHORIZED,
                    **TOO_MANY_STREAMS,
                    **UNAVAILABLE,
                },
            }
        },
        "/api/events/token": {
            "post": {
                "operationId": "createEventsToken",
                "summary": "A short-lived token for the caller's firehose (scope events), or "
                "with a subject for that subject's jobs and firehose (scope subject:<s>)",
                "security": with_key,
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"subject": {**SUBJECT, "type": ["string", "null"]}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json("The token", _ref("Token")),
                    **BODY_REFUSED,
                    **UNAUTHORIZED,
                    "422": _error("`invalid_body`: not an object, an unknown field, not a subject"),
                    **UNAVAILABLE,
                },
            }
        },
        "/api/batches": {
            "post": {
                "operationId": "submitBatch",
                "summary": "One job per input, under a parent job that counts them",
                "security": with_key,
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _batches(tasks, inputs, settings)}},
                },
                "responses": {
                    "202": {
                        **_json(
                            "The parent job",
                            _ref("AcceptedJob"),
                            {
                                "Location": {
                                    **LOCATION,
                                    "description": "the path of the batch",
                                }
                            },
                        ),
                        "links": {
                            "GetBatch": {
                                "operationId": "getBatch",
                                "parameters": {"job_id": "$response.body#/id"},
                            },
                            "CancelBatch": {
                                "operationId": "cancelBatch",
                                "parameters": {"job_id": "$response.body#/id"},
                            },
                        },
                    },
                    "200": _json(
                        "The batch an earlier request with this Idempotency-Key made",
                        _ref("AcceptedJob"),
                        {"Location": {**LOCATION, "description": "the path of the batch"}},
                    ),
                    **BODY_REFUSED,
                    "400": _error(
                        "`malformed_json`; `bad_request`: a Content-Length that is not a "
                        "number; `bad_idempotency_key`: not 1 to 200 printable ASCII characters"
                    ),
                    **UNAUTHORIZED,
                    **IDEMPOTENCY_REFUSED,
                    "422": _error(
                        "`invalid_body` (wrong shape, or not 1 to STEPSTREAM_MAX_BATCH_SIZE "
                        "inputs), `unknown_task`, `invalid_input` (details name each input's "
                        "problems), `input_too_deep`, `string_too_long`, `invalid_callback_url`"
                    ),
                    **SUBMIT_LIMITS,
                    **UNAVAILABLE,
                },
            }
        },
        "/api/batches/{job_id}": {
            "get": {
                "operationId": "getBatch",
                "summary": "A batch: the parent and its children so far",
                "security": with_key,
                "parameters": [JOB_ID],
                "responses": {
                    "200": _json("The parent record and its children", _ref("Batch")),
                    **UNAUTHORIZED,
                    "404": _error("`job_not_found`, or `batch_not_found`: the job is no batch"),
                    **UNAVAILABLE,
                },
            }
        },
        "/api/batches/{job_id}/cancel": {
            "post": {
                "operationId": "cancelBatch",
                "summary": "Cancel a batch and its children (any other job: as its own cancel)",
                "security": with_key,
                "parameters": [JOB_ID],
                "responses": {
                    "200": _json(
                        "A job that is no batch, cancelled before it started", _ref("Job")
                    ),
                    "202": _json(
                        "The children that had not started are cancelled; running ones stop "
                        "in their workers",
                        _ref("CancelRequested"),
                    ),
                    **UNAUTHORIZED,
                    **NOT_FOUND,
                    "409": _error("`conflict`: finished (`details.state`)"),
                    **UNAVAILABLE,
                },
            }
        },
        "/api/tasks": {
            "get": {
                "operationId": "listTasks",
                "summary": "The tasks this deployment runs, with their input schemas",
                "security": with_key,
                "responses": {
                    "200": _json(
                        "The tasks",
                        {
                            "type": "object",
                            "required": ["tasks"],
                            "properties": {"tasks": {"type": "array", "items": _ref("Task")}},
                        },
                    ),
                    **UNAUTHORIZED,
                    **UNAVAILABLE,
                },
            }
        },
        "/api/stats": {
            "get": {
                "operationId": "getStats",
                "summary": "Queue health: per task counts, durations, failure rate; workers",
                "security": with_key,
                "responses": {
                    "200": _json("The numbers", _ref("Stats")),
                    **UNAUTHORIZED,
                    **UNAVAILABLE,
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "summary": "Prometheus metrics (the operator keeps it off the public network)",
                "security": [{}],
                "responses": {
                    "200": {
                        "description": "The Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **UNAVAILABLE,
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness",
                "security": [{}],
                "responses": {"200": _json("Alive", STATUS)},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: Redis reachable",
                "security": [{}],
                "responses": {
                    "200": _json(
                        "Ready; `hub`: connected or reconnecting; `webhooks`: whether the live "
                        "processes agree on their webhook settings (`settings`, `differing`) "
                        "and how many deliveries a worker's settings hold (`held`)",
                        STATUS,
                    ),
                    "503": _json("Redis unreachable", STATUS),
                },
            }
        },
    }
    for operations in paths.values():
        for operation in operations.values():
            operation["responses"].update(HEAD_REFUSED)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Stepstream", "version": "0.1.0"},
        # The paths below are relative to this URL (OpenAPI's default is "/").
        "servers": [{"url": root or "/"}],
        "paths": paths,
        "components": {
            "schemas": {
                "Error": ERROR,
                "Token": TOKEN,
                "Task": TASK,
                "Counts": COUNTS,
                "Stats": STATS,
                **_job_schemas(),
                **input_components,
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key: `Authorization: Bearer <key>`",
                },
                "answerToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a `job:<id>` stream token minted with `may_answer` "
                    "(`POST /api/jobs/{id}/token`), in `Authorization: Bearer <token>`: an "
                    "answer's token is refused in `?token=`",
                },
                "streamToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "a read-only stream token (`POST /api/jobs/{id}/token`, "
                    "`POST /api/events/token`): `job:<id>` opens that job; `subject:<s>` the "
                    "owner's jobs of subject s and their firehose; `events` all the owner's "
                    "jobs and firehose. A `job:<id>` token minted with `may_answer` also "
                    "answers that job's input, sent as `answerToken`",
                },
            },
        },
        "security": with_key,
    }


async def openapi(request: Request) -> Response:
    """The document lists every task and its input schema, as ``/api/tasks`` does, so in
    production it asks for the same key unless the operator publishes it on purpose."""
    state: AppState = request.app.state.stepstream
    if not state.settings.public_openapi:
        await state.auth.authenticate(request)
    return JSONResponse(
        document(
            root_path(request),
            state.settings,
            state.registry.tasks(),
            production=state.auth.production,
        )
    )
