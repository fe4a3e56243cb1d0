"""Where a webhook may be sent: the operator's rules for ``callback_url``.

A callback URL comes from whoever holds an API key, and the worker that POSTs to it sits inside
the deployment's network, so by default it may only reach public addresses: never loopback,
private, link-local (the cloud metadata service at 169.254.169.254), CGNAT, multicast or
reserved ones, nor an IPv6 address that wraps one of those. ``STEPSTREAM_WEBHOOK_ALLOWED_HOSTS``
lets an operator allow host names, addresses or networks anyway, and
``STEPSTREAM_WEBHOOK_ALLOW_PUBLIC=false`` restricts callbacks to those alone.

The rules are applied twice: at submit time (a refused URL is a 422 and nothing is stored) and
at every delivery, on the addresses the host resolves to then, since DNS can change between the
two. The delivery then connects to the address that was checked, not to a second lookup's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from stepstream.tasks.settings import Settings

MAX_URL_LENGTH = 2_048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class Refused(Exception):
    """The URL may not be called; the message says why, to the person who gave it."""


class Unresolvable(Refused):
    """The host does not resolve (now: a delivery tries again later)."""


@dataclass(frozen=True)
class Target:
    """A URL that passed the rules, with the address it resolved to and was checked at."""

    url: str
    host: str
    address: str


def is_public(address: IPAddress) -> bool:
    """Whether ``address`` is on the public internet (an IPv6 wrapper of IPv4 is unwrapped)."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in _NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return is_public(inner)
    return address.is_global and not (address.is_multicast or address.is_reserved)


def parse_url(url: object) -> SplitResult:
    """The URL's parts, if it is an absolute http(s) URL without credentials (else Refused)."""
    if not isinstance(url, str):
        raise Refused("must be a string holding an http(s) URL")
    if not url or len(url) > MAX_URL_LENGTH:
        raise Refused(f"must be an http(s) URL of 1 to {MAX_URL_LENGTH} characters")
    if not url.isascii() or not url.isprintable() or " " in url:
        raise Refused("must be an http(s) URL without spaces or non-ASCII characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise Refused("is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise Refused("must be an http:// or https:// URL")
    if not parts.hostname:
        raise Refused("has no host")
    if parts.username is not None or parts.password is not None:
        raise Refused("may not carry credentials: the delivery is signed instead")
    return parts


class Policy:
    """The operator's rules, from ``STEPSTREAM_WEBHOOK_ALLOWED_HOSTS`` and ``_ALLOW_PUBLIC``."""

    def __init__(self, allowed_hosts: str = "", *, allow_public: bool = True) -> None:
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (e.strip() for e in allowed_hosts.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.add(entry.lower().rstrip("."))
        self.names = frozenset(names)
        self.networks = tuple(networks)
        self.allow_public = allow_public

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(settings.webhook_allowed_hosts, allow_public=settings.webhook_allow_public)

    def allows_address(self, address: IPAddress) -> bool:
        if any(address in network for network in self.networks):
            return True
        return self.allow_public and is_public(address)

    async def check(self, url: object) -> Target:
        """``url`` resolved, and every address it resolves to allowed (else Refused).

        An allowed host name may resolve to anything; any other name must resolve only to
        addresses the rules allow: one internal address among public ones is refused.
        """
        parts = parse_url(url)
        assert isinstance(url, str) and parts.hostname is not None
        host = parts.hostname.rstrip(".")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            if not self.allows_address(literal):
                raise Refused(f"points at {literal}, an address webhooks may not reach")
            return Target(url, host, str(literal))
        addresses = await resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
        if host not in self.names:
            refused = [a for a in addresses if not self.allows_address(a)]
            if refused:
                raise Refused(
                    f"host {host!r} resolves to {refused[0]}, which webhooks may not reach"
                )
        return Target(url, host, str(addresses[0]))


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses ``host`` resolves to (Refused when it does not)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise Unresolvable(f"host {host!r} does not resolve") from None
    addresses: list[IPAddress] = []
    for _, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise Unresolvable(f"host {host!r} does not resolve")
    return addresses
