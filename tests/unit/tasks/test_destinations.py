"""The allow-list's syntax (ports, IPv6 in brackets) and the Redis rule, as a delivery applies
them (the same check as at submit, run in the worker on what the host resolves to then)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from stepstream.tasks.destinations import Policy, Refused, parse_entry
from stepstream.tasks.settings import Settings


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("hooks.internal", ("hooks.internal", None)),
        ("hooks.internal:8443", ("hooks.internal", 8443)),
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("10.0.0.0/8:8080", ("10.0.0.0/8", 8080)),
        ("[::1]", ("::1", None)),
        ("[::1]:9000", ("::1", 9000)),
        ("fd00::/8", ("fd00::/8", None)),
    ],
)
def test_an_allow_entry_names_a_host_and_maybe_a_port(
    entry: str, expected: tuple[str, int | None]
) -> None:
    assert parse_entry(entry) == expected


@pytest.mark.parametrize("entry", ["127.0.0.1:http", "hooks:0", "[::1]9000", "[::1", ":80"])
def test_a_bad_allow_entry_stops_the_process_naming_the_setting(entry: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(webhook_allowed_hosts=f"hooks.internal,{entry}")
    assert entry in str(caught.value) and "webhook_allowed_hosts" in str(caught.value)


def check(policy: Policy, url: str) -> str:
    """ "ok", or the refusal's message."""
    try:
        asyncio.run(policy.check(url))
    except Refused as exc:
        return str(exc)
    return "ok"


def test_an_entry_with_a_port_allows_that_port_only() -> None:
    policy = Policy(["127.0.0.1:9000", "[::1]:9001", "localhost:9002"], allow_public=False)
    assert check(policy, "http://127.0.0.1:9000/hook") == "ok"
    assert "127.0.0.1:9001" in check(policy, "http://127.0.0.1:9001/hook")
    assert check(policy, "http://[::1]:9001/hook") == "ok"
    assert "[::1]:9000" in check(policy, "http://[::1]:9000/hook")
    assert check(policy, "http://localhost:9002/") == "ok"
    assert "STEPSTREAM_WEBHOOK_ALLOWED_HOSTS" in check(policy, "http://localhost:9003/")
    # Without a port, an entry allows every port, as before.
    assert check(Policy(["127.0.0.1"]), "http://127.0.0.1:1234/") == "ok"


def test_the_redis_stepstream_uses_is_never_a_target_whatever_the_allow_list_says() -> None:
    policy = Policy(
        ["127.0.0.0/8", "localhost", "::1"],
        redis_urls=["redis://localhost:6390/0", "unix:///tmp/r.sock"],
    )
    for url in (
        "http://127.0.0.1:6390/",
        "http://localhost:6390/",
        "http://[::1]:6390/",
        "http://0.0.0.0:6390/",
    ):
        assert "a Redis server Stepstream uses" in check(policy, url), url
    assert check(policy, "http://127.0.0.1:6391/") == "ok"
