"""The Lua scripts the job side runs in Redis, shipped as files in tasks/scripts/ (package data).

Each script declares every key it touches in ``KEYS`` and builds no key name itself, so that what
it touches can be checked: by ACLs, and on a cluster, where one call's keys must share a slot.
A script may begin with shared functions (``resume_parent.lua``), put before it here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, KeyT


@cache
def source(name: str, *prelude: str) -> str:
    """The text of ``scripts/<name>``, after the text of each file in ``prelude``."""
    folder = files("stepstream.tasks").joinpath("scripts")
    return "\n".join(folder.joinpath(part).read_text(encoding="utf-8") for part in (*prelude, name))


def append() -> str:
    """The one atomic append of a job's events (tasks/scripts/append.lua; tasks/store.py)."""
    return source("append.lua", "resume_parent.lua")


def resume() -> str:
    """A waiting parent's queue entry, written if it is ready (tasks/scripts/resume.lua;
    tasks/children.py)."""
    return source("resume.lua", "resume_parent.lua")


def reserve() -> str:
    """An owner's places under its limits on a cluster (tasks/scripts/reserve.lua)."""
    return source("reserve.lua")


class Script(AsyncScript):
    """A script run by its SHA1 or, where the server has not cached it, by its body.

    A promoted replica has none of its old primary's cached scripts: Valkey does not replicate
    the cache. redis-py's own answer to ``NOSCRIPT`` loads the script on every primary its
    cluster client's slot map knows, then runs it by SHA1 again; while that map still has the
    promoted node as a replica, the load misses it and every try fails the same way (jobs of a
    task with a concurrency limit never started after a failover, found by ``bench.chaos
    --cluster``). ``EVAL`` goes where the keys are, and caches the script there. In a pipeline
    (or a transaction), redis-py loads the scripts on the pipeline's own server first.
    """

    async def __call__(
        self,
        keys: Sequence[KeyT] | None = None,
        args: Iterable[EncodableT] | None = None,
        client: Any = None,
    ) -> Any:
        client = self.registered_client if client is None else client
        if not isinstance(client, (Redis, RedisCluster)) or isinstance(client, Pipeline):
            return await super().__call__(keys, args, client)
        words = [len(keys or ()), *(keys or ()), *(args or ())]
        try:
            return await client.execute_command("EVALSHA", self.sha, *words)
        except NoScriptError:
            return await client.execute_command("EVAL", self.script, *words)
