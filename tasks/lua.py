"""The Lua scripts the job side runs in Redis, shipped as files in tasks/scripts/ (package data).

Each script declares every key it touches in ``KEYS`` and builds no key name itself, so that what
it touches can be checked: by ACLs, and on a cluster, where one call's keys must share a slot.
A script may begin with shared functions (``resume_parent.lua``), put before it here.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files


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
