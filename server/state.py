"""What the web process holds for its lifetime: settings, Redis, the store, the hub, arq, and
the registry of the tasks it serves."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from arq.connections import ArqRedis
from redis.asyncio import Redis

from stepstream.server.auth import Authenticator
from stepstream.server.hub import Hub
from stepstream.tasks.registry import TaskRegistry
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore
from stepstream.tasks.webhook_settings import Announcer


@dataclass
class AppState:
    settings: Settings
    redis: Redis
    store: JobStore
    hub: Hub
    arq: ArqRedis
    auth: Authenticator
    registry: TaskRegistry
    # This process's webhook settings, announced; the other processes' in view (/readyz).
    webhook_settings: Announcer | None = None
    # Seconds since the epoch: picks the window of the per-second submission limit.
    clock: Callable[[], float] = time.time
    # Open streams of this process, in all and by what they count against (server/guards.py).
    open_streams: int = 0
    streams_accepted: int = 0  # ever, each given a slot: its rate is the connect rate
    streams_by_holder: Counter[str] = field(default_factory=Counter)
    streams_refused: Counter[str] = field(default_factory=Counter)  # by limit: key, token, process
