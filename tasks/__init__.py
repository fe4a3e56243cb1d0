"""The job side of Stepstream: models, the Redis store and event log, the worker runtime, tasks.

This package never imports ``server``.
"""

from __future__ import annotations

from tasks.context import TaskContext
from tasks.errors import PermanentError, RetryAfter, TransientError
from tasks.registry import task

__all__ = ["PermanentError", "RetryAfter", "TaskContext", "TransientError", "task"]
