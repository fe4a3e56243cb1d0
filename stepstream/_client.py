"""The synchronous client."""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import httpx
from httpx_sse import EventSource

from stepstream._base import (
    ClientConfig,
    RequestSpec,
    RetryableStatus,
    answer_request,
    answer_retry_delay,
    check_event_stream,
    check_response,
    job_path,
    list_request,
    make_config,
    parse_job,
    parse_page,
    parse_tasks,
    parse_token,
    retry_delay,
    shared_tls,
    should_retry,
    stream_error,
    submit_request,
    token_request,
    unreachable,
)
from stepstream._exceptions import WaitTimeout
from stepstream._models import (
    Event,
    Job,
    JobPage,
    JobState,
    SnapshotEvent,
    StreamToken,
    TaskInfo,
)
from stepstream._sse import Reconnector, StreamFollower


class Client:
    """A Stepstream server, seen from a script.

    ``base_url`` defaults to ``$STEPSTREAM_URL``, then ``http://127.0.0.1:8000``; ``api_key``
    (default ``$STEPSTREAM_API_KEY``) is sent as ``Authorization: Bearer``. ``timeout`` bounds
    each request; plain requests are tried ``retries`` more times when the server cannot be
    reached; a live stream that drops is resumed for up to ``reconnect_timeout`` seconds.
    Use it as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 10.0,
        *,
        retries: int = 2,
        reconnect_timeout: float = 60.0,
        stream_read_timeout: float = 45.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._config: ClientConfig = make_config(
            base_url, api_key, timeout, retries, reconnect_timeout, stream_read_timeout
        )
        self._http = httpx.Client(
            base_url=self._config.base_url,
            headers=self._config.headers,
            timeout=self._config.request_timeout,
            verify=shared_tls(),
            transport=transport,
        )

    @property
    def base_url(self) -> str:
        return self._config.base_url

    # -- jobs ------------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        input: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        subject: str | None = None,
        callback_url: str | None = None,
        delay: float | None = None,
        run_at: datetime | str | None = None,
        budget: float | None = None,
    ) -> Job:
        """Start a job; returns its record at once: ``queued``, or ``scheduled`` with a
        ``delay`` in seconds or a ``run_at`` time (an aware datetime or RFC 3339 text; one of
        the two). ``subject`` names the end user it belongs to (listings filter by it; subject
        tokens see it). ``callback_url`` gets the job's terminal event POSTed, signed
        (docs/deploy.md, "Webhooks"). ``budget`` caps what the job may spend on LLM calls."""
        spec = submit_request(
            task,
            input,
            idempotency_key,
            subject,
            callback_url,
            delay=delay,
            run_at=run_at,
            budget=budget,
        )
        return parse_job(self._send(spec))

    def get(self, job_id: str) -> Job:
        return parse_job(self._send(RequestSpec("GET", job_path(job_id))))

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job. A running one stops at its next event: the record
        says ``cancel_requested`` until the ``cancelled`` event arrives."""
        return parse_job(
            self._send(RequestSpec("POST", job_path(job_id, "/cancel"), idempotent=False))
        )

    def retry(self, job_id: str) -> Job:
        """Run a failed or cancelled job again (same id, a fresh budget of attempts)."""
        return parse_job(
            self._send(RequestSpec("POST", job_path(job_id, "/retry"), idempotent=False))
        )

    def answer(self, job_id: str, name: str, value: Any) -> Job:
        """Give the input ``name`` a waiting job asks for (its ``waiting_for``): a dict, or a
        pydantic model, fitting the request's schema. The job is queued again and resumes.
        ``InvalidInput`` (422) names the fields that do not fit; ``Conflict`` (409) when the
        job does not wait for ``name``, or it was answered already (the first answer stays)."""
        return parse_job(self._send(answer_request(job_id, name, value)))

    def stream_token(
        self, job_id: str | None = None, *, subject: str | None = None, may_answer: bool = False
    ) -> StreamToken:
        """A short-lived, read-only token to hand to a browser (``?token=``): for one job, for
        the jobs of one ``subject``, or (neither) for all of this key's jobs. A job's token
        minted with ``may_answer`` may also answer the job's input."""
        return parse_token(self._send(token_request(job_id, subject, may_answer)))

    def list(
        self,
        *,
        status: str | JobState | Iterable[str | JobState] | None = None,
        task: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        subject: str | None = None,
        parent: str | None = None,
    ) -> JobPage:
        """One page of jobs, newest first; ``status`` may list several states. ``parent``: a
        job's children instead, in the order it started them."""
        return parse_page(self._send(list_request(status, task, limit, cursor, subject, parent)))

    def iter_jobs(
        self,
        *,
        status: str | JobState | Iterable[str | JobState] | None = None,
        task: str | None = None,
        page_size: int | None = None,
        subject: str | None = None,
        parent: str | None = None,
    ) -> Iterator[Job]:
        """Every job that matches, newest first (a ``parent``'s children: in the order it
        started them), fetching pages as it goes."""
        statuses = status if isinstance(status, str) or status is None else builtins.list(status)
        cursor: str | None = None
        while True:
            page = self.list(
                status=statuses,
                task=task,
                limit=page_size,
                cursor=cursor,
                subject=subject,
                parent=parent,
            )
            yield from page.jobs
            if not page.next_cursor or not page.jobs:
                return
            cursor = page.next_cursor

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Follow the job's stream until it ends; returns the final record.

        Raises ``WaitTimeout`` after ``timeout`` seconds (the job goes on running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self._follow(
            StreamFollower(job_path(job_id, "/events"), None, ends_at_terminal=True), deadline
        ):
            if isinstance(event, SnapshotEvent) and event.job.finished:
                return event.job
        # The stream ended at a terminal event (or a 204): the record is final now.
        return self.get(job_id)

    def tasks(self) -> builtins.list[TaskInfo]:
        """The tasks the server runs, with their steps and input schemas."""
        return parse_tasks(self._send(RequestSpec("GET", "/api/tasks")))

    # -- streams ---------------------------------------------------------------------------

    def events(self, job_id: str, after: str | None = None) -> Iterator[Event]:
        """The job's events, live, ending after its terminal event.

        Without ``after`` the first event is a ``SnapshotEvent`` (the record now); with
        ``after="0"`` the whole log; with an event id, exactly the events after it. A dropped
        connection or a server restart is resumed from the last event id.
        """
        follower = StreamFollower(job_path(job_id, "/events"), after, ends_at_terminal=True)
        return self._follow(follower, None)

    def events_all(self, after: str | None = None) -> Iterator[Event]:
        """Every job's events (the firehose), live and endless; resumes like ``events``.

        Its ids are firehose ids (each event's id in its job's log is ``event_id``). A
        ``ResetEvent`` means events were missed: refetch ``list()``.
        """
        return self._follow(StreamFollower("/api/events", after, ends_at_terminal=False), None)

    def _follow(self, follower: StreamFollower, deadline: float | None) -> Iterator[Event]:
        reconnector = Reconnector(self._config.retries, self._config.reconnect_timeout)
        while not follower.finished:
            read_timeout: float | None = None
            if deadline is not None:
                read_timeout = deadline - time.monotonic()
                if read_timeout <= 0:
                    raise _wait_timeout(follower)
                read_timeout = min(read_timeout, self._config.stream_read_timeout)
            opened = False
            try:
                with self._http.stream(
                    "GET",
                    follower.path,
                    headers={**follower.request_headers(), "Accept": "text/event-stream"},
                    timeout=self._config.stream_timeout(read_timeout),
                ) as response:
                    if response.status_code == 204:
                        follower.no_content()
                        return
                    if response.status_code >= 400:
                        response.read()
                        raise stream_error(response)
                    check_event_stream(response)
                    reconnector.opened()
                    follower.connection_opened()
                    opened = True
                    for sse in EventSource(response).iter_sse():
                        event = follower.accept(sse)
                        if event is not None:
                            yield event
                        if follower.finished:
                            return
                        if deadline is not None and time.monotonic() > deadline:
                            raise _wait_timeout(follower)
                delay = reconnector.dropped(follower)
            except (httpx.TransportError, RetryableStatus) as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise _wait_timeout(follower) from None
                if opened:  # it broke mid-stream (server gone, read timeout): resume
                    delay = reconnector.dropped(follower)
                elif isinstance(exc, RetryableStatus):
                    delay = reconnector.failed(
                        follower, str(exc), exc.error, retry_after=exc.retry_after
                    )
                else:
                    delay = reconnector.failed(follower, str(unreachable(self._config, exc)))
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(delay)

    # -- plumbing --------------------------------------------------------------------------

    def _send(self, spec: RequestSpec) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(spec.method, spec.path, **spec.kwargs())
            except httpx.TransportError as exc:
                if attempt <= self._config.retries and should_retry(spec, exc):
                    time.sleep(retry_delay(attempt))
                    continue
                raise unreachable(self._config, exc) from exc
            delay = answer_retry_delay(spec, response, attempt)
            if attempt <= self._config.retries and delay is not None:
                time.sleep(delay)
                continue
            check_response(response)
            return response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _wait_timeout(follower: StreamFollower) -> WaitTimeout:
    return WaitTimeout(f"{follower.path} had not ended in time (last event {follower.cursor})")
