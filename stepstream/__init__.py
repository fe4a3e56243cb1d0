"""Stepstream's script side: a Python client and the ``stepstream`` command.

    from stepstream import Client

    with Client() as client:                       # $STEPSTREAM_URL or http://127.0.0.1:8000
        job = client.submit("analyze_document", {"text": "..."})
        for event in client.events(job.id, after="0"):
            print(event.type)
        print(client.wait(job.id).result)

The client imports nothing from ``stepstream.server`` or ``stepstream.tasks``: it talks to a
Stepstream server over HTTP, and ``pip install stepstream`` installs only httpx, httpx-sse and
pydantic for it.

Task authors import from here too (with the server extra: ``pip install
"/path/to/stepstream[server]"``, docs/install.md)::

    from stepstream import TaskContext, task

    @task("summarise", steps=["Read", "Summarise"])
    async def summarise(ctx: TaskContext, data: dict) -> dict: ...

Every name is loaded on first use: ``import stepstream`` stays light for the client, and the
web and worker processes never load the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The client: imported on first access too, so the web and worker processes, which never use it,
# start without it (httpx, and the pydantic models of every event).
_CLIENT_API = {
    "AsyncClient": "stepstream._async_client",
    "Client": "stepstream._client",
    "APIError": "stepstream._exceptions",
    "BadRequest": "stepstream._exceptions",
    "Conflict": "stepstream._exceptions",
    "FieldError": "stepstream._exceptions",
    "InvalidInput": "stepstream._exceptions",
    "NotFound": "stepstream._exceptions",
    "RateLimited": "stepstream._exceptions",
    "ServerUnavailable": "stepstream._exceptions",
    "StepstreamError": "stepstream._exceptions",
    "Unauthorized": "stepstream._exceptions",
    "WaitTimeout": "stepstream._exceptions",
    "CancelledEvent": "stepstream._models",
    "ChildEvent": "stepstream._models",
    "ChildrenWait": "stepstream._models",
    "CompletedEvent": "stepstream._models",
    "ErrorInfo": "stepstream._models",
    "Event": "stepstream._models",
    "FailedEvent": "stepstream._models",
    "InputAnswer": "stepstream._models",
    "InputEvent": "stepstream._models",
    "InputRequest": "stepstream._models",
    "Job": "stepstream._models",
    "JobPage": "stepstream._models",
    "JobState": "stepstream._models",
    "LogEvent": "stepstream._models",
    "OutputEvent": "stepstream._models",
    "ProgressEvent": "stepstream._models",
    "QueuedEvent": "stepstream._models",
    "ResetEvent": "stepstream._models",
    "RetryingEvent": "stepstream._models",
    "SnapshotEvent": "stepstream._models",
    "StartedEvent": "stepstream._models",
    "Step": "stepstream._models",
    "StepCompletedEvent": "stepstream._models",
    "StepEvent": "stepstream._models",
    "StepRecord": "stepstream._models",
    "StreamToken": "stepstream._models",
    "TaskInfo": "stepstream._models",
    "UnknownEvent": "stepstream._models",
    "WaitingEvent": "stepstream._models",
}


# The task author's API, from the job side. Imported on first access (PEP 562): a client-only
# install has none of the job side's dependencies (arq, redis) and never touches these names.
_TASK_API = {
    "task": "stepstream.tasks.registry",
    "Backoff": "stepstream.tasks.registry",
    "TaskRegistry": "stepstream.tasks.registry",
    "TaskContext": "stepstream.tasks.context",
    "StepHandle": "stepstream.tasks.context",
    "TaskError": "stepstream.tasks.errors",
    "TransientError": "stepstream.tasks.errors",
    "PermanentError": "stepstream.tasks.errors",
    "RetryAfter": "stepstream.tasks.errors",
    "StepTimeout": "stepstream.tasks.errors",
    "TaskTimeout": "stepstream.tasks.errors",
    "JobCancelled": "stepstream.tasks.errors",
    "InputTimeout": "stepstream.tasks.errors",
    "ChildFailed": "stepstream.tasks.children",
    "ChildHandle": "stepstream.tasks.children",
    "ChildrenFailed": "stepstream.tasks.children",
    "ChildrenRefused": "stepstream.tasks.children",
    "Pricing": "stepstream.tasks.cost",
    "BudgetExceeded": "stepstream.tasks.cost",
    "recurring": "stepstream.tasks.recurring",
    "LLMRefused": "stepstream.tasks.llm",
    "LLMRequestError": "stepstream.tasks.llm",
    "LLMInvalidReply": "stepstream.tasks.llm",
    "LLMUnavailable": "stepstream.tasks.llm",
}

if TYPE_CHECKING:
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
        ChildEvent,
        ChildrenWait,
        CompletedEvent,
        ErrorInfo,
        Event,
        FailedEvent,
        InputAnswer,
        InputEvent,
        InputRequest,
        Job,
        JobPage,
        JobState,
        LogEvent,
        OutputEvent,
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
        StreamToken,
        TaskInfo,
        UnknownEvent,
        WaitingEvent,
    )
    from stepstream.tasks.children import (
        ChildFailed,
        ChildHandle,
        ChildrenFailed,
        ChildrenRefused,
    )
    from stepstream.tasks.context import StepHandle, TaskContext
    from stepstream.tasks.cost import BudgetExceeded, Pricing
    from stepstream.tasks.errors import (
        InputTimeout,
        JobCancelled,
        PermanentError,
        RetryAfter,
        StepTimeout,
        TaskError,
        TaskTimeout,
        TransientError,
    )
    from stepstream.tasks.llm import LLMInvalidReply, LLMRefused, LLMRequestError, LLMUnavailable
    from stepstream.tasks.recurring import recurring
    from stepstream.tasks.registry import Backoff, TaskRegistry, task


def __getattr__(name: str) -> Any:
    module_name = _CLIENT_API.get(name) or _TASK_API.get(name)
    if module_name is None:
        raise AttributeError(f"module 'stepstream' has no attribute {name!r}")
    try:
        if name in _TASK_API:
            # Every job-side name needs the server extra, though a few of their modules import
            # without it (stepstream.tasks.registry): loading the task context, which every task
            # runs with, says on first use whether the extra is there, not later in a worker.
            importlib.import_module("stepstream.tasks.context")
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if name not in _TASK_API:
            raise
        raise ImportError(
            f"stepstream.{name} is part of the job side, which needs the server extra: "
            f'pip install "/path/to/stepstream[server]", from a checkout or a wheel built from one '
            f"({exc})"
        ) from exc
    value = getattr(module, name)
    globals()[name] = value
    return value


__all__ = [
    "APIError",
    "AsyncClient",
    "Backoff",
    "BadRequest",
    "BudgetExceeded",
    "CancelledEvent",
    "ChildEvent",
    "ChildFailed",
    "ChildHandle",
    "ChildrenFailed",
    "ChildrenRefused",
    "ChildrenWait",
    "Client",
    "CompletedEvent",
    "Conflict",
    "ErrorInfo",
    "Event",
    "FailedEvent",
    "FieldError",
    "InputAnswer",
    "InputEvent",
    "InputRequest",
    "InputTimeout",
    "InvalidInput",
    "Job",
    "JobCancelled",
    "JobPage",
    "JobState",
    "LLMInvalidReply",
    "LLMRefused",
    "LLMRequestError",
    "LLMUnavailable",
    "LogEvent",
    "NotFound",
    "OutputEvent",
    "PermanentError",
    "Pricing",
    "ProgressEvent",
    "QueuedEvent",
    "RateLimited",
    "ResetEvent",
    "RetryAfter",
    "RetryingEvent",
    "ServerUnavailable",
    "SnapshotEvent",
    "StartedEvent",
    "Step",
    "StepCompletedEvent",
    "StepEvent",
    "StepHandle",
    "StepRecord",
    "StepTimeout",
    "StepstreamError",
    "StreamToken",
    "TaskContext",
    "TaskError",
    "TaskInfo",
    "TaskRegistry",
    "TaskTimeout",
    "TransientError",
    "Unauthorized",
    "UnknownEvent",
    "WaitTimeout",
    "WaitingEvent",
    "recurring",
    "task",
]
