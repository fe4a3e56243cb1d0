"""The batch endpoints: ``POST /api/batches``, ``GET /api/batches/{id}`` (docs/ai-workloads.md).

A batch is a parent job (task ``batch:<task>``, a ``batch`` field with the counts) over one
child job per input. The children are ordinary jobs (``batch_id``, ``batch_index``); the parent
is kept up to date by ``tasks.batches.child_finished`` as they end, and its stream carries each
child's end. Cancelling the parent cancels the children.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stepstream.server.api_errors import ApiError
from stepstream.server.auth import Principal
from stepstream.server.bodies import Batch, BatchChild, ExpiredChild, json_response
from stepstream.server.jobs import (
    accepted,
    check_created,
    check_input_shape,
    claim_idempotency_key,
    enforce_submission_limits,
    input_problems,
    input_refusal,
    load_job,
    read_object,
    reload,
    task_named,
)
from stepstream.server.options import SubmitOptions, check_callback_url, parse_submit_options
from stepstream.server.state import AppState
from stepstream.server.urls import root_path
from stepstream.tasks import batches, idempotency, tracing
from stepstream.tasks.models import JobRecord, new_job_id
from stepstream.tasks.registry import TaskSpec

BATCH_FIELDS = frozenset({"task", "inputs", "budget", "subject", "callback_url"})


async def submit_batch(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    principal = await state.auth.authenticate(request)
    body = await read_object(request, state, BATCH_FIELDS, "{task, inputs}")
    spec = task_named(state, body.get("task"))
    task_name = spec.name
    inputs = body.get("inputs")
    limit = state.settings.max_batch_size
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= limit:
        raise ApiError(
            422,
            "invalid_body",
            f"`inputs` must be a list of 1 to {limit} input objects",
            {"limit": limit},
        )
    problems: list[dict[str, Any]] = []
    for index, item in enumerate(inputs):
        if not isinstance(item, dict):
            problems.append({"index": index, "loc": [], "msg": "must be a JSON object"})
            continue
        check_input_shape(item, state.settings)
        problems.extend({"index": index, **p} for p in input_problems(spec, item))
        if len(problems) >= 50:
            break
    if problems:
        problems = problems[:50]
        raise ApiError(
            422, "invalid_input", input_refusal(spec, problems, "inputs do not fit"), problems
        )
    given = parse_submit_options(body, state.settings)
    await check_callback_url(given, state.settings, production=state.auth.production)
    owner = principal.owner
    # A batch takes an Idempotency-Key as a submit does: a client whose answer was lost sends
    # the same batch again and gets the one it made, never a second.
    idempotency_key = request.headers.get("idempotency-key")
    claim = None
    parent_id = new_job_id()
    if idempotency_key is not None:
        claim = await claim_idempotency_key(
            state,
            owner,
            idempotency_key,
            batches.PARENT_PREFIX + task_name,
            {"inputs": inputs},
            given.fingerprint() | {"callback_url": given.callback_url},
        )
        if claim.existing is not None:
            return _batch_accepted(request, state, principal, claim.existing, 200)
        parent_id = claim.job_id
    try:
        await enforce_submission_limits(state, owner)
        record = await _create_batch(
            state,
            spec,
            inputs,
            given,
            owner,
            parent_id,
            claim,
            tracing.incoming(request.headers),
        )
    except ApiError:
        if claim is not None:
            await idempotency.release(state.store, claim)  # refused: nothing was made
        raise
    return _batch_accepted(request, state, principal, record, 202)


def _batch_accepted(
    request: Request, state: AppState, principal: Principal, record: JobRecord, status: int
) -> JSONResponse:
    response = accepted(request, state, principal, record, status)
    response.headers["Location"] = f"{root_path(request)}/api/batches/{record.id}"
    return response


async def _create_batch(
    state: AppState,
    spec: TaskSpec,
    inputs: list[dict[str, Any]],
    given: SubmitOptions,
    owner: str | None,
    parent_id: str,
    claim: idempotency.Claim | None,
    trace_parent: tracing.Carrier | None = None,
) -> JobRecord:
    """The parent and its children, created together (or refused: nothing is written)."""
    # One submit span for the batch: every child's attempts are its children, in one trace.
    span = tracing.start_span(
        f"submit batch {spec.name}",
        {
            "stepstream.job_id": parent_id,
            "stepstream.task": spec.name,
            "stepstream.owner": owner,
            "stepstream.subject": given.subject,
            "stepstream.batch.size": len(inputs),
        },
        parent=trace_parent,
    )
    try:
        return await _create_batch_traced(state, spec, inputs, given, owner, parent_id, claim, span)
    except BaseException as exc:
        span.fail(exc)
        raise
    finally:
        span.end()  # a no-op once ended with the parent's first event


async def _create_batch_traced(
    state: AppState,
    spec: TaskSpec,
    inputs: list[dict[str, Any]],
    given: SubmitOptions,
    owner: str | None,
    parent_id: str,
    claim: idempotency.Claim | None,
    span: tracing.Span,
) -> JobRecord:
    trace = span.carrier()
    # The children's options: the callback is the parent's alone.
    options = SubmitOptions(budget=given.budget, subject=given.subject)
    children = [
        replace(options.new_job(spec, item, owner), batch_id=parent_id, batch_index=index)
        for index, item in enumerate(inputs)
    ]
    created = await batches.create(
        state.store,
        state.arq,
        parent_id,
        spec.name,
        children,
        owner=owner,
        subject=given.subject,
        callback_url=given.callback_url,
        trace=trace,
        claim=claim,
    )
    record = check_created(state, created, len(inputs))
    span.end(created.appended.job_event_id)
    return await reload(state, record)


async def get_batch(request: Request) -> Response:
    """The parent record and every child's id, index, state, result and error so far."""
    state: AppState = request.app.state.stepstream
    principal = await state.auth.authenticate(request)
    parent = await _load_parent(request, principal)
    child_ids = await state.store.child_ids(parent.id)
    children = await state.store.get_many(child_ids)
    items: list[BatchChild | ExpiredChild] = []
    for index, (child_id, child) in enumerate(zip(child_ids, children, strict=True)):
        if child is None:
            items.append(ExpiredChild(id=child_id, index=index, state=None))
            continue
        items.append(
            BatchChild(
                id=child.id,
                index=index,
                state=child.state,
                result=child.result,
                error=child.error.model_dump(exclude={"traceback"}) if child.error else None,
                cached=child.cached,
            )
        )
    return json_response(Batch.of(parent, root_path(request), children=items))


async def _load_parent(request: Request, principal: Any) -> JobRecord:
    record = await load_job(request, principal)
    if record.batch is None:
        raise ApiError(404, "batch_not_found", f"job {record.id!r} is not a batch")
    return record
