"""Schemathesis hooks for tests/test_contract.py (loaded by ``st run`` through its config)."""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import schemathesis

# The one callback host the fuzz stack allows (STEPSTREAM_WEBHOOK_ALLOWED_HOSTS): loopback, on a
# port nothing listens on, so a delivery fails at once and never leaves the machine.
CALLBACK_HOST = "127.0.0.9:9"


def _local(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return url
    if not host:
        return url
    try:
        ipaddress.ip_address(host)
        return url  # an address literal needs no DNS, and only the allowed one is reached
    except ValueError:
        pass
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{CALLBACK_HOST}"))


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Point every ``callback_url`` host name at loopback: the server resolves a callback's
    name when it accepts the job, and a name the fuzzer made up would be a DNS query leaving
    the machine (sometimes answered after the server's 5 s limit)."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("callback_url"), str):
        body["callback_url"] = _local(body["callback_url"])
