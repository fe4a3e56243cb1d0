"""Recurring jobs declared in code, on a cron schedule (docs/ai-workloads.md).

    from stepstream.tasks.recurring import recurring
    recurring("nightly-report", task="generate_report", cron="0 3 * * *", input={"days": 1})

Each declaration becomes an arq cron job of every worker. At each tick exactly one worker (arq's
``unique`` cron job id is the name and the tick's time) creates an ordinary Stepstream job of the
task: its own record, its own log (the ``queued`` event says ``recurring: <name>``), retries and
cancel like any other job.

Cron syntax: five fields, ``minute hour day-of-month month day-of-week`` (``*``, ``a``, ``a-b``,
``*/n``, ``a-b/n``, lists with ``,``; day-of-week 0-7 with 0 and 7 Sunday); an optional sixth
field gives the seconds (croniter's convention), which the tests use to tick every 2 seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from arq.connections import ArqRedis
from arq.cron import CronJob, cron, next_cron
from pydantic import ValidationError

from stepstream.tasks import creation
from stepstream.tasks.creation import NewJob
from stepstream.tasks.errors import ConfigurationError
from stepstream.tasks.models import JobRecord
from stepstream.tasks.registry import TaskRegistry, default_registry
from stepstream.tasks.store import JobStore

# (name, low, high) of each field in order; the optional sixth is seconds.
_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day", 1, 31),
    ("month", 1, 12),
    ("weekday", 0, 7),
    ("second", 0, 59),
)


@dataclass(frozen=True)
class Recurring:
    name: str
    task: str
    cron: str
    input: dict[str, Any] = field(default_factory=dict)
    owner: str | None = None

    def __post_init__(self) -> None:
        self.schedules()  # a bad expression fails at import, not at the first tick

    def schedules(self) -> list[Schedule]:
        return cron_schedules(self.cron)


def recurring(
    name: str,
    *,
    task: str,
    cron: str,
    input: dict[str, Any] | None = None,
    owner: str | None = None,
    registry: TaskRegistry | None = None,
) -> Recurring:
    """Declare a recurring job (in a task module, next to its ``@task``), into ``registry``
    (``default_registry`` unless given)."""
    entry = Recurring(name, task, cron, dict(input or {}), owner)
    (default_registry if registry is None else registry).add_recurring(entry)
    return entry


Schedule = dict[str, set[int] | None]


def cron_schedules(expression: str) -> list[Schedule]:
    """The arq ``cron()`` keyword arguments that together fire when ``expression`` does.

    arq matches every field at once. Cron does too, except that when both day-of-month and
    day-of-week are restricted a day matches if EITHER does (``0 3 1,15 * 0``: the 1st, the
    15th and every Sunday). That case becomes two arq schedules, one per day field; a tick
    both match creates one job all the same, as its arq job id is the name and the time.
    """
    schedule = parse_cron(expression)
    if schedule["day"] is None or schedule["weekday"] is None:
        return [schedule]
    return [{**schedule, "weekday": None}, {**schedule, "day": None}]


def next_ticks(expression: str, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` times ``expression`` fires after ``after``, as the workers fire it."""
    schedules = cron_schedules(expression)
    ticks: list[datetime] = []
    cursor = after
    while len(ticks) < count:
        cursor = min(next_cron(cursor, **schedule) for schedule in schedules)  # type: ignore[arg-type]
        ticks.append(cursor.replace(microsecond=0))
    return ticks


def parse_cron(expression: str) -> Schedule:
    """Each field of a cron expression as the set of its values (None = every value), in
    arq's numbering."""
    parts = expression.split()
    if len(parts) not in (5, 6):
        raise ValueError(f"cron {expression!r}: expected 5 fields (or 6 with seconds)")
    schedule: dict[str, set[int] | None] = {"second": {0}}
    for part, (name, low, high) in zip(parts, _FIELDS, strict=False):
        values = _parse_field(part, low, high, expression)
        if name == "weekday" and values is not None:
            # cron counts from Sunday (0 or 7), Python's weekday() (arq's) from Monday.
            values = {(v + 6) % 7 for v in values}
        schedule[name] = values
    return schedule


def _parse_field(part: str, low: int, high: int, expression: str) -> set[int] | None:
    if part == "*":
        return None
    values: set[int] = set()
    for item in part.split(","):
        spec, _, step_text = item.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if spec == "*":
                start, end = low, high
            elif "-" in spec:
                start_text, end_text = spec.split("-", 1)
                start, end = int(start_text), int(end_text)
            else:
                start = int(spec)
                end = high if step_text else start
        except ValueError:
            raise ValueError(f"cron {expression!r}: cannot read {item!r}") from None
        if step < 1 or not low <= start <= end <= high:
            raise ValueError(f"cron {expression!r}: {item!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return values


async def create_job(
    store: JobStore, arq_redis: ArqRedis, registry: TaskRegistry, entry: Recurring
) -> JobRecord | None:
    """Create and enqueue one ordinary job for ``entry``, of ``registry``'s task it names (the
    worker side of a submission)."""
    spec = registry.get_task(entry.task)
    if spec is None:
        return None
    job = NewJob(
        spec, entry.input, owner=entry.owner, budget=spec.budget, note={"recurring": entry.name}
    )
    # Counted among the owner's unfinished jobs but never refused for them (take=0): a tick
    # declared in code is not the client flood the limit is for, and a refusal would be lost.
    created = await creation.create(store, arq_redis, job, take=0)
    return created.record if created.appended.ok else None


def check_declarations(registry: TaskRegistry) -> None:
    """Refuse (ConfigurationError) a declaration whose task is not declared or whose input
    does not fit it, so a worker fails at start rather than at every tick."""
    for entry in registry.recurring_jobs():
        spec = registry.get_task(entry.task)
        if spec is None:
            raise ConfigurationError(
                f"recurring job {entry.name!r} names task {entry.task!r}, which is not declared"
            )
        try:
            spec.check_input(entry.input)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in e['loc']) or 'input'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            raise ConfigurationError(
                f"recurring job {entry.name!r}: its input does not fit task {spec.name!r} "
                f"({problems})"
            ) from None


def cron_jobs(registry: TaskRegistry) -> list[CronJob]:
    """One arq cron job per declaration of ``registry``, for ``WorkerSettings.cron_jobs``
    (each checked first: ``check_declarations``)."""
    check_declarations(registry)
    jobs: list[CronJob] = []
    for entry in registry.recurring_jobs():

        async def fire(ctx: dict[str, Any], entry: Recurring = entry) -> str | None:
            record = await create_job(ctx["store"], ctx["redis"], ctx["registry"], entry)
            return record.id if record else None

        for schedule in entry.schedules():
            jobs.append(
                cron(
                    fire,
                    name=f"stepstream.recurring:{entry.name}",
                    unique=True,  # one job per tick, however many workers or schedules
                    keep_result=0,
                    **schedule,  # type: ignore[arg-type]
                )
            )
    return jobs
