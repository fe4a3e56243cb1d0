"""A staffing quote in six steps: roles, salary bands, contributions, tier, workspace, breakdown."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, Field

from stepstream.tasks.context import TaskContext
from stepstream.tasks.demo.options import DemoOptions, checkpoint, paced_progress
from stepstream.tasks.errors import JobCancelled, PermanentError
from stepstream.tasks.registry import task

STEPS = [
    "Parsing roles",
    "Looking up salary bands",
    "Computing contributions",
    "Applying tier multiplier",
    "Adding workspace cost",
    "Formatting breakdown",
]
Level = Literal["junior", "mid", "senior"]


@lru_cache(maxsize=1)
def salary_table() -> dict[str, Any]:
    text = resources.files("stepstream.tasks.demo").joinpath("salary_bands.json").read_text()
    table: dict[str, Any] = json.loads(text)
    return table


class Role(BaseModel):
    role: str = Field(min_length=1, max_length=100, examples=["ml_engineer"])
    level: Level = "mid"
    count: int = Field(default=1, ge=1, le=100)
    allocation: float = Field(default=1.0, gt=0, le=1.0, description="Share of full time")


class QuoteInput(DemoOptions):
    client: str = Field(default="Acme", min_length=1, max_length=200)
    roles: list[Role] = Field(min_length=1, max_length=50)
    weeks: int = Field(ge=1, le=260)
    tier: Literal["standard", "priority", "enterprise"] = "standard"
    workspace: Literal["remote", "hybrid", "office"] = "remote"
    review: bool = Field(
        default=False,
        description="Wait for a person's approval (input `approval`) before the breakdown",
    )


class Approval(BaseModel):
    """The reviewer's decision on a quote's costs (the input ``approval``)."""

    approved: bool = Field(description="Go on and format the breakdown")
    note: str = Field(default="", max_length=2_000, description="Why; the reason if rejected")


class LineItem(BaseModel):
    role: str
    level: Level
    count: int
    salary_cost: float
    contributions: float
    subtotal: float


class QuoteOutput(BaseModel):
    client: str
    currency: str
    weeks: int
    line_items: list[LineItem]
    people_cost: float
    tier: str
    tier_multiplier: float
    workspace_cost: float
    total: float
    breakdown: list[str]


@task(
    "generate_quote",
    title="Generate a staffing quote",
    description="Prices a team from salary bands, employer contributions, a service tier and "
    "workspace costs, and formats the breakdown.",
    steps=STEPS,
    input=QuoteInput,
    output=QuoteOutput,
    max_attempts=3,
    timeout=300,
    sample_input={
        "client": "Acme Analytics",
        "roles": [
            {"role": "ml_engineer", "level": "senior", "count": 2},
            {"role": "data_scientist", "level": "mid", "count": 1},
            {"role": "product_designer", "level": "mid", "count": 1, "allocation": 0.5},
        ],
        "weeks": 12,
        "tier": "priority",
        "workspace": "hybrid",
        "pace": 0.5,
    },
)
async def generate_quote(ctx: TaskContext, data: QuoteInput) -> QuoteOutput:
    """Quote the cost of a team for a number of weeks; every step is checkpointed."""
    table = salary_table()
    bands: dict[str, dict[str, float]] = table["bands"]
    week_share = data.weeks / table["working_weeks_per_year"]
    currency: str = table["currency"]

    async def parse_roles() -> int:
        await checkpoint(ctx, data, STEPS[0])
        unknown = sorted({r.role for r in data.roles} - bands.keys())
        if unknown:
            raise PermanentError(
                f"unknown role(s) {', '.join(unknown)}; known: {', '.join(sorted(bands))}"
            )
        return sum(r.count for r in data.roles)

    await ctx.run_step(
        STEPS[0], parse_roles, output=lambda n: {"roles": len(data.roles), "headcount": n}
    )

    async def look_up_salaries() -> list[float]:
        await checkpoint(ctx, data, STEPS[1])
        salaries: list[float] = []
        for i, r in enumerate(data.roles, start=1):
            salaries.append(bands[r.role][r.level] * week_share * r.count * r.allocation)
            await paced_progress(ctx, data, i, len(data.roles), f"Priced {i} of {len(data.roles)}")
        return salaries

    salaries = await ctx.run_step(
        STEPS[1], look_up_salaries, output=lambda s: {"salaries": round(sum(s), 2)}
    )

    async def compute_contributions() -> list[LineItem]:
        await checkpoint(ctx, data, STEPS[2])
        rate = table["employer_contribution_rate"]
        return [
            LineItem(
                role=r.role,
                level=r.level,
                count=r.count,
                salary_cost=round(s, 2),
                contributions=round(s * rate, 2),
                subtotal=round(s * (1 + rate), 2),
            )
            for r, s in zip(data.roles, salaries, strict=True)
        ]

    items = await ctx.run_step(
        STEPS[2], compute_contributions, output=lambda i: {"people_cost": people_cost_of(i)}
    )
    people_cost = people_cost_of(items)

    multiplier: float = table["tiers"][data.tier]

    async def apply_tier() -> float:
        await checkpoint(ctx, data, STEPS[3])
        return round(people_cost * multiplier, 2)

    tiered = await ctx.run_step(STEPS[3], apply_tier, output=lambda _: {"multiplier": multiplier})
    per_person_week: float = table["workspace_per_person_week"][data.workspace]

    async def add_workspace() -> float:
        await checkpoint(ctx, data, STEPS[4])
        people = sum(r.count * r.allocation for r in data.roles)
        return round(people * data.weeks * per_person_week, 2)

    workspace_cost = await ctx.run_step(
        STEPS[4], add_workspace, output=lambda c: {"workspace_cost": c}
    )

    if data.review:
        # Steps 1 to 5 are checkpoints: the run after the answer restores them, not redoes them.
        approval = await ctx.wait_for_input(
            "approval",
            schema=Approval,
            prompt=f"Approve the costs for {data.client}: "
            f"{tiered + workspace_cost:,.2f} {currency} before the breakdown?",
        )
        if not approval.approved:
            raise JobCancelled(approval.note or "the quote was rejected")

    async def format_breakdown() -> QuoteOutput:
        await checkpoint(ctx, data, STEPS[5])
        total = round(tiered + workspace_cost, 2)
        lines = [f"{i.count} × {i.level} {i.role}: {i.subtotal:,.2f} {currency}" for i in items]
        lines.append(f"Tier {data.tier} × {multiplier}: {tiered:,.2f} {currency}")
        lines.append(f"Workspace ({data.workspace}): {workspace_cost:,.2f} {currency}")
        lines.append(f"Total for {data.weeks} weeks: {total:,.2f} {currency}")
        return QuoteOutput(
            client=data.client,
            currency=currency,
            weeks=data.weeks,
            line_items=items,
            people_cost=people_cost,
            tier=data.tier,
            tier_multiplier=multiplier,
            workspace_cost=workspace_cost,
            total=total,
            breakdown=lines,
        )

    return await ctx.run_step(
        STEPS[5], format_breakdown, output=lambda q: {"total": q.total, "currency": q.currency}
    )


def people_cost_of(items: list[LineItem]) -> float:
    return round(sum(i.subtotal for i in items), 2)
