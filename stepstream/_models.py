"""The client's own view of job records and events.

These mirror docs/protocol.md but are defined here, not imported from the server: a script that
talks to Stepstream needs only this package. Unknown fields are kept in ``data`` (events) or
ignored (records), so a newer server does not break an older client.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class JobState(StrEnum):
    scheduled = "scheduled"
    queued = "queued"
    running = "running"
    retrying = "retrying"
    waiting = "waiting"  # waits for a person's input (``Client.answer``); holds no worker
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for ``completed``, ``failed`` and ``cancelled``: nothing follows them."""
        return self in (JobState.completed, JobState.failed, JobState.cancelled)


TERMINAL_EVENT_TYPES = frozenset({"completed", "failed", "cancelled"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Step(_Model):
    """A step of a task: ``index`` is 1-based ("step 3 of 7")."""

    index: int
    count: int
    name: str

    def __str__(self) -> str:
        return f"Step {self.index} of {self.count} · {self.name}"


class StepRecord(_Model):
    """One declared step of a job, as the record keeps it."""

    index: int
    name: str
    state: str = "pending"  # pending | running | completed | failed | cancelled | restored
    started_at: str | None = None
    finished_at: str | None = None
    duration_ms: float | None = None
    output: Any = None  # the partial result shown on step_completed
    value: Any = None  # run_step's stored return value, when its output shows something else
    text: str | None = None  # the text the step wrote so far (``output`` events)


class ErrorInfo(_Model):
    """Why a job (or one attempt of it) failed."""

    type: str
    message: str
    step: str | None = None
    retryable: bool = False

    def __str__(self) -> str:
        where = f" at step {self.step!r}" if self.step else ""
        return f"{self.type}{where}: {self.message}"


class InputRequest(_Model):
    """What a waiting job asks for: the input ``name``, a JSON Schema its value must fit, and
    when the wait ends (then ``default`` applies, or the job fails with ``InputTimeout``)."""

    name: str
    prompt: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    timeout_at: str | None = None
    default: Any = None


class ChildrenWait(_Model):
    """What a parent waiting for its child jobs waits for: their counts when it began."""

    children: dict[str, int] = Field(default_factory=dict)


class InputAnswer(_Model):
    """An input given to a job: the value, who gave it (``owner:<o>``, ``subject:<s>``,
    ``token``, ``anonymous`` or ``default``) and when."""

    value: Any = None
    by: str | None = None
    at: str | None = None


class Job(_Model):
    """A job record: the projection of the job's event log."""

    id: str
    task: str
    owner: str | None = None
    subject: str | None = None  # the end user the job was submitted for
    state: JobState
    input: dict[str, Any] = Field(default_factory=dict)
    step: Step | None = None
    progress: float = 0.0
    message: str | None = None
    steps: list[StepRecord] = Field(default_factory=list)
    attempt: int = 0
    max_attempts: int = 1
    error: ErrorInfo | None = None
    result: Any = None
    retry_at: str | None = None
    run_at: str | None = None  # a scheduled job's start time
    budget: float | None = None  # the most it may spend on LLM calls
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    last_event_id: str | None = None
    links: dict[str, str] = Field(default_factory=dict)
    # Human input: what a waiting job asks for, and the inputs given so far, by name.
    waiting_for: InputRequest | ChildrenWait | None = None
    answers: dict[str, InputAnswer] = Field(default_factory=dict)
    # Child jobs (ctx.map / ctx.spawn): a child's parent, its index and its depth; a parent's
    # children counts {size, done, completed, failed, cancelled, ...}.
    parent: str | None = None
    parent_index: int | None = None
    depth: int = 0
    children: dict[str, Any] | None = None
    # Set by ``cancel`` when the job was running: the worker stops it at its next event.
    cancel_requested: bool = False
    # On submit: a short-lived token that opens this job's stream with ``?token=`` (for a
    # browser's EventSource, which cannot send an Authorization header).
    stream_token: str | None = None
    stream_token_expires_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.state.terminal


class JobPage(_Model):
    """One page of ``GET /api/jobs``: pass ``next_cursor`` back to get the next one."""

    jobs: list[Job]
    next_cursor: str | None = None


class StreamToken(_Model):
    """A short-lived, read-only token for ``?token=`` (a browser's EventSource cannot send an
    Authorization header). ``scope`` is ``job:<id>``, ``subject:<subject>`` or ``events``."""

    token: str
    expires_at: float
    scope: str
    may_answer: bool = False  # a job token that may also answer the job's input


class TaskInfo(_Model):
    """A task the server runs (``GET /api/tasks``): its steps and its input's JSON schema."""

    name: str
    title: str | None = None
    description: str | None = None
    steps: list[str] = Field(default_factory=list)
    max_attempts: int | None = None
    input_schema: dict[str, Any] = Field(default_factory=dict)
    sample_input: dict[str, Any] | None = None


class _Event(_Model):
    """Fields every event has. ``data`` is the event's JSON exactly as the server sent it."""

    id: str | None = Field(default=None, description="the SSE id: resume this stream after it")
    type: str
    job_id: str | None = None
    at: str | None = None
    attempt: int = 0
    # Only on the firehose (``/api/events``): the event's id in its job's own log.
    event_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict, repr=False)

    @property
    def terminal(self) -> bool:
        """True when this event ends its job's stream."""
        return self.type in TERMINAL_EVENT_TYPES


class QueuedEvent(_Event):
    type: Literal["queued"] = "queued"
    input: dict[str, Any] = Field(default_factory=dict)


class StartedEvent(_Event):
    type: Literal["started"] = "started"
    max_attempts: int = 1


class StepEvent(_Event):
    type: Literal["step"] = "step"
    step: Step


class ProgressEvent(_Event):
    type: Literal["progress"] = "progress"
    current: float = 0
    total: float | None = None
    message: str | None = None

    @property
    def fraction(self) -> float | None:
        """``current / total`` in 0..1, or None when the total is unknown."""
        if not self.total:
            return None
        return max(0.0, min(1.0, self.current / self.total))


class StepCompletedEvent(_Event):
    type: Literal["step_completed"] = "step_completed"
    step: Step
    duration_ms: float | None = None
    output: Any = None
    restored: bool = False


class OutputEvent(_Event):
    """A delta of a step's streamed text: ``offset`` characters of it came before ``text``.
    Offset 0 starts the text (again, when a new attempt runs the step over)."""

    type: Literal["output"] = "output"
    step: Step
    text: str = ""
    offset: int = 0


class LogEvent(_Event):
    type: Literal["log"] = "log"
    level: str = "info"
    message: str = ""


class RetryingEvent(_Event):
    type: Literal["retrying"] = "retrying"
    error: ErrorInfo | None = None
    max_attempts: int | None = None
    retry_at: str | None = None


class WaitingEvent(_Event):
    """The job waits for the input ``name`` (answer it with ``Client.answer``), or, with
    ``children`` (their counts) and no name, for its child jobs."""

    type: Literal["waiting"] = "waiting"
    name: str = ""
    children: dict[str, int] | None = None
    prompt: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    timeout_at: str | None = None
    default: Any = None


class InputEvent(_Event):
    """The input ``name`` was given: the job is queued again."""

    type: Literal["input"] = "input"
    name: str
    value: Any = None
    by: str | None = None


class ChildEvent(_Event):
    """On a parent's stream: one of its child jobs started (``child["state"] == "running"``)
    or ended (its outcome, ``result`` or ``error``); an end carries the parent's ``counts``,
    ``message`` ("23 of 50 done") and, in a step, its rolled-up ``progress``."""

    type: Literal["child"] = "child"
    child: dict[str, Any] = Field(default_factory=dict)
    counts: dict[str, int] | None = None
    message: str | None = None
    progress: float | None = None


class CompletedEvent(_Event):
    type: Literal["completed"] = "completed"
    result: Any = None


class FailedEvent(_Event):
    type: Literal["failed"] = "failed"
    error: ErrorInfo | None = None


class CancelledEvent(_Event):
    type: Literal["cancelled"] = "cancelled"
    reason: str | None = None


class SnapshotEvent(_Event):
    """Made by the server on a fresh connect: the whole record; its id is the latest event's."""

    type: Literal["snapshot"] = "snapshot"
    job: Job

    @property
    def terminal(self) -> bool:
        # The server ends the stream after a snapshot of a finished job.
        return self.job.finished


class ResetEvent(_Event):
    """Events after the cursor were trimmed away: a snapshot follows (job streams), or
    the firehose continues from its oldest entry and the job list should be refetched."""

    type: Literal["reset"] = "reset"
    reason: str | None = None


class UnknownEvent(_Event):
    """An event type this client does not know (from a newer server): see ``data``."""


Event = (
    QueuedEvent
    | StartedEvent
    | StepEvent
    | ProgressEvent
    | StepCompletedEvent
    | LogEvent
    | OutputEvent
    | RetryingEvent
    | WaitingEvent
    | InputEvent
    | ChildEvent
    | CompletedEvent
    | FailedEvent
    | CancelledEvent
    | SnapshotEvent
    | ResetEvent
    | UnknownEvent
)

_EVENT_CLASSES: dict[str, type[_Event]] = {
    "queued": QueuedEvent,
    "started": StartedEvent,
    "step": StepEvent,
    "progress": ProgressEvent,
    "step_completed": StepCompletedEvent,
    "log": LogEvent,
    "output": OutputEvent,
    "retrying": RetryingEvent,
    "waiting": WaitingEvent,
    "input": InputEvent,
    "child": ChildEvent,
    "completed": CompletedEvent,
    "failed": FailedEvent,
    "cancelled": CancelledEvent,
    "reset": ResetEvent,
}


def parse_event(event_type: str, event_id: str | None, raw_data: str) -> Event:
    """Build a typed event from one SSE frame (its ``event:``, ``id:`` and ``data:``)."""
    payload: Any = json.loads(raw_data) if raw_data else {}
    if not isinstance(payload, dict):
        payload = {"value": payload}
    if event_type == "snapshot":
        job = Job.model_validate(payload)
        return SnapshotEvent(id=event_id, job_id=job.id, job=job, data=payload)
    fields = {k: v for k, v in payload.items() if k not in ("id", "data")}
    fields.update(id=event_id, type=event_type, data=payload)
    event_class = _EVENT_CLASSES.get(event_type)
    if event_class is not None:
        try:
            return cast(Event, event_class.model_validate(fields))
        except ValidationError:
            pass  # a known type with an unexpected shape: keep it, untyped, rather than fail
    return UnknownEvent.model_validate(fields)


def event_json(event: Event) -> dict[str, Any]:
    """The event as ``{"id", "type", "data"}``: what ``stepstream watch --json`` prints."""
    return {"id": event.id, "type": event.type, "data": event.data}
