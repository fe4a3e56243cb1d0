"""The job record, its states and the event types, as docs/protocol.md defines them."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from stepstream._stream_id import StreamId


class JobState(StrEnum):
    # `scheduled`: accepted with a `run_at`/`delay`, waiting for its time (docs/ai-workloads.md)
    scheduled = "scheduled"
    queued = "queued"
    running = "running"
    retrying = "retrying"
    # `waiting`: suspended in `ctx.wait_for_input`, holding no worker (tasks/inputs.py)
    waiting = "waiting"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.completed, JobState.failed, JobState.cancelled})


class EventType(StrEnum):
    queued = "queued"
    started = "started"
    step = "step"
    progress = "progress"
    step_completed = "step_completed"
    log = "log"
    output = "output"  # a delta of the current step's text (tasks/output.py)
    retrying = "retrying"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"
    waiting = "waiting"  # the job asks for input (tasks/inputs.py)
    input = "input"  # the input was given
    child = "child"  # a child job started or ended (tasks/children.py), on its parent's log
    # Made by the server, never stored.
    snapshot = "snapshot"
    reset = "reset"


TERMINAL_EVENTS = frozenset({EventType.completed, EventType.failed, EventType.cancelled})


class StepRef(BaseModel):
    index: int = Field(description="1-based: step 3 of 7")
    count: int
    name: str


class Usage(BaseModel):
    """What a job's (or a step's) LLM calls consumed. Additive: old records load with zeros."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    duration_ms: float = 0.0

    def plus(self, other: Usage) -> Usage:
        return Usage(
            calls=self.calls + other.calls,
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            duration_ms=round(self.duration_ms + other.duration_ms, 3),
        )


class StepRecord(BaseModel):
    index: int
    name: str
    state: str = "pending"  # pending | running | completed | failed | restored
    started_at: str | None = None
    finished_at: str | None = None
    duration_ms: float | None = None
    output: Any = None  # the partial result shown on step_completed
    value: Any = None  # run_step's stored return value, when it shows a different output
    usage: Usage | None = None  # LLM calls made inside the step (docs/ai-workloads.md)
    text: str | None = None  # the text the step wrote so far (`output` events, tasks/output.py)


class JobError(BaseModel):
    type: str
    message: str
    step: str | None = None
    retryable: bool = False
    traceback: str | None = None


class InputRequest(BaseModel):
    """What a waiting job asks for (``ctx.wait_for_input``): the record's ``waiting_for``."""

    name: str
    prompt: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="JSON Schema of the value")
    timeout_at: str | None = None  # then the default applies, or the job fails (InputTimeout)
    default: Any = None  # the value given at timeout_at, if the task set one

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class ChildrenWait(BaseModel):
    """What a parent waiting for its child jobs waits for (``ctx.map``, ``ctx.join``): the
    record's ``waiting_for``, with its children's counts as they were when it began waiting."""

    children: dict[str, int] = Field(
        description="size, done, completed, failed, cancelled: every child the job started"
    )


class InputAnswer(BaseModel):
    """A given input, in the record's ``answers`` by name: the value, who gave it and when."""

    value: Any
    by: str  # "owner:<owner>", "subject:<subject>", "token", "anonymous" or "default"
    at: str


class JobRecord(BaseModel):
    id: str
    task: str
    owner: str | None = None
    # The end user the job belongs to, as the owner's app names them (submit `subject`).
    subject: str | None = None
    state: JobState
    input: dict[str, Any]
    step: StepRef | None = None
    progress: float = 0.0
    message: str | None = None
    steps: list[StepRecord] = Field(default_factory=list)
    attempt: int = 0
    max_attempts: int = 1
    error: JobError | None = None
    result: Any = None
    retry_at: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    last_event_id: str | None = None
    # AI workloads (docs/ai-workloads.md); every field has a default so old records still load.
    usage: Usage = Field(default_factory=Usage)
    cost: float = 0.0
    budget: float | None = None  # the most this job may spend on LLM calls
    run_at: str | None = None  # a scheduled job's start time
    cached: bool = False  # completed from the task's result cache, without running
    batch_id: str | None = None  # a batch child: its parent job
    batch_index: int | None = None  # a batch child: its place in the batch's inputs
    batch: dict[str, Any] | None = None  # a batch parent: {size, completed, failed, cancelled}
    # Jobs that start jobs (tasks/children.py). A child: its parent, its place among the
    # inputs of the parent's map, and how deep in the tree it is (a top-level job is 0).
    parent: str | None = None
    parent_index: int | None = None
    depth: int = 0
    # The fan-out it belongs to, and how many of its siblings may run at once (ctx.map's
    # concurrency), when limited.
    parent_group: str | None = None
    parent_slots: int | None = None
    # A parent: {size, done, completed, failed, cancelled} over every child it started (a read
    # of a waiting parent adds running and running_progress, tasks/rollup.py).
    children: dict[str, Any] | None = None
    # Human input (tasks/inputs.py): the request of a waiting job, and the inputs given.
    waiting_for: InputRequest | ChildrenWait | None = None
    answers: dict[str, InputAnswer] = Field(default_factory=dict)
    # Where the terminal event is POSTed (tasks/outbox.py). Stored, never shown: it may carry a
    # secret, and the record goes to browsers holding a stream token.
    callback_url: SkipJsonSchema[str | None] = Field(default=None, exclude=True)
    # The submit span's W3C context (tasks/tracing.py), which every attempt continues. Stored,
    # never shown: it is the operator's tracing, not the job's data.
    trace: SkipJsonSchema[dict[str, str] | None] = Field(default=None, exclude=True)

    @property
    def counted_into(self) -> str | None:
        """The job whose counts its end goes into: its batch, or the job that started it."""
        return self.batch_id or self.parent


def new_job_id() -> str:
    """20 characters of base64url (120 random bits: ids cannot be guessed) that never start with
    ``-`` or ``_``: a command line would take ``stepstream get -B6W…`` for an option."""
    while True:
        job_id = secrets.token_urlsafe(15)
        if job_id[0].isalnum():
            return job_id


def utcnow() -> str:
    """RFC 3339 UTC with microseconds, the format of every ``at`` field."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ``<ms>-<seq>`` (or ``0``) as a comparable StreamId; ValueError for anything else.
parse_stream_id = StreamId.parse


def job_links(base: str, job_id: str) -> dict[str, str]:
    """A job's ``links`` under ``base``: the mount path in API answers, the public URL in
    webhook bodies."""
    return {"self": f"{base}/api/jobs/{job_id}", "events": f"{base}/api/jobs/{job_id}/events"}
