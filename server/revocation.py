"""The API keys behind this web process's open streams, checked again every few seconds.

A request is checked against its key when it arrives (server/auth.py); a stream lives on for
hours. Every stream opened with a revocable key, or with a token one minted, waits on a future
of its own here as well as on its frames; one task asks Redis about every such key at once,
every ``RECHECK_SECONDS``, and resolves the futures of those revoked: their streams end
(server/guards.py). One future per stream rather than one per key: a stream's callback goes
away with its future when the stream ends. Configured keys (``STEPSTREAM_API_KEYS``) are not
watched: they cannot be revoked while the process runs, and a restart without them ends its
streams anyway.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from stepstream.tasks.credentials import ApiKeys

logger = logging.getLogger("stepstream.revocation")

RECHECK_SECONDS = 2.0  # how late an open stream may learn that its key was revoked


class KeyWatch:
    def __init__(self, keys: ApiKeys, interval: float = RECHECK_SECONDS) -> None:
        self.keys = keys
        self.interval = interval
        self._watched: dict[str, set[asyncio.Future[None]]] = {}  # by key digest
        self._task: asyncio.Task[None] | None = None

    def watch(self, key_digest: str | None) -> asyncio.Future[None] | None:
        """A future resolved when the key is revoked, for one stream; None when the key cannot
        be revoked meanwhile (none, or configured). Pair with ``unwatch``."""
        if key_digest is None or not self.keys.revocable(key_digest):
            return None
        revoked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watched.setdefault(key_digest, set()).add(revoked)
        return revoked

    def unwatch(self, key_digest: str, revoked: asyncio.Future[None]) -> None:
        streams = self._watched.get(key_digest)
        if streams is None:
            return  # revoked already: the entry is gone
        streams.discard(revoked)
        if not streams:
            del self._watched[key_digest]

    async def check(self) -> None:
        """Ask Redis about every watched key at once; end the streams of the revoked ones."""
        digests = list(self._watched)
        if not digests:
            return
        owners = await self.keys.stored_owners(digests)
        for key_digest, owner in zip(digests, owners, strict=True):
            if owner is None:
                for revoked in self._watched.pop(key_digest, ()):
                    if not revoked.done():
                        revoked.set_result(None)

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
