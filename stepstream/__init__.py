"""Stepstream's script side: a Python client and the ``stepstream`` command.

    from stepstream import Client

    with Client() as client:                       # $STEPSTREAM_URL or http://127.0.0.1:8000
        job = client.submit("analyze_document", {"text": "..."})
        for event in client.events(job.id, after="0"):
            print(event.type)
        print(client.wait(job.id).result)

Imports nothing from ``server`` or ``tasks``: it talks to a Stepstream server over HTTP.
"""

from __future__ import annotations

from stepstream._async_client import AsyncClient
from stepstream._client import Client
from stepstream._exceptions import (
    APIError,
    BadRequest,
    Conflict,
    FieldError,
    InvalidInput,
    NotFound,
    RateLimited,
    ServerUnavailable,
    StepstreamError,
    Unauthorized,
    WaitTimeout,
)
from stepstream._models import (
    CancelledEvent,
    CompletedEvent,
    ErrorInfo,
    Event,
    FailedEvent,
    Job,
    JobPage,
    JobState,
    LogEvent,
    ProgressEvent,
    QueuedEvent,
    ResetEvent,
    RetryingEvent,
    SnapshotEvent,
    StartedEvent,
    Step,
    StepCompletedEvent,
    StepEvent,
    StepRecord,
    TaskInfo,
    UnknownEvent,
)

__all__ = [
    "APIError",
    "AsyncClient",
    "BadRequest",
    "CancelledEvent",
    "Client",
    "CompletedEvent",
    "Conflict",
    "ErrorInfo",
    "Event",
    "FailedEvent",
    "FieldError",
    "InvalidInput",
    "Job",
    "JobPage",
    "JobState",
    "LogEvent",
    "NotFound",
    "ProgressEvent",
    "QueuedEvent",
    "RateLimited",
    "ResetEvent",
    "RetryingEvent",
    "ServerUnavailable",
    "SnapshotEvent",
    "StartedEvent",
    "Step",
    "StepCompletedEvent",
    "StepEvent",
    "StepRecord",
    "StepstreamError",
    "TaskInfo",
    "Unauthorized",
    "UnknownEvent",
    "WaitTimeout",
]
