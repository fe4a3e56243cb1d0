"""Who is asking: API keys, short-lived stream tokens, and the development/production modes.

- Development (the one-command start on loopback): open; a request without credentials sees
  every job. A key, when given, still scopes the caller to its owner.
- Production (``STEPSTREAM_MODE=production``, or ``auto`` on a non-loopback address): every
  ``/api`` call needs ``Authorization: Bearer KEY``; streams also take ``?token=`` because
  EventSource cannot send headers.

A stream token is ``base64url(payload) "." base64url(HMAC-SHA256(secret, payload))``; the payload
names the owner, the scope, the expiry and the token's own id (stream limits count per token).
A scope is a set of the owner's jobs: ``job:<id>`` (one job), ``subject:<subject>`` (the jobs
submitted for one end user) or ``events`` (all of them). A token reads the record and opens
the stream of any job in its scope, and opens the firehose (filtered to its scope) unless it
is scoped to one job. It never writes, lists or mints tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request

from stepstream.server.errors import ApiError
from stepstream.tasks.apikeys import ApiKeys, digest

FIREHOSE_SCOPE = "events"
JOB_SCOPE = "job:"
SUBJECT_SCOPE = "subject:"
ANONYMOUS = "anonymous"  # what streams opened without credentials (development) count against


def job_scope(job_id: str) -> str:
    return JOB_SCOPE + job_id


def subject_scope(subject: str) -> str:
    return SUBJECT_SCOPE + subject


@dataclass(frozen=True)
class Principal:
    owner: str | None  # None: development mode without a key, sees every job
    # Set for a stream token: "job:<id>", "subject:<subject>" or "events".
    token_scope: str | None = None
    expires_at: float | None = None  # wall-clock expiry of a stream token
    # What the streams this caller opens count against (server/guards.py): "key:<digest>",
    # "token:<id>", or ANONYMOUS.
    holder: str = ANONYMOUS

    @property
    def subject(self) -> str | None:
        """The one subject a subject token sees; None for every other caller."""
        if self.token_scope is not None and self.token_scope.startswith(SUBJECT_SCOPE):
            return self.token_scope.removeprefix(SUBJECT_SCOPE)
        return None

    @property
    def may_open_firehose(self) -> bool:
        return self.token_scope is None or not self.token_scope.startswith(JOB_SCOPE)

    def may_read(self, job_owner: str | None, job_id: str, job_subject: str | None = None) -> bool:
        if self.owner is not None and self.owner != job_owner:
            return False
        scope = self.token_scope
        if scope is None or scope == FIREHOSE_SCOPE:
            return True
        if scope.startswith(SUBJECT_SCOPE):
            return job_subject is not None and scope == subject_scope(job_subject)
        return scope == job_scope(job_id)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authenticator:
    def __init__(
        self, *, production: bool, secret: str | None, keys: ApiKeys, token_ttl: float
    ) -> None:
        self.production = production
        # Without a configured secret (development only) tokens are signed with a key of this
        # process: they work, but only against this process.
        self._secret = (secret or secrets.token_hex(32)).encode()
        self.keys = keys
        self.token_ttl = token_ttl

    # -- stream tokens ---------------------------------------------------------------------

    def issue_token(self, owner: str | None, scope: str) -> tuple[str, float]:
        expires_at = time.time() + self.token_ttl
        claims = {"o": owner, "s": scope, "e": round(expires_at, 3), "i": secrets.token_urlsafe(9)}
        payload = json.dumps(claims).encode()
        signature = hmac.new(self._secret, payload, hashlib.sha256).digest()
        return f"{_b64(payload)}.{_b64(signature)}", expires_at

    def read_token(self, token: str) -> Principal:
        try:
            encoded_payload, encoded_signature = token.split(".", 1)
            payload = _unb64(encoded_payload)
            signature = _unb64(encoded_signature)
        except (ValueError, UnicodeEncodeError):
            raise _unauthorized("the token is malformed") from None
        expected = hmac.new(self._secret, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            raise _unauthorized("the token's signature does not match")
        claims = json.loads(payload)
        if claims["e"] < time.time():
            raise _unauthorized("the token has expired; fetch a new one", code="token_expired")
        # Tokens issued before they carried an id count by their signature, unique as well.
        token_id = claims.get("i") or encoded_signature[:16]
        return Principal(
            owner=claims["o"],
            token_scope=claims["s"],
            expires_at=claims["e"],
            holder=f"token:{token_id}",
        )

    # -- requests ---------------------------------------------------------------------------

    async def authenticate(self, request: Request, *, allow_token: bool = False) -> Principal:
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise _unauthorized("use `Authorization: Bearer <API key>`")
            owner = await self.keys.owner_of(key.strip())
            if owner is None:
                raise _unauthorized("the API key is not valid")
            return Principal(owner=owner, holder=f"key:{digest(key.strip())[:24]}")
        token = request.query_params.get("token")
        if token is not None:
            if not allow_token:
                raise _unauthorized(
                    "a stream token only reads jobs and opens streams; use an API key here"
                )
            return self.read_token(token)
        if self.production:
            raise _unauthorized("credentials required: `Authorization: Bearer <API key>`")
        return Principal(owner=None)


def _unauthorized(message: str, code: str = "unauthorized") -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": "Bearer"})
