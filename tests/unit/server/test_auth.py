"""server/auth.py: the stream-token codec (issue, read, refuse), without a server."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest
from redis.asyncio import Redis

from stepstream.server.api_errors import ApiError
from stepstream.server.auth import Authenticator
from stepstream.tasks.credentials import ApiKeys
from stepstream.tasks.keyspace import Keys

KEY_DIGEST = hashlib.sha256(b"key-alice-0123456789").hexdigest()


def authenticator(
    *, production: bool = True, secret: str = "s" * 32, ttl: float = 60
) -> Authenticator:
    # The Redis client is never used by the codec (it connects lazily, and nothing asks).
    keys = ApiKeys(Redis(), Keys("unit:"), {})
    return Authenticator(production=production, secret=secret, keys=keys, token_ttl=ttl)


def claims_of(token: str) -> dict[str, object]:
    payload = token.split(".")[0]
    decoded: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def refusal(auth: Authenticator, token: str) -> ApiError:
    with pytest.raises(ApiError) as raised:
        auth.read_token(token)
    assert raised.value.status == 401
    return raised.value


def test_a_token_reads_back_as_the_owner_scope_expiry_and_minting_key() -> None:
    auth = authenticator()
    before = time.time()
    token, expires_at = auth.issue_token("alice", "job:j1", key_digest=KEY_DIGEST)
    assert before + 60 <= expires_at <= time.time() + 60
    principal = auth.read_token(token)
    assert principal.owner == "alice" and principal.token_scope == "job:j1"
    assert principal.expires_at == pytest.approx(expires_at, abs=0.001)
    assert principal.key_digest == KEY_DIGEST
    assert principal.holder.startswith("token:")


def test_a_token_shows_neither_the_key_nor_its_hash() -> None:
    token, _ = authenticator().issue_token("alice", "events", key_digest=KEY_DIGEST)
    text = json.dumps(claims_of(token))
    assert KEY_DIGEST not in text and "key-alice" not in text
    # Each token seals the digest with its own pad: two tokens of one key differ there too.
    other, _ = authenticator().issue_token("alice", "events", key_digest=KEY_DIGEST)
    assert claims_of(token)["k"] != claims_of(other)["k"]


def test_a_changed_payload_or_another_secret_fails_the_signature() -> None:
    auth = authenticator()
    token, _ = auth.issue_token("alice", "job:j1", key_digest=KEY_DIGEST)
    signature = token.split(".")[1]
    claims = {**claims_of(token), "o": "bob"}
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    assert "signature" in refusal(auth, f"{forged}.{signature}").message
    assert "signature" in refusal(authenticator(secret="t" * 32), token).message


@pytest.mark.parametrize("token", ["", "no-dot", "a.b.c", "é.é", "!!!.???"])
def test_a_malformed_token_is_a_401_not_a_crash(token: str) -> None:
    error = refusal(authenticator(), token)
    assert error.code == "unauthorized"


def test_an_expired_token_is_refused_with_its_own_code() -> None:
    auth = authenticator(ttl=-1)
    token, _ = auth.issue_token("alice", "events", key_digest=KEY_DIGEST)
    error = refusal(auth, token)
    assert error.code == "token_expired"


def test_a_token_of_another_mode_is_refused_naming_both_modes() -> None:
    development = authenticator(production=False)
    token, _ = development.issue_token(None, "events", key_digest=None)
    error = refusal(authenticator(production=True), token)
    assert "development" in error.message and "production" in error.message


def test_production_refuses_a_token_minted_without_a_key() -> None:
    auth = authenticator(production=True)
    token, _ = auth.issue_token(None, "events", key_digest=None)
    assert "no owner or key" in refusal(auth, token).message
    # Development mints and reads them: there are no keys to mint with.
    development = authenticator(production=False)
    token, _ = development.issue_token(None, "events", key_digest=None)
    assert development.read_token(token).owner is None
