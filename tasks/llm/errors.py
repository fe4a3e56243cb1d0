"""The LLM call's failures, as the job runtime treats them: permanent, or retried."""

from __future__ import annotations

from stepstream.tasks.errors import PermanentError, TransientError


class LLMRefused(PermanentError):
    """The provider refused the request on content-policy grounds: no retry can change that."""


class LLMRequestError(PermanentError):
    """The provider rejected the request itself (4xx other than 429): a key, model or body
    problem that retrying does not fix."""


class LLMInvalidReply(PermanentError):
    """The reply did not fit the response model, twice (the second ask quoted the error)."""


class LLMUnavailable(TransientError):
    """5xx, a timeout or a dropped connection, after the retries inside the call."""
