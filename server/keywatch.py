"""The API keys behind this web process's open streams, checked again every few seconds.

A request is checked against its key when it arrives (server/auth.py); a stream lives on for
hours. Every stream opened with a revocable key, or with a token one minted, waits on its key's
future here as well as on its frames; one task asks Redis about every such key at once, every
``RECHECK_SECONDS``, and resolves the futures of those revoked: their streams end
(server/guards.py). Configured keys (``STEPSTREAM_API_KEYS``) are not watched: they cannot be
revoked while the process runs, and a restart without them ends its streams anyway.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from redis.exceptions import RedisError

from stepstream.tasks.apikeys import ApiKeys

logger = logging.getLogger("stepstream.keywatch")

RECHECK_SECONDS = 2.0  # how late an open stream may learn that its key was revoked


@dataclass
class _Watched:
    revoked: asyncio.Future[None]
    streams: int = 0


class KeyWatch:
    def __init__(self, keys: ApiKeys, interval: float = RECHECK_SECONDS) -> None:
        self.keys = keys
        self.interval = interval
        self._watched: dict[str, _Watched] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, key_digest: str | None) -> asyncio.Future[None] | None:
        """A future resolved when the key is revoked, shared by its streams; None when the key
        cannot be revoked meanwhile (none, or configured). Pair with ``unwatch``."""
        if key_digest is None or not self.keys.revocable(key_digest):
            return None
        watched = self._watched.get(key_digest)
        if watched is None:
            watched = _Watched(asyncio.get_running_loop().create_future())
            self._watched[key_digest] = watched
        watched.streams += 1
        return watched.revoked

    def unwatch(self, key_digest: str, revoked: asyncio.Future[None]) -> None:
        watched = self._watched.get(key_digest)
        if watched is None or watched.revoked is not revoked:
            return  # revoked already: the entry is gone
        watched.streams -= 1
        if watched.streams <= 0:
            del self._watched[key_digest]

    @property
    def watched_keys(self) -> int:
        return len(self._watched)

    async def check(self) -> None:
        """Ask Redis about every watched key at once; end the streams of the revoked ones."""
        digests = list(self._watched)
        if not digests:
            return
        owners = await self.keys.stored_owners(digests)
        for key_digest, owner in zip(digests, owners, strict=True):
            if owner is None:
                watched = self._watched.pop(key_digest, None)
                if watched is not None and not watched.revoked.done():
                    watched.revoked.set_result(None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="key-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except RedisError as exc:
                # A stream outlives a Redis blip; its key is asked about again next time.
                logger.warning("could not check the API keys of open streams: %s", exc)
