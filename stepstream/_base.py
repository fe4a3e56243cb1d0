"""What the sync and the async client share: configuration, requests, responses, retries."""

from __future__ import annotations

import functools
import os
import ssl
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from stepstream._backoff import Backoff
from stepstream._exceptions import (
    RateLimited,
    ServerUnavailable,
    StepstreamError,
    error_from_response,
    retry_after,
)
from stepstream._models import Job, JobPage, JobState, StreamToken, TaskInfo

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "STEPSTREAM_URL"
API_KEY_ENV = "STEPSTREAM_API_KEY"
USER_AGENT = "stepstream-python/0.1"
# 502-504 are what a proxy says while the app restarts: worth another try. A 500 is a bug.
RETRY_STATUSES = frozenset({502, 503, 504})
MAX_RATE_LIMIT_WAIT = 2.0  # seconds: a longer Retry-After on a 429 is raised as RateLimited


@functools.cache
def shared_tls() -> ssl.SSLContext:
    """The TLS context of every client in this process.

    httpx builds one per client by default, loading the CA bundle: about 40 ms of CPU. A backend
    that makes a client for each request it serves would spend that on every request. Built on
    first use, so ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are read then, once."""
    return httpx.create_ssl_context()


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    headers: dict[str, str]
    timeout: float
    retries: int
    reconnect_timeout: float
    stream_read_timeout: float

    @property
    def request_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout)

    def stream_timeout(self, read: float | None = None) -> httpx.Timeout:
        # The server sends a heartbeat at least every 15 s: a read that waits much longer than
        # that is a dead connection (a half-open socket, a frozen proxy), so reconnect.
        return httpx.Timeout(self.timeout, read=read or self.stream_read_timeout)


def make_config(
    base_url: str | None,
    api_key: str | None,
    timeout: float,
    retries: int,
    reconnect_timeout: float,
    stream_read_timeout: float,
) -> ClientConfig:
    url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return ClientConfig(url, headers, timeout, retries, reconnect_timeout, stream_read_timeout)


@dataclass(frozen=True)
class RequestSpec:
    """One API call, before it is sent: the same for the sync and the async client."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    # Safe to send twice: reads, and submits that carry an idempotency key.
    idempotent: bool = True

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"params": self.params, "headers": self.headers}
        if self.json is not None:
            kwargs["json"] = self.json
        return kwargs


def job_path(job_id: str, suffix: str = "") -> str:
    if not job_id:
        raise ValueError("a job id is required")
    return f"/api/jobs/{quote(job_id, safe='')}{suffix}"


def submit_request(
    task: str,
    input: dict[str, Any] | None,
    idempotency_key: str | None,
    subject: str | None = None,
    callback_url: str | None = None,
    *,
    delay: float | None = None,
    run_at: datetime | str | None = None,
    budget: float | None = None,
) -> RequestSpec:
    if delay is not None and run_at is not None:
        raise ValueError("give run_at or delay, not both")
    if isinstance(run_at, datetime):
        if run_at.tzinfo is None:
            # The server refuses a time without a zone; a naive datetime's zone is a guess.
            raise ValueError("run_at needs a timezone, e.g. datetime(..., tzinfo=UTC)")
        run_at = run_at.isoformat()
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    headers.update(trace_headers())
    body: dict[str, Any] = {"task": task, "input": input or {}}
    optional = {
        "subject": subject,
        "callback_url": callback_url,
        "delay": delay,
        "run_at": run_at,
        "budget": budget,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    return RequestSpec(
        "POST",
        "/api/jobs",
        json=body,
        headers=headers,
        idempotent=idempotency_key is not None,
    )


def trace_headers() -> dict[str, str]:
    """The caller's current trace context as headers (W3C ``traceparent``...), so the job
    continues the caller's trace. Only for an application that already uses OpenTelemetry:
    the client never imports it itself."""
    if "opentelemetry.trace" not in sys.modules:
        return {}
    try:
        from opentelemetry import propagate
    except ImportError:  # a partial install: no trace rather than no submit
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # the application's propagators, as its own requests use
    return carrier


def list_request(
    status: str | JobState | Iterable[str | JobState] | None,
    task: str | None,
    limit: int | None,
    cursor: str | None,
    subject: str | None = None,
    parent: str | None = None,
) -> RequestSpec:
    params: dict[str, str] = {}
    if subject:
        params["subject"] = subject
    if parent:
        params["parent"] = parent
    if status is not None:
        if isinstance(status, str):  # JobState is a str too
            params["status"] = str(status)
        else:
            params["status"] = ",".join(str(s) for s in status)
    if task:
        params["task"] = task
    if limit is not None:
        params["limit"] = str(limit)
    if cursor:
        params["cursor"] = cursor
    return RequestSpec("GET", "/api/jobs", params=params)


class RetryableStatus(Exception):
    """A 5xx or 429 while (re)connecting a stream: try again, as after a refused connection.

    ``error`` is what to raise when the client gives up; ``retry_after`` the server's hint.
    """

    def __init__(self, error: StepstreamError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def stream_error(response: httpx.Response) -> StepstreamError | RetryableStatus:
    """What an error answer to a stream request means: retry later, or raise."""
    error = error_from_response(response)
    if isinstance(error, ServerUnavailable):
        return RetryableStatus(error)
    if isinstance(error, RateLimited):
        # Too many open streams: typically our own previous connection, not yet noticed
        # closed by the server. It goes away; so does the 429.
        return RetryableStatus(error, error.retry_after)
    return error


def should_retry(spec: RequestSpec, error: Exception) -> bool:
    """Whether to send ``spec`` again after a transport error."""
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return True  # nothing was sent: always safe
    return spec.idempotent and isinstance(error, httpx.TransportError)


def answer_retry_delay(spec: RequestSpec, response: httpx.Response, attempt: int) -> float | None:
    """How long to wait before sending ``spec`` again after ``response``; None: do not."""
    if response.status_code == 429:
        # A refused request changed nothing on the server, so even a submit without an
        # idempotency key is safe to repeat. A short wait (the per-second submission limit) is
        # waited out; a long one (too many unfinished jobs) is the caller's decision.
        hint = retry_after(response)
        delay = retry_delay(attempt) if hint is None else hint
        return delay if delay <= MAX_RATE_LIMIT_WAIT else None
    if spec.idempotent and response.status_code in RETRY_STATUSES:
        return retry_delay(attempt)
    return None


def retry_delay(attempt: int) -> float:
    """The pause before retry number ``attempt`` (1, 2, ...) of a plain request."""
    return Backoff(0.25, 2.0, jitter=0.0).delay(attempt)


def unreachable(config: ClientConfig, error: Exception) -> ServerUnavailable:
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return ServerUnavailable(f"cannot connect to {config.base_url} ({error})")
    if isinstance(error, httpx.TimeoutException):
        return ServerUnavailable(f"{config.base_url} did not answer in time ({error!r})")
    return ServerUnavailable(f"the connection to {config.base_url} failed ({error!r})")


def check_response(response: httpx.Response) -> None:
    """Raise the client's exception for an error status (the body must have been read)."""
    if response.status_code >= 400:
        raise error_from_response(response)


