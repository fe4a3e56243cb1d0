"""Exceptions a task raises to say how its failure should be treated."""

from __future__ import annotations


class TaskError(Exception):
    """Base of the errors a task may raise on purpose."""


class TransientError(TaskError):
    """A failure worth retrying after the task's backoff (a timeout, a dropped connection)."""


class RetryAfter(TransientError):
    """Retry after exactly ``seconds`` (for example after an HTTP 429 with Retry-After)."""

    def __init__(self, seconds: float, message: str = "") -> None:
        super().__init__(message or f"retry after {seconds:g}s")
        self.seconds = seconds


class StepTimeout(TransientError):
    """A step ran past its ``timeout``; retried unless the step says ``retry_timeout=False``."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class TaskTimeout(TransientError):
    """The whole task ran past its ``timeout``; retried unless the task says otherwise."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class PermanentError(TaskError):
    """A failure that no retry can fix (invalid input, a content-policy refusal)."""


class InputTimeout(PermanentError):
    """Nobody gave the input a job waited for (``ctx.wait_for_input``) before its timeout, and
    the task set no default: the job fails with this error type."""


class JobCancelled(Exception):
    """Raised inside a task when its job was cancelled; the runtime records ``cancelled``."""

    def __init__(self, reason: str = "cancelled by request") -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigurationError(Exception):
    """A setting that cannot work. Its message is one plain line for the operator, shown
    without a traceback by the web process and the worker."""
