"""The job endpoints: submit, read, list, cancel, retry; and the task catalogue."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stepstream.server import bodies
from stepstream.server.api_errors import ApiError
from stepstream.server.auth import FIREHOSE_SCOPE, Principal, job_scope, subject_scope
from stepstream.server.bodies import json_response
from stepstream.server.options import (
    SUBMIT_FIELDS,
    check_callback_url,
    parse_submit_options,
)
from stepstream.server.state import AppState
from stepstream.server.streams import shared_record
from stepstream.server.subjects import subject_field, subject_param
from stepstream.server.urls import root_path
from stepstream.tasks import cancellation, creation, idempotency, rollup, tracing
from stepstream.tasks.models import JobRecord, JobState
from stepstream.tasks.registry import TaskSpec
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import Appended

logger = logging.getLogger("stepstream.web")

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def is_json_type(content_type: str) -> bool:
    """``application/json`` or a ``+json`` type (``application/merge-patch+json``), with any
    parameters (``; charset=utf-8``)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = media_type.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _unsupported_type(content_type: str | None) -> ApiError:
    # Only JSON: a form or text/plain POST is a CORS "simple request", sent cross-origin
    # without a preflight; a JSON body never is.
    given = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    return ApiError(
        415,
        "unsupported_media_type",
        f"the body must be JSON, sent as Content-Type application/json (got {given})",
        {"expected": "application/json", "given": content_type},
    )


async def read_json(request: Request, max_bytes: int, *, optional: bool = False) -> Any:
    """The body as JSON (415 unless its Content-Type is JSON, 400 if it is not JSON, 413 past
    ``max_bytes``); ``optional``: an empty body, sent with no Content-Type, is ``{}``."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json_type(content_type):
        raise _unsupported_type(content_type)
    if content_type is None and not optional:
        raise _unsupported_type(None)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise _too_large(max_bytes)
    body = bytearray()
    settings: Settings = request.app.state.stepstream.settings
    try:
        # A body dripped in a byte at a time would otherwise hold the connection for ever.
        async with asyncio.timeout(settings.body_timeout_seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise _too_large(max_bytes)
    except TimeoutError:
        raise ApiError(
            408,
            "body_timeout",
            f"the body did not arrive within {settings.body_timeout_seconds:g} seconds",
            headers={"Connection": "close"},
        ) from None
    if optional and not body.strip():
        return {}
    if content_type is None:  # a body, and nothing says it is JSON
        raise _unsupported_type(None)
    try:
        value = json.loads(body)
        # JSON's \uXXXX escapes can spell half a surrogate pair, which is not text: stored, it
        # would break every later response that carries it. Raw UTF-8 cannot, so only a body
        # with such an escape needs the full check.
        if _SURROGATE_ESCAPE.search(body):
            json.dumps(value, ensure_ascii=False).encode()
        return value
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    except UnicodeEncodeError:
        raise ApiError(
            400, "malformed_json", "the body has a lone UTF-16 surrogate escape (e.g. \\ud800)"
        ) from None
    except RecursionError:
        raise ApiError(400, "malformed_json", "the body is nested too deeply") from None


def task_named(state: AppState, name: object) -> TaskSpec:
    """The task of the app's registry ``name`` names (422 naming the known tasks otherwise)."""
    if not isinstance(name, str):
        raise ApiError(422, "invalid_body", "`task` must be a string naming a task")
    spec = state.registry.get_task(name)
    if spec is None:
        known = [t.name for t in state.registry.tasks()]
        raise ApiError(422, "unknown_task", f"no task named {name!r}", {"known_tasks": known})
    return spec


async def read_object(
    request: Request,
    state: AppState,
    fields: frozenset[str],
    shape: str,
    *,
    optional: bool = False,
) -> dict[str, Any]:
    """The body as a JSON object with only ``fields`` (422 otherwise, naming the strays)."""
    body = await read_json(request, state.settings.max_body_bytes, optional=optional)
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_body", f"the body must be a JSON object {shape}")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ApiError(
            422, "invalid_body", f"unknown field(s): {', '.join(unknown)}", {"fields": unknown}
        )
    return body


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413, "body_too_large", f"the body is larger than {max_bytes} bytes", {"limit": max_bytes}
    )


