"""What one soak saw: each submission and what it was answered, each watcher's view of a stream,
the faults injected, and the violations and notes the checks found."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Submission:
    key: str
    kind: str
    path: str
    body: dict[str, Any]
    ids: set[str] = field(default_factory=set)  # every id a 200/202 answered with
    accepted: bool = False
    gave_up: str | None = None
    tries: int = 0


@dataclass
class Watch:
    job_id: str
    start_after: str | None  # the cursor the first connect used ("0": the whole log)
    seen: list[str] = field(default_factory=list)
    terminal: bool = False
    reconnects: int = 0
    webs: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


@dataclass
class Run:
    submissions: list[Submission] = field(default_factory=list)
    watches: list[Watch] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    unexpected_exits: list[tuple[str, str]] = field(default_factory=list)  # (name, log tail)
    cancels: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The violations the summary counts by name: "gaps", "duplicates" (what watchers saw),
    # "lost" (an accepted job with no record), "stuck" (a job that never ended).
    tally: Counter[str] = field(default_factory=Counter)
    cluster: bool = False  # the log plane on a cluster: primaries are killed too

    def accepted_ids(self) -> dict[str, Submission]:
        return {i: s for s in self.submissions for i in s.ids}
