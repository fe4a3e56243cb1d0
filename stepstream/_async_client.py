"""The asynchronous client: the same API as ``Client``, awaited (asyncio or trio)."""

from __future__ import annotations

import builtins
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import aclosing
from datetime import datetime
from typing import Any

import anyio
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


class AsyncClient:
    """A Stepstream server, seen from async code; see ``Client`` for the parameters.

    Use ``async with AsyncClient() as client:``, or call ``await client.aclose()``. Close the
    iterators of ``events()`` you leave early with ``contextlib.aclosing``.
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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._config: ClientConfig = make_config(
            base_url, api_key, timeout, retries, reconnect_timeout, stream_read_timeout
        )
        self._http = httpx.AsyncClient(
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

    async def submit(
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
        return parse_job(await self._send(spec))

    async def get(self, job_id: str) -> Job:
        return parse_job(await self._send(RequestSpec("GET", job_path(job_id))))

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (see ``Client.cancel``)."""
        spec = RequestSpec("POST", job_path(job_id, "/cancel"), idempotent=False)
        return parse_job(await self._send(spec))

    async def retry(self, job_id: str) -> Job:
        """Run a failed or cancelled job again."""
        spec = RequestSpec("POST", job_path(job_id, "/retry"), idempotent=False)
        return parse_job(await self._send(spec))

    async def answer(self, job_id: str, name: str, value: Any) -> Job:
        """Give the input ``name`` a waiting job asks for (see ``Client.answer``)."""
        return parse_job(await self._send(answer_request(job_id, name, value)))

    async def stream_token(
        self, job_id: str | None = None, *, subject: str | None = None, may_answer: bool = False
    ) -> StreamToken:
        """A short-lived, read-only token to hand to a browser (``?token=``): for one job, for
        the jobs of one ``subject``, or (neither) for all of this key's jobs. A job's token
        minted with ``may_answer`` may also answer the job's input."""
        return parse_token(await self._send(token_request(job_id, subject, may_answer)))

    async def list(
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
        return parse_page(
            await self._send(list_request(status, task, limit, cursor, subject, parent))
        )

    async def iter_jobs(
        self,
        *,
        status: str | JobState | Iterable[str | JobState] | None = None,
        task: str | None = None,
        page_size: int | None = None,
        subject: str | None = None,
        parent: str | None = None,
    ) -> AsyncIterator[Job]:
        """Every job that matches, newest first (a ``parent``'s children: in the order it
        started them), fetching pages as it goes."""
        statuses = status if isinstance(status, str) or status is None else builtins.list(status)
        cursor: str | None = None
        while True:
            page = await self.list(
                status=statuses,
                task=task,
                limit=page_size,
                cursor=cursor,
                subject=subject,
                parent=parent,
            )
            for job in page.jobs:
                yield job
            if not page.next_cursor or not page.jobs:
                return
            cursor = page.next_cursor

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Follow the job's stream until it ends; returns the final record.

        Raises ``WaitTimeout`` after ``timeout`` seconds (the job goes on running).
        """
        try:
            with anyio.fail_after(timeout):
                async with aclosing(self.events(job_id)) as events:
                    async for event in events:
                        if isinstance(event, SnapshotEvent) and event.job.finished:
                            return event.job
                return await self.get(job_id)
        except TimeoutError:
            raise WaitTimeout(f"job {job_id} had not finished after {timeout:g}s") from None

    async def tasks(self) -> builtins.list[TaskInfo]:
        """The tasks the server runs, with their steps and input schemas."""
        return parse_tasks(await self._send(RequestSpec("GET", "/api/tasks")))

    # -- streams ---------------------------------------------------------------------------

    def events(self, job_id: str, after: str | None = None) -> AsyncGenerator[Event, None]:
        """The job's events, live, ending after its terminal event (see ``Client.events``)."""
        follower = StreamFollower(job_path(job_id, "/events"), after, ends_at_terminal=True)
        return self._follow(follower)

    def events_all(self, after: str | None = None) -> AsyncGenerator[Event, None]:
        """Every job's events (the firehose), live and endless (see ``Client.events_all``)."""
        return self._follow(StreamFollower("/api/events", after, ends_at_terminal=False))

    async def _follow(self, follower: StreamFollower) -> AsyncGenerator[Event, None]:
        reconnector = Reconnector(self._config.retries, self._config.reconnect_timeout)
        while not follower.finished:
            opened = False
            try:
                async with self._http.stream(
                    "GET",
                    follower.path,
                    headers={**follower.request_headers(), "Accept": "text/event-stream"},
                    timeout=self._config.stream_timeout(),
                ) as response:
                    if response.status_code == 204:
                        follower.no_content()
                        return
                    if response.status_code >= 400:
                        await response.aread()
                        raise stream_error(response)
                    check_event_stream(response)
                    reconnector.opened()
                    follower.connection_opened()
                    opened = True
                    async with aclosing(EventSource(response).aiter_sse()) as frames:
                        async for sse in frames:
                            event = follower.accept(sse)
                            if event is not None:
                                yield event
                            if follower.finished:
                                return
                delay = reconnector.dropped(follower)
            except (httpx.TransportError, RetryableStatus) as exc:
                if opened:  # it broke mid-stream (server gone, read timeout): resume
                    delay = reconnector.dropped(follower)
                elif isinstance(exc, RetryableStatus):
                    delay = reconnector.failed(
                        follower, str(exc), exc.error, retry_after=exc.retry_after
                    )
                else:
                    delay = reconnector.failed(follower, str(unreachable(self._config, exc)))
            await anyio.sleep(delay)

    # -- plumbing --------------------------------------------------------------------------

    async def _send(self, spec: RequestSpec) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(spec.method, spec.path, **spec.kwargs())
            except httpx.TransportError as exc:
                if attempt <= self._config.retries and should_retry(spec, exc):
                    await anyio.sleep(retry_delay(attempt))
                    continue
                raise unreachable(self._config, exc) from exc
            delay = answer_retry_delay(spec, response, attempt)
            if attempt <= self._config.retries and delay is not None:
                await anyio.sleep(delay)
                continue
            check_response(response)
            return response

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
