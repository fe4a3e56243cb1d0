"""Each process's webhook settings, announced in Redis so that processes that disagree say so.

A ``callback_url`` is checked by the web process that takes the submit, with its settings, and
delivered by a worker, with its own; the deployment webhook is added to the outbox by whichever
process ends the job. A worker started without ``STEPSTREAM_WEBHOOK_ALLOWED_HOSTS`` or
``STEPSTREAM_WEBHOOK_SECRET`` would refuse or leave unsigned what the web process accepted. So
every web and worker process announces what it has, every ``STEPSTREAM_WORKER_HEARTBEAT_SECONDS``,
under a key that expires after three missed announcements (like a worker's heartbeat), and
compares it with the others':

- a process logs a warning at start, and whenever a disagreement appears, naming each setting
  that differs and which processes have which value;
- ``/readyz`` names the settings that differ (no values: it answers anyone);
- ``stepstream doctor`` shows the values, per process.

Secrets are never written: the webhook secret and the deployment webhook's URL (which may carry
a token) are announced as short digests, enough to tell equal values from different ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from stepstream.tasks.keyspace import Keys
from stepstream.tasks.settings import Settings

logger = logging.getLogger("stepstream.webhooks")

# What is compared, and the setting each comes from.
COMPARED = {
    "allowed_hosts": "STEPSTREAM_WEBHOOK_ALLOWED_HOSTS",
    "allow_public": "STEPSTREAM_WEBHOOK_ALLOW_PUBLIC",
    "secret": "STEPSTREAM_WEBHOOK_SECRET",
    "url": "STEPSTREAM_WEBHOOK_URL",
    "events": "STEPSTREAM_WEBHOOK_EVENTS",
    "public_url": "STEPSTREAM_PUBLIC_URL",
}
READ_LIMIT = 1_000  # announcements read at once: processes of one deployment


def _digest(value: str) -> str:
    return hashlib.sha256(b"stepstream webhook settings\0" + value.encode()).hexdigest()[:12]


def describe(settings: Settings) -> dict[str, Any]:
    """The webhook settings of a process as compared: normalised, secrets as digests."""
    url = settings.webhook_url
    shown_url = ""
    if url:
        parts = urlsplit(url)
        shown_url = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/… ({_digest(url)})"
    return {
        "allowed_hosts": ",".join(
            sorted({entry.lower() for entry in settings.webhook_allowed_hosts})
        ),
        "allow_public": settings.webhook_allow_public,
        "secret": f"set ({_digest(settings.webhook_secret)})" if settings.webhook_secret else "",
        "url": shown_url,
        "events": ",".join(sorted(settings.webhook_states)),
        "public_url": settings.public_url.rstrip("/"),
    }


@dataclass(frozen=True)
class Announcement:
    """What one process announced: who it is, and its webhook settings (``describe``)."""

    process: str  # its id
    role: str  # "web" or "worker"
    host: str
    pid: int
    settings: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.role} {self.process}"

    @property
    def signs(self) -> bool:
        return bool(self.settings.get("secret"))

    def to_json(self) -> str:
        return json.dumps(
            {
                "process": self.process,
                "role": self.role,
                "host": self.host,
                "pid": self.pid,
                "settings": self.settings,
            }
        )

    @classmethod
    def from_json(cls, raw: str) -> Announcement | None:
        try:
            data = json.loads(raw)
            return cls(
                str(data["process"]),
                str(data["role"]),
                str(data["host"]),
                int(data["pid"]),
                dict(data["settings"]),
            )
        except (ValueError, KeyError, TypeError):
            return None  # written by another version: not compared


@dataclass(frozen=True)
class Disagreement:
    """One setting that differs: each value, with the processes that have it."""

    setting: str
    values: dict[str, list[str]]  # shown value → process labels

    def line(self) -> str:
        parts = [f"{_shown(value)} in {', '.join(labels)}" for value, labels in self.values.items()]
        return f"{self.setting} differs: {'; '.join(parts)}"


def _shown(value: str) -> str:
    return repr(value) if value else "not set"


def disagreements(announcements: Iterable[Announcement]) -> list[Disagreement]:
    """The compared settings on which the processes do not all agree."""
    found: list[Disagreement] = []
    listed = list(announcements)
    for field, setting in COMPARED.items():
        values: dict[str, list[str]] = {}
        for announcement in listed:
            value = announcement.settings.get(field)
            shown = str(value).lower() if isinstance(value, bool) else str(value or "")
            values.setdefault(shown, []).append(announcement.label)
        if len(values) > 1:
            found.append(Disagreement(setting, values))
    return found


def parse(values: Iterable[str | None]) -> list[Announcement]:
    announcements = [Announcement.from_json(v) for v in values if v]
    return sorted((a for a in announcements if a is not None), key=lambda a: a.process)


async def read(redis: Redis, keys: Keys) -> list[Announcement]:
    """The announcements of the processes alive now (their key has not expired)."""
    ids: list[str] = await redis.zrevrange(keys.webhook_settings, 0, READ_LIMIT - 1)
    if not ids:
        return []
    # One GET each, not MGET: on a cluster the keys are in many slots.
    async with redis.pipeline(transaction=False) as pipe:
        for process_id in ids:
            pipe.get(keys.webhook_settings_of(process_id))
        values: list[str | None] = await pipe.execute()
    return parse(values)


def held_reasons(values: Iterable[str]) -> list[str]:
    """The distinct reasons among held entries' records (``Keys.webhooks_held``)."""
    reasons: dict[str, None] = {}
    for raw in values:
        try:
            reasons[str(json.loads(raw)["reason"])] = None
        except (ValueError, KeyError, TypeError):
            continue
    return list(reasons)


