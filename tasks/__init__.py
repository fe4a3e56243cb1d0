"""The job side of Stepstream: models, the Redis store and event log, the worker runtime, tasks.

This package never imports ``server``.
"""

from __future__ import annotations

from stepstream.tasks.context import TaskContext
from stepstream.tasks.errors import PermanentError, RetryAfter, TransientError
from stepstream.tasks.registry import task

__all__ = ["PermanentError", "RetryAfter", "TaskContext", "TransientError", "task"]
