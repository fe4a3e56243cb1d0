"""The job side of Stepstream: models, the Redis store and event log, the worker runtime, tasks.

This package never imports ``server`` (an import contract in pyproject.toml checks it).

The task author's names below are loaded on first use (PEP 562), as ``stepstream`` does: a web
process that imports ``stepstream.tasks.models`` loads neither the task context, the store, the
event writer nor arq.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_TASK_API = {
    "TaskContext": "stepstream.tasks.context",
    "PermanentError": "stepstream.tasks.errors",
    "RetryAfter": "stepstream.tasks.errors",
    "TransientError": "stepstream.tasks.errors",
    "task": "stepstream.tasks.registry",
}

if TYPE_CHECKING:
    from stepstream.tasks.context import TaskContext
    from stepstream.tasks.errors import PermanentError, RetryAfter, TransientError
    from stepstream.tasks.registry import task


def __getattr__(name: str) -> Any:
    # An unknown name must raise AttributeError: `from stepstream.tasks import store` relies on
    # it to fall back to importing the submodule.
    module_name = _TASK_API.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


__all__ = ["PermanentError", "RetryAfter", "TaskContext", "TransientError", "task"]
