"""The submit body's optional fields beside ``task`` and ``input`` (docs/ai-workloads.md):
``budget`` (the most the job may spend on LLM calls), ``run_at`` (RFC 3339) or ``delay``
(seconds) to schedule it, ``subject`` (the end user the job belongs to, server/subjects.py),
and ``callback_url``, where its terminal event is POSTed (docs/deploy.md, "Webhooks")."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from stepstream.server.api_errors import ApiError
from stepstream.server.subjects import subject_field
from stepstream.tasks import destinations, tracing
from stepstream.tasks.creation import NewJob
from stepstream.tasks.models import new_job_id
from stepstream.tasks.registry import TaskSpec
from stepstream.tasks.settings import Settings

RESOLVE_TIMEOUT_SECONDS = 5.0  # a callback_url's host, at submit time
SUBMIT_FIELDS = frozenset({"task", "input", "budget", "run_at", "delay", "subject", "callback_url"})


@dataclass(frozen=True)
class SubmitOptions:
    budget: float | None = None
    run_at: datetime | None = None  # UTC; None = now
    delay: float | None = None  # as given: the same request sent again has the same fingerprint
    subject: str | None = None
    callback_url: str | None = None

    @property
    def run_at_text(self) -> str | None:
        if self.run_at is None:
            return None
        return self.run_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def new_job(
        self,
        spec: TaskSpec,
        raw_input: dict[str, Any],
        owner: str | None,
        *,
        job_id: str | None = None,
        trace_parent: tracing.Carrier | None = None,
    ) -> NewJob:
        """The job a submission with these options asks for (tasks/creation.py); ``job_id``:
        its id, if already chosen (an Idempotency-Key's claim); ``trace_parent``: the
        submitter's trace."""
        return NewJob(
            spec,
            raw_input,
            owner=owner,
            run_at=self.run_at,
            budget=self.budget,
            callback_url=self.callback_url,
            subject=self.subject,
            id=new_job_id() if job_id is None else job_id,
            trace_parent=trace_parent,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What an Idempotency-Key's body fingerprint adds (nothing when no option is set, so
        fingerprints of plain submissions do not change)."""
        extra: dict[str, Any] = {}
        if self.budget is not None:
            extra["budget"] = self.budget
        if self.delay is not None:
            # Not run_at: a client resending the same request later is the same request.
            extra["delay"] = self.delay
        elif self.run_at is not None:
            extra["run_at"] = self.run_at_text
        if self.subject is not None:
            extra["subject"] = self.subject
        if self.callback_url is not None:
            extra["callback_url"] = self.callback_url
        return extra


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None


def parse_submit_options(body: dict[str, Any], settings: Settings) -> SubmitOptions:
    subject = subject_field(body)
    budget = None
    if body.get("budget") is not None:
        budget = _number(body["budget"])
        if budget is None or budget < 0:
            raise ApiError(422, "invalid_body", "`budget` must be a number of at least 0")
    run_at = None
    delay = None
    if body.get("run_at") is not None and body.get("delay") is not None:
        raise ApiError(422, "invalid_body", "give `run_at` or `delay`, not both")
    now = datetime.now(UTC)
    if body.get("delay") is not None:
        delay = _number(body["delay"])
        if delay is None or delay < 0 or delay > settings.max_delay_seconds:
            raise ApiError(
                422,
                "invalid_body",
                f"`delay` must be a number of seconds from 0 to {settings.max_delay_seconds}",
                {"limit": settings.max_delay_seconds},
            )
        run_at = now + timedelta(seconds=delay) if delay > 0 else None
    elif body.get("run_at") is not None:
        raw = body["run_at"]
        try:
            if not isinstance(raw, str) or "T" not in raw.upper():
                raise ValueError(raw)
            when = datetime.fromisoformat(raw.replace("z", "Z"))
            if when.tzinfo is not None:
                when = when.astimezone(UTC)  # year 1 at +01:00 overflows here
        except (ValueError, OverflowError):
            raise ApiError(
                422,
                "invalid_body",
                "`run_at` must be an RFC 3339 time with a zone, e.g. 2030-01-01T09:00:00Z",
            ) from None
        if when.tzinfo is None:
            raise ApiError(422, "invalid_body", "`run_at` needs a zone (Z or +hh:mm)")
        if when - now > timedelta(seconds=settings.max_delay_seconds):
            raise ApiError(
                422,
                "invalid_body",
                f"`run_at` is more than {settings.max_delay_seconds} seconds away",
                {"limit": settings.max_delay_seconds},
            )
        run_at = when if when > now else None  # a time in the past means "now"
    callback_url = None
    if body.get("callback_url") is not None:
        callback_url = body["callback_url"]
        try:
            destinations.parse_url(callback_url)
        except destinations.Refused as exc:
            raise callback_refused(exc) from None
    return SubmitOptions(
        budget=budget, run_at=run_at, delay=delay, subject=subject, callback_url=callback_url
    )


async def check_callback_url(
    options: SubmitOptions, settings: Settings, *, production: bool
) -> None:
    """Refuse (422) a ``callback_url`` whose host is not one webhooks may reach, now: its
    address, or what its name resolves to (tasks/destinations.py); and any, in production
    without a webhook secret (nothing would sign it)."""
    if options.callback_url is not None:
        off = settings.callbacks_refused(production)
        if off is not None:
            raise callback_refused(destinations.Refused(off))
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
                await destinations.Policy.from_settings(settings).check(options.callback_url)
        except destinations.Refused as exc:
            raise callback_refused(exc) from None
        except TimeoutError:
            raise callback_refused(
                destinations.Refused(f"host did not resolve within {RESOLVE_TIMEOUT_SECONDS:g}s")
            ) from None


def callback_refused(exc: destinations.Refused) -> ApiError:
    return ApiError(
        422,
        "invalid_callback_url",
        f"`callback_url` {exc}",
        {"field": "callback_url", "reason": str(exc)},
    )