def parse_job(response: httpx.Response) -> Job:
    check_response(response)
    return Job.model_validate(_json(response))


def token_request(job_id: str | None, subject: str | None, may_answer: bool = False) -> RequestSpec:
    if job_id is not None and subject is not None:
        raise ValueError("a token is for one job or for one subject, not both")
    if may_answer and job_id is None:
        raise ValueError("only a job's token may answer its input")
    if job_id is not None:
        # Minting twice is harmless.
        answering = {"may_answer": True} if may_answer else None
        return RequestSpec("POST", job_path(job_id, "/token"), json=answering)
    body = {"subject": subject} if subject is not None else None
    return RequestSpec("POST", "/api/events/token", json=body)


def answer_request(job_id: str, name: str, value: Any) -> RequestSpec:
    """``POST /api/jobs/{id}/input``. Not sent twice: a second answer is refused (409), so a
    reply lost on the way would turn a success into an error."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return RequestSpec(
        "POST", job_path(job_id, "/input"), json={"name": name, "value": value}, idempotent=False
    )


def parse_token(response: httpx.Response) -> StreamToken:
    check_response(response)
    return StreamToken.model_validate(_json(response))


def parse_page(response: httpx.Response) -> JobPage:
    check_response(response)
    return JobPage.model_validate(_json(response))


def parse_tasks(response: httpx.Response) -> list[TaskInfo]:
    check_response(response)
    body = _json(response)
    tasks = body.get("tasks") if isinstance(body, dict) else None
    if not isinstance(tasks, list):
        raise StepstreamError(f"expected {{tasks: [...]}} from {response.request.url}")
    return [TaskInfo.model_validate(task) for task in tasks]


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise StepstreamError(
            f"expected JSON from {response.request.url}, got {response.text[:200]!r}"
        ) from None


def check_event_stream(response: httpx.Response) -> None:
    content_type = response.headers.get("content-type", "")
    if "text/event-stream" not in content_type:
        raise StepstreamError(
            f"expected an event stream from {response.request.url}, got {content_type!r}"
        )
