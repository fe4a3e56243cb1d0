"""The JSON bodies the API answers with, as pydantic models: the one copy of each shape.

The handlers serialise with these models (``json_response``) and ``server/openapi.py``
generates the document's schemas from them, so a field cannot be sent without being
described, nor described without being sent. A body that IS a job's record is that record's
model (``tasks.models.JobRecord``) with what the API adds to it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, Field, WithJsonSchema
from starlette.responses import JSONResponse

from stepstream.tasks.models import JobRecord, JobState, job_links
from stepstream.tasks.registry import TaskSpec, submitted_input_model

# A JSON number kept as given: a bare ``float`` would turn a task's ``timeout=30`` into 30.0.
Number = Annotated[int | float, WithJsonSchema({"type": "number"})]
UnixTime = Annotated[Number, Field(description="Unix time")]


class ApiJSONResponse(JSONResponse):
    """Starlette's JSONResponse, the same bytes, with one encoder for the process: its
    ``render`` builds a new one on every response (``json.dumps`` with options)."""

    _encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode

    def render(self, content: Any) -> bytes:
        return self._encode(content).encode("utf-8")


def json_response(
    body: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    """``body`` as the API sends it: its fields in the model's order, as JSON."""
    return ApiJSONResponse(body.model_dump(mode="json"), status_code=status_code, headers=headers)


# -- Errors ----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="what went wrong, for programs: each operation lists its own")
    message: str = Field(description="what went wrong, for people")
    details: Any = Field(default=None, description="the facts behind it, by code; often null")


class Error(BaseModel):
    """Every refusal: a 4xx for a client mistake, 503 when the job store is unreachable."""

    error: ErrorDetail

    @classmethod
    def of(cls, code: str, message: str, details: Any = None) -> Error:
        return cls(error=ErrorDetail(code=code, message=message, details=details))


# -- Jobs ------------------------------------------------------------------------------------


class Links(BaseModel):
    self: str = Field(description="the job's record")
    events: str = Field(description="the job's event stream")


class Job(JobRecord):
    """A job's record as the API shows it: the stored record with its ``links``."""

    links: Links

    @classmethod
    def of(cls, record: JobRecord, root: str, **extra: Any) -> Self:
        """``record`` served under ``root`` (``urls.root_path``), with ``extra`` fields of a
        subclass. Not validated again: the record was validated when it was read."""
        return cls.model_construct(
            **{**record.__dict__, **extra}, links=Links(**job_links(root, record.id))
        )


class AcceptedJob(Job):
    """A job just submitted (or found by its Idempotency-Key): EventSource cannot send
    headers, so the answer carries a token for the job's stream."""

    stream_token: str = Field(description="scope `job:<id>`")
    stream_token_expires_at: UnixTime


def accepted_json(
    record: JobRecord, root: str, *, stream_token: str, stream_token_expires_at: float
) -> dict[str, Any]:
    """``AcceptedJob.of(record, root, ...)`` as ``json_response`` dumps it, without building
    the model: the record's own dump (the fields ``Job`` inherits, in its order), then what
    ``Job`` and ``AcceptedJob`` add. Every submission answers with it."""
    body = record.model_dump(mode="json")
    body["links"] = job_links(root, record.id)
    body["stream_token"] = stream_token
    body["stream_token_expires_at"] = stream_token_expires_at
    return body


class CancelRequested(Job):
    cancel_requested: Literal[True]


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = Field(description="the `cursor` of the next page; null: the last")


# -- Batches ---------------------------------------------------------------------------------


class BatchChild(BaseModel):
    id: str
    index: int = Field(description="its place in the batch's inputs")
    state: JobState
    result: Any
    error: dict[str, Any] | None = Field(description="the child's error, without its traceback")
    cached: bool


class ExpiredChild(BaseModel):
    """A child whose record is gone (past STEPSTREAM_RETENTION_SECONDS)."""

    id: str
    index: int
    state: None


class Batch(Job):
    """A batch's parent record, with its items where a job's record has its children's counts."""

    # The record's `children` (a parent's counts) is a list of items here: the one field that
    # differs from a job's, so the type differs from the base class's on purpose.
    children: list[BatchChild | ExpiredChild]  # type: ignore[assignment]


# -- Tokens ----------------------------------------------------------------------------------


class Token(BaseModel):
    token: str
    expires_at: UnixTime
    scope: str = Field(description="`job:<id>`, `subject:<s>` or `events`")


class JobToken(Token):
    may_answer: bool = Field(description="it may also answer the job's input")


# -- Tasks -----------------------------------------------------------------------------------


class Task(BaseModel):
    name: str
    title: str
    description: str
    steps: list[str]
    max_attempts: int
    timeout: Number
    concurrency: int | None
    input_schema: dict[str, Any] = Field(description="JSON Schema of the task's input")
    sample_input: dict[str, Any] | None
    budget: Number | None
    cache_ttl: Number | None

    @classmethod
    def of(cls, spec: TaskSpec) -> Task:
        return cls(
            name=spec.name,
            title=spec.title,
            description=spec.description,
            steps=list(spec.steps),
            max_attempts=spec.max_attempts,
            timeout=spec.timeout,
            concurrency=spec.concurrency,
            # As submissions are checked: fields the model does not declare are refused.
            input_schema=submitted_input_model(spec.input_model).model_json_schema(),
            sample_input=spec.sample_input,
            budget=spec.budget,
            cache_ttl=spec.cache_ttl,
        )


class TaskList(BaseModel):
    tasks: list[Task]


# -- Health and statistics -------------------------------------------------------------------


class Counts(BaseModel):
    counts: dict[str, int] = Field(description="jobs by state")
    duration_p50: Number | None
    duration_p95: Number | None
    failure_rate: Number | None
    retried: int
    queue_depth: int
    oldest_queued_age: Number | None


class Stats(BaseModel):
    tasks: dict[str, Counts]
    total: Counts
    queue_depth: int
    oldest_queued_age: Number | None
    workers_alive: int
    workers: list[dict[str, Any]]
    streams_open: int
    window_seconds: int
    scanned_jobs: int
    scan_truncated: bool


class Alive(BaseModel):
    status: Literal["ok"]


class WebhookAgreement(BaseModel):
    settings: Literal["agree", "differ"]
    differing: list[str] = Field(description="the settings the live processes disagree on")
    processes: int
    held: int = Field(description="deliveries a worker's settings hold")


class WebhooksUnknown(BaseModel):
    settings: str = Field(description="`unknown: <the error>`: Redis could not say")


class Ready(BaseModel):
    status: Literal["ready"]
    redis: Literal["ok"]
    hub: Literal["connected", "reconnecting"]
    webhooks: WebhookAgreement | WebhooksUnknown


class Unready(BaseModel):
    status: Literal["unavailable"]
    redis: str = Field(description="`unreachable: <the error>`")


# Every body above, in the order the document lists them.
MODELS: list[type[BaseModel]] = [
    Error,
    Token,
    JobToken,
    Task,
    TaskList,
    Counts,
    Stats,
    Job,
    AcceptedJob,
    CancelRequested,
    Batch,
    JobList,
    Alive,
    Ready,
    Unready,
]