async def submit_job(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    principal = await state.auth.authenticate(request)
    body = await read_object(request, state, SUBMIT_FIELDS, "{task, input}")
    spec = task_named(state, body.get("task"))
    raw_input = body.get("input", {})
    if not isinstance(raw_input, dict):
        raise ApiError(422, "invalid_input", "`input` must be a JSON object")
    check_input_shape(raw_input, state.settings)
    problems = input_problems(spec, raw_input)
    if problems:
        raise ApiError(
            422, "invalid_input", input_refusal(spec, problems, "the input does not fit"), problems
        )
    options = parse_submit_options(body, state.settings)  # budget, run_at / delay, callback
    await check_callback_url(options, state.settings, production=state.auth.production)

    owner = principal.owner
    idempotency_key = request.headers.get("idempotency-key")
    claim = None
    if idempotency_key is not None:
        claim = await claim_idempotency_key(
            state, owner, idempotency_key, spec.name, raw_input, options.fingerprint()
        )
        if claim.existing is not None:
            return accepted(request, state, principal, claim.existing, 200)
    job = options.new_job(
        spec,
        raw_input,
        owner,
        job_id=None if claim is None else claim.job_id,
        # The submitter's trace, if its request carried one: the job's trace continues it.
        trace_parent=tracing.incoming(request.headers),
    )
    try:
        # The owner's submissions per second are counted by the create itself: no round trip
        # of their own (batches count theirs apart: enforce_submission_limits).
        created = await creation.create(
            state.store,
            state.arq,
            job,
            claim=claim,
            rate=(state.settings.submissions_per_second, int(state.clock())),
        )
        record = check_created(state, created, 1)
    except ApiError:
        # Refused (a limit): no job was made, so the client's retry may make it at once.
        if claim is not None:
            await idempotency.release(state.store, claim)
        raise
    logger.info("job submitted", extra=_log_fields(record))
    return accepted(request, state, principal, record, 202)


def input_problems(spec: TaskSpec, raw_input: dict[str, Any]) -> list[dict[str, Any]]:
    """What is wrong with ``raw_input`` for ``spec``, pydantic's errors as the API shows them
    (a field the task does not declare is one, ``extra_forbidden``: ``TaskSpec.check_input``)."""
    try:
        spec.check_input(raw_input)
    except ValidationError as exc:
        return [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_context=False)
        ]
    return []


def input_refusal(spec: TaskSpec, problems: list[dict[str, Any]], what: str) -> str:
    """The message of a 422 ``invalid_input``, naming the fields the task does not declare."""
    unknown = sorted(
        {str(p["loc"][-1]) for p in problems if p.get("type") == "extra_forbidden" and p["loc"]}
    )
    message = f"{what} task {spec.name!r}"
    if unknown:
        message += f": unknown field(s) {', '.join(unknown)}"
    return message


def accepted(
    request: Request, state: AppState, principal: Principal, record: JobRecord, status: int
) -> JSONResponse:
    # EventSource cannot send headers: the answer carries a token for this job's stream.
    token, expires_at = state.auth.issue_token(
        record.owner, job_scope(record.id), key_digest=principal.key_digest
    )
    body = bodies.accepted_json(
        record, root_path(request), stream_token=token, stream_token_expires_at=expires_at
    )
    return bodies.ApiJSONResponse(body, status, headers={"Location": body["links"]["self"]})


def check_input_shape(value: Any, settings: Settings) -> None:
    """Refuse inputs nested too deeply or holding over-long strings, before any model sees them."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > settings.max_input_depth:
            raise ApiError(
                422,
                "input_too_deep",
                f"the input is nested deeper than {settings.max_input_depth} levels",
                {"limit": settings.max_input_depth},
            )
        if isinstance(item, dict):
            for key, child in item.items():
                stack.append((key, depth + 1))
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str) and len(item) > settings.max_string_length:
            raise ApiError(
                422,
                "string_too_long",
                f"a string in the input is longer than {settings.max_string_length} characters",
                {"limit": settings.max_string_length},
            )


async def enforce_submission_limits(state: AppState, owner: str | None) -> None:
    """The owner's submissions per second. (Their unfinished jobs are counted by the create
    itself, which takes its places in the same script: ``unfinished_refusal``.)"""
    submitted = await creation.count_submission(state.store, owner, int(state.clock()))
    if submitted > state.settings.submissions_per_second:
        raise rate_refusal(state.settings)


def rate_refusal(settings: Settings) -> ApiError:
    """429 for a submission past its owner's submissions per second."""
    return ApiError(
        429,
        "rate_limited",
        f"more than {settings.submissions_per_second} submissions in one second",
        {
            "limit": settings.submissions_per_second,
            "setting": "STEPSTREAM_SUBMISSIONS_PER_SECOND",
        },
        headers={"Retry-After": "1"},
    )


def check_created(state: AppState, created: creation.Created, take: int) -> JobRecord:
    """The record ``created`` stored, or what its refusal means: the owner's limits (429), or
    a collision."""
    appended = created.appended
    if appended.refused == "rate":
        raise rate_refusal(state.settings)
    if appended.refused == "limit":
        raise unfinished_refusal(state.settings, appended, take)
    if not appended.ok:  # a 120-bit id collided: not a client mistake, and never expected
        raise RuntimeError(f"job id {created.record.id} exists already")
    return created.record