class Announcer:
    """Announces this process's webhook settings until stopped, and keeps the others' in view
    (``peers``); logs each new disagreement."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        *,
        role: str,
        process_id: str,
        interval: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.interval = interval
        self.ttl_ms = max(1, int(interval * 3 * 1000))  # three missed announcements: gone
        self.me = Announcement(
            process_id, role, socket.gethostname(), os.getpid(), describe(settings)
        )
        self.peers: list[Announcement] = []
        self._reported: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def peers_sign(self) -> bool:
        """Whether another live process has a webhook secret."""
        return any(p.signs for p in self.peers if p.process != self.me.process)

    async def announce(self) -> None:
        """Write this process's announcement, read the others', log new disagreements."""
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(
                self.keys.webhook_settings_of(self.me.process), self.me.to_json(), px=self.ttl_ms
            )
            pipe.zadd(self.keys.webhook_settings, {self.me.process: now_ms})
            # Ids silent for much longer than any TTL are of no use to readers.
            pipe.zremrangebyscore(
                self.keys.webhook_settings, "-inf", now_ms - max(60_000, 10 * self.ttl_ms)
            )
            await pipe.execute()
        self.peers = await read(self.redis, self.keys)
        self._report([d for d in disagreements(self.peers) if self._concerns_me(d)])

    def _concerns_me(self, disagreement: Disagreement) -> bool:
        return any(self.me.label in labels for labels in disagreement.values.values())

    def _report(self, found: list[Disagreement]) -> None:
        lines = {d.line() for d in found}
        new = lines - self._reported
        self._reported = lines
        for line in sorted(new):
            logger.warning(
                "webhook settings differ between this deployment's processes (this one is %s): "
                "%s. Give every web and worker process the same webhook settings; deliveries a "
                "worker's settings refuse wait in the outbox until then",
                self.me.label,
                line,
            )

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="stepstream-webhook-settings")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.announce()
            except Exception:  # a Redis blip: the next announcement tries again
                logger.warning("could not announce the webhook settings", exc_info=True)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(self.keys.webhook_settings_of(self.me.process))
                pipe.zrem(self.keys.webhook_settings, self.me.process)
                await pipe.execute()
        except Exception:  # it expires on its own
            logger.warning("could not remove the webhook settings announcement", exc_info=True)
