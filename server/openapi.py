"""``GET /openapi.json``: the HTTP API as an OpenAPI 3.1 document, with each task's input schema.

The document is a contract: every answer the server gives is listed here, with its body's
schema and its headers. The bodies' schemas are generated from the models the handlers answer
with (``server/bodies.py``); this module holds what only the document says: ``ROUTES``, each
operation's statuses, error codes and headers, and the request bodies built from the tasks.
``tests/test_contract.py`` runs schemathesis against a live server in both modes and fails on
anything the document does not describe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stepstream.server import bodies, subjects
from stepstream.server.state import AppState
from stepstream.server.urls import root_path
from stepstream.tasks import destinations
from stepstream.tasks.models import JobState
from stepstream.tasks.registry import TaskSpec, submitted_input_model
from stepstream.tasks.settings import Settings

Schema = dict[str, Any]
REF = "#/components/schemas/{model}"

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
WITH_RETRY_AFTER = {"Retry-After": RETRY_AFTER}


@dataclass(frozen=True)
class Reply:
    """An answer that is not a refusal: its body's model (or raw content), headers and links
    (name → the operation that takes the body's ``id`` as ``job_id``)."""

    description: str
    body: type[BaseModel] | None = None
    content: dict[str, Schema] | None = None  # not JSON: SSE, the Prometheus text
    headers: dict[str, Schema] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Refused:
    """A refusal, an ``Error`` body: the codes it carries, and its headers."""

    description: str
    headers: dict[str, Schema] = field(default_factory=dict)


Access = Literal["key", "key_or_token", "key_or_answer_token", "none"]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    operation_id: str
    summary: str
    replies: dict[int, Reply]
    refusals: dict[int, Refused]
    access: Access = "key"
    parameters: list[Schema] = field(default_factory=list)
    request: Schema | None = None  # the JSON body's schema
    request_required: bool = True


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "schema": {"type": "string", "pattern": "^[!-~]{1,200}$"},
    "description": "a replay within STEPSTREAM_IDEMPOTENCY_TTL_SECONDS answers 200 with what "
    "the first request made",
}
IDEMPOTENCY_REFUSED = {
    409: Refused(
        "`idempotency_conflict`: the Idempotency-Key was used with another body, or its first "
        "request is still in flight"
    )
}
UNAUTHORIZED = {
    401: Refused(
        "`unauthorized`: no credentials (production), a key that is not valid, a stream token "
        "where a key is needed, in `?token=` where it must be in the header (an answer), or "
        "one this server does not accept; `token_expired`; "
        "`token_revoked`: the key that minted the token was revoked; `token_scope`: a job's "
        "token on the firehose",
        {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    )
}
UNAVAILABLE = {
    503: Refused("`unavailable`: the job store is unreachable", WITH_RETRY_AFTER),
}
BODY_REFUSED = {
    400: Refused("`malformed_json`, or `bad_request`: a Content-Length that is not a number"),
    408: Refused("`body_timeout`: the body did not arrive within STEPSTREAM_BODY_TIMEOUT_SECONDS"),
    413: Refused("`body_too_large`: over STEPSTREAM_MAX_BODY_BYTES"),
    415: Refused(
        "`unsupported_media_type`: a body not sent as `Content-Type: application/json` (or a "
        "`+json` type; `details.expected`)"
    ),
}
# Answered by `stepstream web` itself, before the app sees the request: on every operation.
HEAD_REFUSED = {
    431: Refused(
        "`header_too_large`: the request line and headers over STEPSTREAM_MAX_HEADER_BYTES; "
        "the connection is closed"
    )
}
NOT_FOUND = {404: Refused("`job_not_found`: no such job, or not the caller's, or out of scope")}
TOO_MANY_STREAMS = {
    429: Refused(
        "`too_many_streams`: over a stream limit of this web process: the API key's, the "
        "stream token's or the process's (`details.per`: key, token, process; "
        "`details.setting` names it)",
        WITH_RETRY_AFTER,
    )
}
SUBMIT_LIMITS = {
    429: Refused(
        "`rate_limited` (STEPSTREAM_SUBMISSIONS_PER_SECOND) or `too_many_unfinished_jobs` "
        "(STEPSTREAM_MAX_UNFINISHED_PER_OWNER)",
        WITH_RETRY_AFTER,
    )
}
SUBMIT_BAD_REQUEST = {
    400: Refused(
        "`malformed_json`; `bad_request`: a Content-Length that is not a "
        "number; `bad_idempotency_key`: not 1 to 200 printable ASCII characters"
    )
}
SSE: dict[str, Schema] = {"text/event-stream": {}}
SSE_DESCRIPTION = (
    "Server-Sent Events: `retry:` first, then each event with its `id:`, "
    "`event:` (its type) and one `data:` line of JSON (docs/protocol.md, Streams)"
)
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
# What a client does next with a job it got: the operations that take its id.
JOB_LINKS = {
    "GetJob": "getJob",
    "GetJobEvents": "getJobEvents",
    "CancelJob": "cancelJob",
    "RetryJob": "retryJob",
    "CreateJobToken": "createJobToken",
    "AnswerInput": "answerInput",
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


def routes(settings: Settings, tasks: list[TaskSpec], inputs: dict[str, str]) -> list[Route]:
    """Every operation: its request, its answers by status with their models, and its refusals
    with their codes. (``HEAD_REFUSED`` applies to all of them.)"""
    return [
        Route(
            "POST",
            "/api/jobs",
            "submitJob",
            "Submit a job",
            parameters=[IDEMPOTENCY_KEY],
            request=_submissions(tasks, inputs, settings),
            replies={
                202: Reply(
                    "Accepted; the job is queued (or scheduled)",
                    bodies.AcceptedJob,
                    headers={"Location": LOCATION},
                    links=JOB_LINKS,
                ),
                200: Reply(
                    "The job an earlier request with this Idempotency-Key made",
                    bodies.AcceptedJob,
                    headers={"Location": LOCATION},
                    links=JOB_LINKS,
                ),
            },
            refusals={
                **BODY_REFUSED,
                **SUBMIT_BAD_REQUEST,
                **UNAUTHORIZED,
                **IDEMPOTENCY_REFUSED,
                422: Refused(
                    "`invalid_body`, `unknown_task` (details list the known tasks), "
                    "`invalid_input` (details name the fields), `input_too_deep`, "
                    "`string_too_long`, `invalid_callback_url`"
                ),
                **SUBMIT_LIMITS,
                **UNAVAILABLE,
            },
        ),
        Route(
            "GET",
            "/api/jobs",
            "listJobs",
            "List jobs, newest first",
            parameters=[
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
            replies={200: Reply("A page of jobs", bodies.JobList)},
            refusals={
                400: Refused(
                    "`bad_status`, `bad_limit`, `bad_subject`, `bad_parent` or `bad_cursor`"
                ),
                **UNAUTHORIZED,
                **UNAVAILABLE,
            },
        ),
        Route(
            "GET",
            "/api/jobs/{job_id}",
            "getJob",
            "One job's record",
            access="key_or_token",
            parameters=[JOB_ID],
            replies={200: Reply("The record", bodies.Job)},
            refusals={**UNAUTHORIZED, **NOT_FOUND, **UNAVAILABLE},
        ),
        Route(
            "GET",
            "/api/jobs/{job_id}/events",
            "getJobEvents",
            "One job's events; the response ends after the terminal event",
            access="key_or_token",
            parameters=[JOB_ID, *STREAM_PARAMS],
            replies={
                200: Reply(SSE_DESCRIPTION, content=SSE),
                204: Reply("The cursor is at the terminal event: nothing follows"),
            },
            refusals={
                400: Refused("`bad_cursor`"),
                **UNAUTHORIZED,
                **NOT_FOUND,
                **TOO_MANY_STREAMS,
                **UNAVAILABLE,
            },
        ),
        Route(
            "POST",
            "/api/jobs/{job_id}/cancel",
            "cancelJob",
            "Cancel a queued or running job (or a batch, as its own cancel)",
            parameters=[JOB_ID],
            replies={
                200: Reply("Cancelled before it started", bodies.Job),
                202: Reply("Running: the worker stops it within a second", bodies.CancelRequested),
            },
            refusals={
                **UNAUTHORIZED,
                **NOT_FOUND,
                409: Refused("`conflict`: the job has finished (`details.state`)"),
                **UNAVAILABLE,
            },
        ),
        Route(
            "POST",
            "/api/jobs/{job_id}/retry",
            "retryJob",
            "Run a failed or cancelled job again",
            parameters=[JOB_ID],
            replies={202: Reply("Queued again", bodies.Job)},
            refusals={
                **UNAUTHORIZED,
                **NOT_FOUND,
                409: Refused("`conflict`: the job is not failed or cancelled"),
                422: Refused("`unknown_task`: the job's task is no longer declared"),
                429: Refused(
                    "`too_many_unfinished_jobs`: the job would take a place under "
                    "STEPSTREAM_MAX_UNFINISHED_PER_OWNER and none is left",
                    WITH_RETRY_AFTER,
                ),
                **UNAVAILABLE,
            },
        ),
        Route(
            "POST",
            "/api/jobs/{job_id}/token",
            "createJobToken",
            "A short-lived token for this job's record and stream (scope job:<id>); "
            "with `may_answer` it may also answer the job's input",
            parameters=[JOB_ID],
            request={
                "type": "object",
                "additionalProperties": False,
                "properties": {"may_answer": {"type": "boolean"}},
            },
            request_required=False,
            replies={200: Reply("The token", bodies.JobToken)},
            refusals={
                **BODY_REFUSED,
                **UNAUTHORIZED,
                **NOT_FOUND,
                422: Refused("`invalid_body`: not an object, an unknown field, not a boolean"),
                **UNAVAILABLE,
            },
        ),
        Route(
            "POST",
            "/api/jobs/{job_id}/input",
            "answerInput",
            "Give the input a waiting job asks for (its `waiting_for`): the job "
            "is queued again and resumes from its checkpoints",
            # An answer's token goes in the Authorization header, as a key does (never ?token=).
            access="key_or_answer_token",
            parameters=[JOB_ID],
            request={
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "value"],
                "properties": {
                    "name": {"type": "string"},
                    "value": {"description": "fits `waiting_for.schema` (JSON Schema)"},
                },
            },
            replies={202: Reply("Answered: the job is queued again", bodies.Job)},
            refusals={
                **BODY_REFUSED,
                **UNAUTHORIZED,
                403: Refused(
                    "`forbidden`: a stream token not minted with `may_answer` for this job"
                ),
                **NOT_FOUND,
                409: Refused(
                    "`not_waiting` (`details.state`), `wrong_input`: the job waits for "
                    "another name (`details.waiting_for`), `already_answered`: the first "
                    "answer is kept (`details.by`, `details.at`)"
                ),
                413: Refused(
                    "`answer_too_large`: the value over STEPSTREAM_MAX_ANSWER_BYTES as "
                    "compact JSON; `body_too_large`: the body over STEPSTREAM_MAX_BODY_BYTES"
                ),
                422: Refused(
                    "`invalid_value`: the value does not fit the schema (`details`: "
                    "`loc`, `msg` per problem; the schema is closed: an undeclared field "
                    "is one); `invalid_body`; `input_too_deep` "
                    "(STEPSTREAM_MAX_INPUT_DEPTH); `string_too_long` "
                    "(STEPSTREAM_MAX_STRING_LENGTH)"
                ),
                **UNAVAILABLE,
            },
        ),
        Route(
            "GET",
            "/api/events",
            "streamEvents",
            "Every job's events the caller may see (the firehose); never ends on its own",
            access="key_or_token",
            parameters=STREAM_PARAMS,
            replies={200: Reply(SSE_DESCRIPTION, content=SSE)},
            refusals={
                400: Refused("`bad_cursor`"),
                **UNAUTHORIZED,
                **TOO_MANY_STREAMS,
                **UNAVAILABLE,
            },
        ),
        Route(
            "POST",
            "/api/events/token",
            "createEventsToken",
            "A short-lived token for the caller's firehose (scope events), or "
            "with a subject for that subject's jobs and firehose (scope subject:<s>)",
            request={
                "type": "object",
                "additionalProperties": False,
                "properties": {"subject": {**SUBJECT, "type": ["string", "null"]}},
            },
            request_required=False,
            replies={200: Reply("The token", bodies.Token)},
            refusals={
                **BODY_REFUSED,
                **UNAUTHORIZED,
                422: Refused("`invalid_body`: not an object, an unknown field, not a subject"),
                **UNAVAILABLE,
            },
        ),
        Route(
            "POST",
            "/api/batches",
            "submitBatch",
            "One job per input, under a parent job that counts them",
            parameters=[IDEMPOTENCY_KEY],
            request=_batches(tasks, inputs, settings),
            replies={
                202: Reply(
                    "The parent job",
                    bodies.AcceptedJob,
                    headers={"Location": {**LOCATION, "description": "the path of the batch"}},
                    links={"GetBatch": "getBatch", "CancelBatch": "cancelBatch"},
                ),
                200: Reply(
                    "The batch an earlier request with this Idempotency-Key made",
                    bodies.AcceptedJob,
                    headers={"Location": {**LOCATION, "description": "the path of the batch"}},
                ),
            },
            refusals={
                **BODY_REFUSED,
                **SUBMIT_BAD_REQUEST,
                **UNAUTHORIZED,
                **IDEMPOTENCY_REFUSED,
                422: Refused(
                    "`invalid_body` (wrong shape, or not 1 to STEPSTREAM_MAX_BATCH_SIZE "
                    "inputs), `unknown_task`, `invalid_input` (details name each input's "
                    "problems), `input_too_deep`, `string_too_long`, `invalid_callback_url`"
                ),
                **SUBMIT_LIMITS,
                **UNAVAILABLE,
            },
        ),
        Route(
            "GET",
            "/api/batches/{job_id}",
            "getBatch",
            "A batch: the parent and its children so far",
            parameters=[JOB_ID],
            replies={200: Reply("The parent record and its children", bodies.Batch)},
            refusals={
                **UNAUTHORIZED,
                404: Refused("`job_not_found`, or `batch_not_found`: the job is no batch"),
                **UNAVAILABLE,
            },
        ),
        Route(
            "POST",
            "/api/batches/{job_id}/cancel",
            "cancelBatch",
            "Cancel a batch and its children (any other job: as its own cancel)",
            parameters=[JOB_ID],
            replies={
                200: Reply("A job that is no batch, cancelled before it started", bodies.Job),
                202: Reply(
                    "The children that had not started are cancelled; running ones stop "
                    "in their workers",
                    bodies.CancelRequested,
                ),
            },
            refusals={
                **UNAUTHORIZED,
                **NOT_FOUND,
                409: Refused("`conflict`: finished (`details.state`)"),
                **UNAVAILABLE,
            },
        ),
        Route(
            "GET",
            "/api/tasks",
            "listTasks",
            "The tasks this deployment runs, with their input schemas",
            replies={200: Reply("The tasks", bodies.TaskList)},
            refusals={**UNAUTHORIZED, **UNAVAILABLE},
        ),
        Route(
            "GET",
            "/api/stats",
            "getStats",
            "Queue health: per task counts, durations, failure rate; workers",
            replies={200: Reply("The numbers", bodies.Stats)},
            refusals={**UNAUTHORIZED, **UNAVAILABLE},
        ),
        Route(
            "GET",
            "/metrics",
            "getMetrics",
            "Prometheus metrics (the operator keeps it off the public network)",
            access="none",
            replies={
                200: Reply(
                    "The Prometheus text format",
                    content={"text/plain": {"schema": {"type": "string"}}},
                )
            },
            refusals=UNAVAILABLE,
        ),
        Route(
            "GET",
            "/healthz",
            "healthz",
            "Liveness",
            access="none",
            replies={200: Reply("Alive", bodies.Alive)},
            refusals={},
        ),
        Route(
            "GET",
            "/readyz",
            "readyz",
            "Readiness: Redis reachable",
            access="none",
            replies={
                200: Reply(
                    "Ready; `hub`: connected or reconnecting; `webhooks`: whether the live "
                    "processes agree on their webhook settings (`settings`, `differing`) "
                    "and how many deliveries a worker's settings hold (`held`)",
                    bodies.Ready,
                ),
                # Not a refusal (an `Error`): the same kind of answer as the 200's.
                503: Reply("Redis unreachable", bodies.Unready),
            },
            refusals={},
        ),
    ]


def _ref(name: str) -> Schema:
    return {"$ref": REF.format(model=name)}


def _response(description: str, schema: Schema | None, headers: dict[str, Schema]) -> Schema:
    response: Schema = {"description": description}
    if schema is not None:
        response["content"] = {"application/json": {"schema": schema}}
    if headers:
        response["headers"] = headers
    return response


def _reply(reply: Reply) -> Schema:
    body = _ref(reply.body.__name__) if reply.body is not None else None
    response = _response(reply.description, body, reply.headers)
    if reply.content is not None:
        response["content"] = reply.content
    if reply.links:
        job_id = {"job_id": "$response.body#/id"}
        response["links"] = {
            name: {"operationId": operation, "parameters": job_id}
            for name, operation in reply.links.items()
        }
    return response


def _operation(route: Route, security: dict[Access, list[dict[str, list[str]]]]) -> Schema:
    operation: Schema = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "security": security[route.access],
    }
    if route.parameters:
        operation["parameters"] = route.parameters
    if route.request is not None:
        operation["requestBody"] = {
            "required": route.request_required,
            "content": {"application/json": {"schema": route.request}},
        }
    refusals = {**route.refusals, **HEAD_REFUSED}
    operation["responses"] = {
        **{str(status): _reply(reply) for status, reply in route.replies.items()},
        **{
            str(status): _response(refused.description, _ref("Error"), refused.headers)
            for status, refused in refusals.items()
        },
    }
    return operation


def body_schemas() -> dict[str, Schema]:
    """The schema of every body in ``bodies.MODELS``, and of the models they hold, by name."""
    _, schemas = models_json_schema(
        [(model, "serialization") for model in bodies.MODELS], ref_template=REF
    )
    defs: dict[str, Schema] = schemas["$defs"]
    return defs


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
    key: dict[str, list[str]] = {"bearer": []}
    # A stream token opens streams and reads records (scope `job:<id>`, `subject:<s>` or
    # `events`); an answer's token is sent as a key is.
    security: dict[Access, list[dict[str, list[str]]]] = {
        "key": [key, *anonymous],
        "key_or_token": [key, {"streamToken": []}, *anonymous],
        "key_or_answer_token": [key, {"answerToken": []}, *anonymous],
        "none": [{}],
    }
    paths: dict[str, Schema] = {}
    for route in routes(settings, tasks, inputs):
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, security)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Stepstream", "version": "0.1.0"},
        # The paths below are relative to this URL (OpenAPI's default is "/").
        "servers": [{"url": root or "/"}],
        "paths": paths,
        "components": {
            "schemas": {**body_schemas(), **input_components},
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
        "security": security["key"],
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
