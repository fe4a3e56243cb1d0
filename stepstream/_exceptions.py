"""The client's exceptions: one base class, one subclass per thing a caller may handle.

StepstreamError
├── APIError                the server answered with an error {code, message, details}
│   ├── BadRequest          400, 413: a malformed request (bad cursor, bad filter, too large)
│   ├── Unauthorized        401, 403
│   ├── NotFound            404: no such job (or it expired)
│   ├── Conflict            409: not possible in the job's state, or an idempotency clash
│   ├── InvalidInput        422: unknown task, or input failing the task's model
│   └── RateLimited         429
├── ServerUnavailable       cannot reach the server, or it keeps failing (5xx), after retries
└── WaitTimeout             ``wait(timeout=...)`` ran out (also a ``TimeoutError``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


class StepstreamError(Exception):
    """Base class of every error this client raises."""


class APIError(StepstreamError):
    """The server refused a request; ``code``, ``message`` and ``details`` are its own words."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


class BadRequest(APIError):
    pass


class Unauthorized(APIError):
    pass


class NotFound(APIError):
    pass


class Conflict(APIError):
    """E.g. cancelling a finished job; ``state`` is the job's state when the server says it."""

    @property
    def state(self) -> str | None:
        if isinstance(self.details, dict):
            value = self.details.get("state")
            return value if isinstance(value, str) else None
        return None


@dataclass(frozen=True)
class FieldError:
    """One field that failed validation: ``loc`` is its path, e.g. ``("roles", 0, "count")``."""

    loc: tuple[str | int, ...]
    msg: str
    type: str = ""

    @property
    def field(self) -> str:
        return ".".join(str(part) for part in self.loc) or "(input)"

    def __str__(self) -> str:
        return f"{self.field}: {self.msg}"


class InvalidInput(APIError):
    """422: ``field_errors`` names each bad field; ``known_tasks`` lists tasks for a bad name."""

    @property
    def field_errors(self) -> list[FieldError]:
        if not isinstance(self.details, list):
            return []
        errors: list[FieldError] = []
        for item in self.details:
            if isinstance(item, dict):
                loc = item.get("loc") or []
                errors.append(
                    FieldError(
                        tuple(loc) if isinstance(loc, list) else (str(loc),),
                        str(item.get("msg", "")),
                        str(item.get("type", "")),
                    )
                )
        return errors

    @property
    def known_tasks(self) -> list[str]:
        if isinstance(self.details, dict):
            known = self.details.get("known_tasks")
            if isinstance(known, list):
                return [str(name) for name in known]
        return []

    def __str__(self) -> str:
        parts = [self.message]
        parts.extend(f"  {error}" for error in self.field_errors)
        if self.known_tasks:
            parts.append(f"  known tasks: {', '.join(self.known_tasks)}")
        return "\n".join(parts)


class RateLimited(APIError):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, code, message, details)
        self.retry_after = retry_after


class ServerUnavailable(StepstreamError):
    """The server could not be reached, or kept answering 5xx, after the client's retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class WaitTimeout(StepstreamError, TimeoutError):
    """``wait(job_id, timeout=...)`` ran out before the job finished; the job goes on."""


_ERROR_CLASSES: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: BadRequest,
    422: InvalidInput,
    429: RateLimited,
}


def error_from_response(response: httpx.Response) -> StepstreamError:
    """The exception for an error response (its body must have been read)."""
    status = response.status_code
    code, message, details = f"http_{status}", "", None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = str(error.get("code") or code)
        message = str(error.get("message") or "")
        details = error.get("details")
    if not message:
        text = response.text.strip()[:200]
        message = f"HTTP {status} {response.reason_phrase}" + (f": {text}" if text else "")
    if status >= 500:
        return ServerUnavailable(f"the server failed ({status}): {message}", status)
    error_class = _ERROR_CLASSES.get(status, APIError)
    if error_class is RateLimited:
        return RateLimited(status, code, message, details, retry_after(response))
    return error_class(status, code, message, details)


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return float(value)
    except ValueError:
        return None
