"""tasks/recurring.py: cron expressions, read and stepped through as the workers fire them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from stepstream.tasks.recurring import next_ticks

# A Wednesday.
START = datetime(2030, 1, 2, 10, 7, 30, tzinfo=UTC)


def ticks(expression: str, count: int = 3, after: datetime = START) -> list[str]:
    return [t.strftime("%a %d %H:%M:%S") for t in next_ticks(expression, after, count)]


def test_every_quarter_hour() -> None:
    assert ticks("*/15 * * * *") == ["Wed 02 10:15:00", "Wed 02 10:30:00", "Wed 02 10:45:00"]


def test_lists_and_ranges_of_hours() -> None:
    assert ticks("0 9-11,17 * * *", 4) == [
        "Wed 02 11:00:00",
        "Wed 02 17:00:00",
        "Thu 03 09:00:00",
        "Thu 03 10:00:00",
    ]


def test_a_daily_time_starts_tomorrow_once_today_s_is_past() -> None:
    assert ticks("0 3 * * *", 2) == ["Thu 03 03:00:00", "Fri 04 03:00:00"]


@pytest.mark.parametrize("sunday", ["0", "7"])
def test_day_of_week_counts_from_sunday_as_0_or_7(sunday: str) -> None:
    assert ticks(f"30 8 * * {sunday}", 2) == ["Sun 06 08:30:00", "Sun 13 08:30:00"]
    assert ticks("30 8 * * 1-5", 3) == ["Thu 03 08:30:00", "Fri 04 08:30:00", "Mon 07 08:30:00"]


def test_a_sixth_field_is_seconds() -> None:
    assert ticks("0 8 * * * 45", 1) == ["Thu 03 08:00:45"]


def test_a_tick_is_strictly_after_the_given_time() -> None:
    at_a_tick = datetime(2030, 1, 2, 10, 15, tzinfo=UTC)
    assert ticks("*/15 * * * *", 1, at_a_tick) == ["Wed 02 10:30:00"]


@pytest.mark.parametrize(
    "expression",
    [
        "",
        "* * * *",
        "* * * * * * *",
        "60 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "* * * * 8",
        "a * * * *",
        "*/0 * * * *",
        "5-2 * * * *",
        "1,,2 * * * *",
    ],
)
def test_a_bad_expression_is_refused_naming_it(expression: str) -> None:
    with pytest.raises(ValueError, match="cron"):
        next_ticks(expression, START, 1)
