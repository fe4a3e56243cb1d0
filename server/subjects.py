"""The end user a job belongs to (``subject``), checked the same way wherever it is given: a
submit, a batch, ``GET /api/jobs?subject=`` and a subject token's request."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeGuard

from stepstream.server.api_errors import ApiError

MAX_LENGTH = 128
# What an app's user ids look like (database ids, UUIDs, emails, "auth0|…"), and nothing that
# needs quoting in a Redis key, a token or a log line.
SUBJECT = re.compile(rf"[A-Za-z0-9._:@+|=-]{{1,{MAX_LENGTH}}}")
RULE = f"1 to {MAX_LENGTH} characters: letters, digits and . _ : @ + | = -"


def is_subject(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and SUBJECT.fullmatch(value) is not None


def subject_field(body: Mapping[str, Any]) -> str | None:
    """The optional ``subject`` of a request body (422 naming the field when it is not one)."""
    value = body.get("subject")
    if value is None:
        return None
    if not is_subject(value):
        raise ApiError(
            422,
            "invalid_body",
            f"`subject` must be a string of {RULE}",
            {"fields": ["subject"], "max_length": MAX_LENGTH, "pattern": SUBJECT.pattern},
        )
    return value


def subject_param(params: Mapping[str, str]) -> str | None:
    """The optional ``?subject=`` of a listing (400, like the listing's other filters)."""
    value = params.get("subject")
    if not value:
        return None
    if not is_subject(value):
        raise ApiError(400, "bad_subject", f"`subject` must be {RULE}")
    return value
