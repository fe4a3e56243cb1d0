"""server/options.py: a submission's options (budget, run_at/delay, callback_url) or a 422."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from stepstream.server.api_errors import ApiError
from stepstream.server.options import SubmitOptions, parse_submit_options
from stepstream.tasks.settings import Settings

SETTINGS = Settings(max_delay_seconds=3_600)


def parse(**body: Any) -> SubmitOptions:
    return parse_submit_options({"task": "t", "input": {}, **body}, SETTINGS)


def refused(**body: Any) -> ApiError:
    with pytest.raises(ApiError) as raised:
        parse(**body)
    assert raised.value.status == 422
    return raised.value


def test_no_options_is_run_now_and_adds_nothing_to_the_fingerprint() -> None:
    options = parse()
    assert options == SubmitOptions()
    assert options.run_at is None and options.fingerprint() == {}


def test_a_delay_is_a_time_from_now_and_the_fingerprint_keeps_the_delay() -> None:
    before = datetime.now(UTC)
    options = parse(delay=30)
    after = datetime.now(UTC)
    assert options.run_at is not None
    assert before + timedelta(seconds=30) <= options.run_at <= after + timedelta(seconds=30)
    # The same request sent again later is the same request: the delay, not the time.
    assert options.fingerprint() == {"delay": 30.0}
    assert parse(delay=0).run_at is None


@pytest.mark.parametrize("delay", [-1, "soon", True, float("inf"), 3_601, 10**400])
def test_a_delay_out_of_range_or_not_a_number_is_refused_naming_the_limit(delay: Any) -> None:
    error = refused(delay=delay)
    assert error.code == "invalid_body" and "`delay`" in error.message


def test_run_at_takes_rfc3339_with_a_zone_and_is_kept_in_utc() -> None:
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)
    local = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + "Z"
    options = parse(run_at=local)
    assert options.run_at == when
    assert options.run_at_text == when.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    plus_two = (when + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S") + "+02:00"
    assert parse(run_at=plus_two).run_at == when
    assert parse(run_at=local.lower()).run_at == when  # "t" and "z" as RFC 3339 allows


def test_a_run_at_in_the_past_means_now() -> None:
    assert parse(run_at="2001-01-01T00:00:00Z").run_at is None


@pytest.mark.parametrize(
    ("run_at", "says"),
    [
        ("tomorrow", "RFC 3339"),
        ("2030-01-01", "RFC 3339"),
        (20300101, "RFC 3339"),
        ("2030-01-01T09:00:00", "needs a zone"),
        ("0001-01-01T00:00:00+01:00", "RFC 3339"),
        ("2999-01-01T00:00:00Z", "more than 3600 seconds away"),
    ],
)
def test_a_bad_run_at_is_refused_saying_why(run_at: Any, says: str) -> None:
    assert says in refused(run_at=run_at).message


def test_run_at_and_delay_together_are_refused() -> None:
    assert "not both" in refused(run_at="2030-01-01T09:00:00Z", delay=5).message


@pytest.mark.parametrize("budget", [-0.01, "1", None, True])
def test_a_budget_must_be_a_number_of_at_least_zero(budget: Any) -> None:
    if budget is None:
        assert parse(budget=None).budget is None  # absent and null are the same
        return
    assert "`budget`" in refused(budget=budget).message


def test_a_budget_is_kept_and_fingerprinted() -> None:
    options = parse(budget=0.5)
    assert options.budget == 0.5 and options.fingerprint() == {"budget": 0.5}
