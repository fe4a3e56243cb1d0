"""``POST /api/jobs/{id}/input``: a person gives the input a waiting job asks for.

The value is checked against the JSON Schema the job stored with its ``waiting`` event (422
naming the fields; the job keeps waiting). The answer, its ``input`` event, the move back to
``queued`` and the job's arq queue entry are one store script (tasks/inputs.py), run in a
``MULTI`` after a ``WATCH`` of the record: it happens only if the job still waits for that
name, so of two answers the first is kept and the second gets 409.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jsonschema_rs
from starlette.requests import Request
from starlette.responses import Response

from stepstream.server.api_errors import ApiError
from stepstream.server.auth import Principal, job_scope
from stepstream.server.bodies import Job, json_response
from stepstream.server.jobs import check_input_shape, load_job, read_object
from stepstream.server.state import AppState
from stepstream.server.urls import root_path
from stepstream.tasks import inputs
from stepstream.tasks.models import InputRequest, JobRecord, JobState

ANSWER_FIELDS = frozenset({"name", "value"})


async def answer_input(request: Request) -> Response:
    state: AppState = request.app.state.stepstream
    # The token in the header only: an answer then always needs a CORS preflight.
    principal = await state.auth.authenticate(request, allow_token=True, token_in_query=False)
    record = await load_job(request, principal)
    if principal.token_scope is not None and not (
        principal.may_answer and principal.token_scope == job_scope(record.id)
    ):
        raise ApiError(
            403,
            "forbidden",
            "this token only reads; answer with the owner's API key, or with a token minted "
            'by POST /api/jobs/{id}/token with {"may_answer": true}',
        )
    body = await read_object(request, state, ANSWER_FIELDS, "{name, value}")
    name = body.get("name")
    if not isinstance(name, str):
        raise ApiError(422, "invalid_body", "`name` must be a string naming the input")
    if "value" not in body:
        raise ApiError(422, "invalid_body", "`value` is required")
    value = body["value"]
    check_input_shape(value, state.settings)
    try:
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except ValueError:  # 1e400 parses as infinity, which no JSON answer could carry back
        raise ApiError(422, "invalid_value", "numbers in the value must be finite") from None
    limit = state.settings.max_answer_bytes
    if len(encoded.encode()) > limit:
        raise ApiError(
            413,
            "answer_too_large",
            f"the value is larger than {limit} bytes as JSON",
            {"limit": limit, "setting": "STEPSTREAM_MAX_ANSWER_BYTES"},
        )
    answered = await _store_answer(state, record.id, name, value, answered_by(principal, record))
    return json_response(Job.of(answered, root_path(request)), 202)


def answered_by(principal: Principal, record: JobRecord) -> str:
    """Who gave an input, as the record's ``answers`` say."""
    if principal.token_scope is not None:
        return f"subject:{record.subject}" if record.subject is not None else "token"
    if principal.owner is not None:
        return f"owner:{principal.owner}"
    return "anonymous"  # development, without credentials


async def _store_answer(state: AppState, job_id: str, name: str, value: Any, by: str) -> JobRecord:
    def check(record: JobRecord | None) -> None:
        if record is None:
            raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
        check_answerable(record, name, value)

    answered = await inputs.answer(state.store, state.arq, job_id, name, value, by, check=check)
    if answered is None:
        raise ApiError(409, "conflict", "the job kept changing; read it and try again")
    return answered


def check_answerable(record: JobRecord, name: str, value: Any) -> None:
    """409 unless the job waits for ``name``; 422 unless ``value`` fits its schema."""
    given = record.answers.get(name)
    if given is not None:
        raise ApiError(
            409,
            "already_answered",
            f"the input {name!r} was given already (by {given.by} at {given.at})",
            {"name": name, "by": given.by, "at": given.at},
        )
    request = record.waiting_for
    if record.state != JobState.waiting or not isinstance(request, InputRequest):
        raise ApiError(
            409,
            "not_waiting",
            f"the job is {record.state.value}, not waiting for input",
            {"state": record.state.value},
        )
    if request.name != name:
        raise ApiError(
            409,
            "wrong_input",
            f"the job waits for the input {request.name!r}, not {name!r}",
            {"waiting_for": request.name},
        )
    errors = [
        {"loc": _location(error), "msg": error.message}
        for error in _validator(json.dumps(request.schema_, sort_keys=True)).iter_errors(value)
    ]
    if errors:
        raise ApiError(
            422,
            "invalid_value",
            f"the value does not fit the schema of the input {name!r}",
            errors,
        )


def _location(error: jsonschema_rs.ValidationError) -> list[str | int]:
    """Where in the value the error is; a missing field is named as its own place."""
    loc: list[str | int] = list(error.instance_path)
    if isinstance(error.kind, jsonschema_rs.ValidationErrorKind.Required):
        loc.append(str(error.kind.property))
    return loc


@lru_cache(maxsize=256)
def _validator(schema: str) -> Any:
    return jsonschema_rs.validator_for(json.loads(schema))
