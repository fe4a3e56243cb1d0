"""Who is asking: API keys, short-lived stream tokens, and the development/production modes.

- Development (the one-command start on loopback): open; a request without credentials sees
  every job. A key, when given, still scopes the caller to its owner.
- Production (``STEPSTREAM_MODE=production``, or ``auto`` on a non-loopback address): every
  ``/api`` call needs ``Authorization: Bearer KEY``; streams also take ``?token=`` because
  EventSource cannot send headers.

A stream token is ``base64url(payload) "." base64url(HMAC-SHA256(secret, payload))``; the payload
names the owner, the scope (one job, or the owner's firehose) and the expiry.
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
from stepstream.tasks.apikeys import ApiKeys

FIREHOSE_SCOPE = "events"


@dataclass(frozen=True)
class Principal:
    owner: str | None  # None: development mode without a key, sees every job
    token_scope: str | None = None  # set for a stream token: "job:<id>" or "events"
    expires_at: float | None = None  # wall-clock expiry of a stream token

    def may_read(self, job_owner: str | None, job_id: str) -> bool:
        if self.token_scope is not None and self.token_scope != f"job:{job_id}":
            return False
        return self.owner is None or self.owner == job_owner


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
        payload = json.dumps({"o": owner, "s": scope, "e": round(expires_at, 3)}).encode()
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
        return Principal(owner=claims["o"], token_scope=claims["s"], expires_at=claims["e"])

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
            return Principal(owner=owner)
        token = request.query_params.get("token")
        if token is not None:
            if not allow_token:
                raise _unauthorized("a stream token only opens streams; use an API key here")
            return self.read_token(token)
        if self.production:
            raise _unauthorized("credentials required: `Authorization: Bearer <API key>`")
        return Principal(owner=None)


def _unauthorized(message: str, code: str = "unauthorized") -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": "Bearer"})
