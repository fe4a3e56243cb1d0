"""Who is asking: API keys, short-lived stream tokens, and the development/production modes.

- Development (the one-command start on loopback): open; a request without credentials sees
  every job. A key, when given, still scopes the caller to its owner.
- Production (``STEPSTREAM_MODE=production``, or ``auto`` on a non-loopback address): every
  ``/api`` call needs ``Authorization: Bearer KEY``; where a stream token serves, it goes in
  that header too, and streams and record reads also take ``?token=`` because EventSource
  cannot send headers. An answer (server/answers.py) takes its token in the header only: with
  ``?token=`` it would be a CORS simple request, sent cross-origin without a preflight.

A stream token is ``base64url(payload) "." base64url(HMAC-SHA256(secret, payload))``, unpadded
and decoded strictly (one spelling per token); the payload
names the owner, the scope, the expiry, the token's own id (stream limits count per token), its
audience (the mode of the server that minted it) and the key that minted it, sealed (below).
A server accepts only tokens of its own mode, so a development server that shares the secret
cannot mint tokens for production; production also refuses a token without an owner or a key.
Each use of a token looks its key up again: a revoked key's tokens stop working at once, and
the streams they hold end within ``revocation.RECHECK_SECONDS``.

A scope is a set of the owner's jobs: ``job:<id>`` (one job), ``subject:<subject>`` (the jobs
submitted for one end user) or ``events`` (all of them). A token reads the record and opens
the stream of any job in its scope, and opens the firehose (filtered to its scope) unless it
is scoped to one job. It never writes, lists or mints tokens, with one exception: a job token
minted with ``may_answer`` may also answer that job's requests for input (server/answers.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import sys
import time
from dataclasses import dataclass

from starlette.requests import Request

from stepstream.server.api_errors import ApiError
from stepstream.server.revocation import KeyWatch
from stepstream.tasks.credentials import ApiKeys, digest

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
    # SHA-256 of the API key this caller authenticated with, or of the key that minted its
    # token; None without credentials (development). Tokens carry it only sealed.
    key_digest: str | None = None
    # A job token minted with ``may_answer``: it may give that job's input (server/answers.py).
    may_answer: bool = False

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


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(text: str) -> bytes:
    """Strict: only the one spelling ``_b64`` writes (no padding, no stray characters, no
    unused bits set), so a token cannot be varied and still be accepted."""
    if not _B64URL.fullmatch(text):
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not the canonical base64url")
    return data


def _xor(data: bytes, pad: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, pad, strict=True))


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
        self.audience = "production" if production else "development"
        self.watch = KeyWatch(keys)

    # -- stream tokens ---------------------------------------------------------------------

    def issue_token(
        self, owner: str | None, scope: str, *, key_digest: str | None, may_answer: bool = False
    ) -> tuple[str, float]:
        """A token for ``scope`` of ``owner``'s jobs, minted with the key whose SHA-256 is
        ``key_digest`` (None: without credentials, in development); ``may_answer``: it may
        also answer the job's input (a job scope only)."""
        expires_at = time.time() + self.token_ttl
        token_id = secrets.token_urlsafe(9)
        claims = {
            "o": owner,
            "s": scope,
            "e": round(expires_at, 3),
            "i": token_id,
            "a": self.audience,
            "k": None if key_digest is None else self._seal(key_digest, token_id),
        }
        if may_answer:
            claims["w"] = "input"
        payload = json.dumps(claims).encode()
        signature = hmac.digest(self._secret, payload, "sha256")  # one-shot, in C
        return f"{_b64(payload)}.{_b64(signature)}", expires_at

    def read_token(self, token: str) -> Principal:
        try:
            encoded_payload, encoded_signature = token.split(".", 1)
            payload = _unb64(encoded_payload)
            signature = _unb64(encoded_signature)
        except (ValueError, UnicodeEncodeError):
            raise _unauthorized(
                "the stream token is malformed: send it exactly as it was minted"
            ) from None
        expected = hmac.new(self._secret, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            raise _unauthorized("the token's signature does not match")
        claims = json.loads(payload)
        audience = claims.get("a")
        if audience != self.audience:
            raise _unauthorized(
                f"this token was minted by a server in {audience} mode; this server runs in "
                f"{self.audience} mode and accepts only its own tokens: fetch one here"
                if audience
                else "this token predates token audiences; fetch a new one"
            )
        if claims["e"] < time.time():
            raise _unauthorized("the token has expired; fetch a new one", code="token_expired")
        sealed_key = claims["k"]
        if self.production and (claims["o"] is None or sealed_key is None):
            raise _unauthorized(
                "this token names no owner or key; production accepts only tokens minted with "
                "an API key"
            )
        token_id = claims["i"]
        key_digest = None if sealed_key is None else self._unseal(sealed_key, token_id)
        # Interned: a principal lives as long as its stream, and the viewers of one job share
        # these strings (one copy each, not one per stream).
        return Principal(
            owner=_interned(claims["o"]),
            token_scope=_interned(claims["s"]),
            expires_at=claims["e"],
            holder=f"token:{token_id}",
            key_digest=_interned(key_digest),
            may_answer=claims.get("w") == "input",
        )

    def _key_pad(self, token_id: str) -> bytes:
        # A one-time pad per token (HMAC as a PRF of the token's unique id): the token names
        # its key without showing even the key's hash, which would let anyone holding a token
        # test guesses of a weak configured key offline.
        message = b"stepstream key\x00" + token_id.encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def _seal(self, key_digest: str, token_id: str) -> str:
        return _b64(_xor(bytes.fromhex(key_digest), self._key_pad(token_id)))

    def _unseal(self, sealed: str, token_id: str) -> str:
        return _xor(_unb64(sealed), self._key_pad(token_id)).hex()

    async def check_minter(self, principal: Principal) -> None:
        """Refuse a token whose key was revoked since it minted it."""
        if principal.key_digest is None:
            return  # development, minted without credentials: no key to revoke
        owner = await self.keys.owner_of_digest(principal.key_digest)
        if owner is None or owner != principal.owner:
            raise _unauthorized(
                "the API key that minted this token was revoked; fetch a token minted with a "
                "valid key",
                code="token_revoked",
            )

    # -- requests ---------------------------------------------------------------------------

    async def authenticate(
        self, request: Request, *, allow_token: bool = False, token_in_query: bool = True
    ) -> Principal:
        """The caller: an API key (``Authorization: Bearer``), or where ``allow_token``, a
        stream token, in that header or (``token_in_query``, for streams: EventSource cannot
        send headers) in ``?token=``."""
        if not token_in_query and "token" in request.query_params:
            raise _unauthorized(
                "give the token in the `Authorization: Bearer <token>` header here, not in "
                "?token=: this request writes"
            )
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, credential = header.partition(" ")
            credential = credential.strip()
            if scheme.lower() != "bearer" or not credential:
                raise _unauthorized("use `Authorization: Bearer <API key>`")
            hashed = digest(credential)
            owner = await self.keys.owner_of_digest(hashed)
            if owner is not None:
                return Principal(owner=owner, holder=f"key:{hashed[:24]}", key_digest=hashed)
            if not (allow_token and "." in credential):  # a token is payload.signature
                raise _unauthorized("the API key is not valid")
            return await self._token_principal(credential)
        token = request.query_params.get("token")
        if token is not None:
            if not allow_token:
                raise _unauthorized(
                    "a stream token only reads jobs and opens streams; use an API key here"
                )
            return await self._token_principal(token)
        if self.production:
            if not allow_token:
                raise _unauthorized("credentials required: `Authorization: Bearer <API key>`")
            raise _unauthorized(NEEDS_TOKEN if token_in_query else NEEDS_KEY_OR_ANSWER_TOKEN)
        return Principal(owner=None)

    async def _token_principal(self, token: str) -> Principal:
        principal = self.read_token(token)
        await self.check_minter(principal)
        return principal


# A browser reads with a stream token, never a key: the 401 says where a token comes from.
NEEDS_TOKEN = (
    "credentials required: a browser needs a stream token in ?token= (minted by your backend "
    "with its API key: the `stream_token` of a submit's answer, POST /api/jobs/{id}/token or "
    "POST /api/events/token); a script may send `Authorization: Bearer <API key>`"
)
NEEDS_KEY_OR_ANSWER_TOKEN = (
    "credentials required: `Authorization: Bearer <token>` with a token minted by "
    'POST /api/jobs/{id}/token with {"may_answer": true}, or `Authorization: Bearer <API key>`'
)


def _interned(value: str | None) -> str | None:
    return value if value is None else sys.intern(value)


def _unauthorized(message: str, code: str = "unauthorized") -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": "Bearer"})
