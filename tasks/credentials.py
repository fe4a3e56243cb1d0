"""API keys: each maps to an owner. Configured in the environment or created with
``stepstream keys create OWNER``; only their SHA-256 is kept (keys are 256-bit random, so a
plain hash cannot be reversed by guessing)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from redis.asyncio import Redis

from stepstream.tasks.keyspace import Keys

KEY_PREFIX = "sk_"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_configured(pairs: Iterable[str]) -> dict[str, str]:
    """``["owner:key", "owner2:key2"]`` (STEPSTREAM_API_KEYS) → {digest(key): owner}."""
    configured: dict[str, str] = {}
    for item in pairs:
        owner, sep, key = item.partition(":")
        if not sep or not owner or not key:
            raise ValueError("STEPSTREAM_API_KEYS takes owner:key pairs separated by commas")
        configured[digest(key)] = owner
    return configured


class ApiKeys:
    def __init__(self, redis: Redis, keys: Keys, configured: dict[str, str]) -> None:
        self.redis = redis
        self.keys = keys
        self.configured = configured

    async def owner_of_digest(self, hashed: str) -> str | None:
        """The owner of the key whose SHA-256 is ``hashed``; None once it is revoked."""
        owner = self.configured.get(hashed)
        if owner is not None:
            return owner
        stored: str | None = await self.redis.hget(self.keys.api_keys, hashed)  # type: ignore[misc]
        return stored

    async def stored_owners(self, hashed: list[str]) -> list[str | None]:
        """The owners of keys kept in Redis, by digest, in one round trip (None: revoked)."""
        owners: list[str | None] = await self.redis.hmget(self.keys.api_keys, hashed)  # type: ignore[misc]
        return owners

    def revocable(self, hashed: str) -> bool:
        """Whether the key can be revoked while this process runs: configured keys cannot (a
        process started without them no longer knows them)."""
        return hashed not in self.configured

    async def any_key(self) -> bool:
        """Whether any key can authenticate: one configured, or one created in Redis."""
        if self.configured:
            return True
        stored: int = await self.redis.hlen(self.keys.api_keys)  # type: ignore[misc]
        return stored > 0

    async def create(self, owner: str) -> str:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        await self.redis.hset(self.keys.api_keys, digest(key), owner)  # type: ignore[misc]
        return key

    async def revoke(self, key: str) -> bool:
        removed: int = await self.redis.hdel(self.keys.api_keys, digest(key))  # type: ignore[misc]
        return removed == 1