def unfinished_refusal(settings: Settings, appended: Appended, take: int) -> ApiError:
    """429 for an append that needed ``take`` places under the owner's unfinished-jobs limit
    and did not get them (the store refused it as ``"limit"``: nothing was written)."""
    held = appended.unfinished or 0
    limit = settings.max_unfinished_per_owner
    need = "" if take == 1 else f" and this batch needs {take}, one per input"
    return ApiError(
        429,
        "too_many_unfinished_jobs",
        f"{held} jobs have not finished yet{need}; the limit is {limit} "
        "(STEPSTREAM_MAX_UNFINISHED_PER_OWNER)",
        {
            "limit": limit,
            "setting": "STEPSTREAM_MAX_UNFINISHED_PER_OWNER",
            "unfinished": held,
            "requested": take,
        },
        headers={"Retry-After": "5"},
    )


_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")


async def claim_idempotency_key(
    state: AppState,
    owner: str | None,
    key: str,
    task_name: str,
    raw_input: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> idempotency.Claim:
    """Claim ``key`` for a new job, or find the job an earlier identical request created
    (tasks/idempotency.py); 400 for a key of the wrong form, 409 for a refused one."""
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(
            400,
            "bad_idempotency_key",
            "Idempotency-Key must be 1 to 200 printable ASCII characters without spaces",
        )
    try:
        return await idempotency.claim(state.store, owner, key, task_name, raw_input, extra)
    except idempotency.ClaimRefused as refused:
        if refused.job_id is None:
            raise ApiError(
                409,
                "idempotency_conflict",
                "a request with this Idempotency-Key is still in flight",
            ) from None
        raise ApiError(
            409,
            "idempotency_conflict",
            "this Idempotency-Key was used with a different body",
            {"job_id": refused.job_id},
        ) from None


async def load_job(request: Request, principal: Principal, *, shared: bool = False) -> JobRecord:
    """The job in the path, if the caller may see it: another owner's job is 404, like a
    missing one, so ids cannot be probed. ``shared``: a read of the record already in flight
    may serve (streams connecting together: see ``SharedRead``)."""
    state: AppState = request.app.state.stepstream
    job_id = request.path_params["job_id"]
    record = None
    if JOB_ID.fullmatch(job_id):
        if shared:
            _, record = await shared_record(state.store, job_id, -1)
        else:
            record = await state.store.get(job_id)
    if record is None or not principal.may_read(record.owner, record.id, record.subject):
        raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
    return record


async def reload(state: AppState, record: JobRecord) -> JobRecord:
    return await state.store.get(record.id) or record


async def get_job(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    # A stream token reads the records of the jobs in its scope (server/auth.py).
    principal = await state.auth.authenticate(request, allow_token=True)
    record = await rollup.with_running(state.store, await load_job(request, principal))
    return json_response(bodies.Job.of(record, root_path(request)))


JOB_TOKEN_FIELDS = frozenset({"may_answer"})


async def job_token(request: Request) -> Response:
    """A short-lived token for one job's stream (``?token=``): read-only, or with
    ``{"may_answer": true}`` also allowed to give the job's input (server/answers.py)."""
    state: AppState = request.app.state.stepstream
    principal = await state.auth.authenticate(request)
    record = await load_job(request, principal)
    body = await read_object(request, state, JOB_TOKEN_FIELDS, "{may_answer}", optional=True)
    may_answer = body.get("may_answer", False)
    if not isinstance(may_answer, bool):
        raise ApiError(422, "invalid_body", "`may_answer` must be true or false")
    scope = job_scope(record.id)
    token, expires_at = state.auth.issue_token(
        record.owner, scope, key_digest=principal.key_digest, may_answer=may_answer
    )
    return json_response(
        bodies.JobToken(token=token, expires_at=expires_at, scope=scope, may_answer=may_answer)
    )


TOKEN_FIELDS = frozenset({"subject"})


async def firehose_token(request: Request) -> Response:
    """A short-lived, read-only token for the caller's firehose (``/api/events?token=``): all
    their jobs, or with ``{"subject": s}`` in the body only the jobs submitted for ``s``."""
    state: AppState = request.app.state.stepstream
    principal = await state.auth.authenticate(request)
    body = await read_object(request, state, TOKEN_FIELDS, "{subject}", optional=True)
    subject = subject_field(body)
    scope = FIREHOSE_SCOPE if subject is None else subject_scope(subject)
    token, expires_at = state.auth.issue_token(
        principal.owner, scope, key_digest=principal.key_digest
    )
    return json_response(bodies.Token(token=token, expires_at=expires_at, scope=scope))


def _decode_cursor(raw: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        score, job_id = text.split(":", 1)
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(job_id)
        return float(int(score)), job_id
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "bad_cursor", "`cursor` is not one this server gave out") from None


def _encode_cursor(cursor: tuple[float, str]) -> str:
    text = f"{int(cursor[0])}:{cursor[1]}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def list_jobs(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    principal = await state.auth.authenticate(request)
    params = request.query_params
    states: frozenset[JobState] | None = None
    if params.get("status"):
        names = [s.strip() for s in params["status"].split(",") if s.strip()]
        unknown = [n for n in names if n not in JobState.__members__]
        if unknown:
            raise ApiError(
                400,
                "bad_status",
                f"unknown status {', '.join(unknown)}",
                {"known": [s.value for s in JobState]},
            )
        states = frozenset(JobState(n) for n in names)
    raw_limit = params.get("limit", "50")
    if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6) or not (
        1 <= int(raw_limit) <= state.settings.list_limit_max
    ):
        raise ApiError(
            400,
            "bad_limit",
            f"`limit` must be a whole number from 1 to {state.settings.list_limit_max}",
        )
    subject = subject_param(params)
    cursor = _decode_cursor(params["cursor"]) if params.get("cursor") else None
    parent = params.get("parent") or None
    if parent is not None:
        # A job's (or a batch's) children, in the order they were started; the cursor holds
        # the place in that list.
        if not JOB_ID.fullmatch(parent):
            raise ApiError(400, "bad_parent", "`parent` is not a job id")
        children, offset = await state.store.list_children(
            parent,
            states=states,
            task=params.get("task") or None,
            owner=principal.owner,
            limit=int(raw_limit),
            offset=int(cursor[0]) if cursor else 0,
        )
        return json_response(
            bodies.JobList(
                jobs=[bodies.Job.of(r, root_path(request)) for r in children],
                next_cursor=None if offset is None else _encode_cursor((offset, parent)),
            )
        )
    records, next_cursor = await state.store.list_jobs(
        states=states,
        task=params.get("task") or None,
        owner=principal.owner,
        subject=subject,
        limit=int(raw_limit),
        cursor=cursor,
    )
    return json_response(
        bodies.JobList(
            jobs=[bodies.Job.of(r, root_path(request)) for r in records],
            next_cursor=_encode_cursor(next_cursor) if next_cursor else None,
        )
    )


async def cancel_job(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    record = await load_job(request, await state.auth.authenticate(request))
    if record.state.terminal:
        raise _conflict(record, "cancel")
    if record.batch is not None:  # a batch's parent: cancel its children
        await cancellation.cancel_children(state.store, record)
        cancelling = await reload(state, record)
        return json_response(_cancel_requested(cancelling, root_path(request)), 202)
    # A waiting job's timeout entry finds it cancelled and leaves it so.
    waiting = record.state == JobState.waiting
    appended = await cancellation.cancel_unstarted(
        state.store,
        record,
        "cancelled while waiting for input" if waiting else "cancelled before it started",
    )
    if appended.ok:
        logger.info("job cancelled before it started", extra=_log_fields(record))
        return json_response(bodies.Job.of(await reload(state, record), root_path(request)))
    if appended.refused == '"running"':
        # Only the worker writes a running job's events: raise the flag it watches.
        await state.store.request_cancel(record.id)
        return json_response(_cancel_requested(record, root_path(request)), 202)
    raise _conflict(await reload(state, record), "cancel")


async def retry_job(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    record = await load_job(request, await state.auth.authenticate(request))
    if record.state not in (JobState.failed, JobState.cancelled):
        raise _conflict(record, "retry")
    spec = state.registry.get_task(record.task)
    if spec is None:
        raise ApiError(422, "unknown_task", f"task {record.task!r} is no longer declared")
    appended = await creation.requeue(state.store, state.arq, record, spec)
    if appended.refused == "limit":
        raise unfinished_refusal(state.settings, appended, 1)
    if not appended.ok:
        raise _conflict(await reload(state, record), "retry")
    return json_response(bodies.Job.of(await reload(state, record), root_path(request)), 202)


def _cancel_requested(record: JobRecord, root: str) -> bodies.CancelRequested:
    return bodies.CancelRequested.of(record, root, cancel_requested=True)


def _log_fields(record: JobRecord) -> dict[str, Any]:
    return {"job_id": record.id, "task": record.task, "attempt": record.attempt}


def _conflict(record: JobRecord, action: str) -> ApiError:
    return ApiError(
        409,
        "conflict",
        f"cannot {action} a job that is {record.state.value}",
        {"state": record.state.value},
    )


async def list_tasks(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    await state.auth.authenticate(request)
    tasks = [bodies.Task.of(spec) for spec in state.registry.tasks()]
    return json_response(bodies.TaskList(tasks=tasks))
