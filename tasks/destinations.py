"""Where a webhook may be sent: the operator's rules for ``callback_url``.

A callback URL comes from whoever holds an API key, and the worker that POSTs to it sits inside
the deployment's network, so by default it may only reach public addresses: never loopback,
private, link-local (the cloud metadata service at 169.254.169.254), CGNAT, multicast or
reserved ones, nor an IPv6 address that wraps one of those. ``STEPSTREAM_WEBHOOK_ALLOWED_HOSTS``
lets an operator allow host names, addresses or networks anyway, each on one port or on all,
and ``STEPSTREAM_WEBHOOK_ALLOW_PUBLIC=false`` restricts callbacks to those alone. The Redis
servers Stepstream uses are refused whatever the rules say: allowing a host for its receiver
must not let a callback POST to the Valkey beside it.

The rules are applied twice: at submit time (a refused URL is a 422 and nothing is stored) and
at every delivery, on the addresses the host resolves to then, since DNS can change between the
two. The delivery then connects to the address that was checked, not to a second lookup's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

if TYPE_CHECKING:  # the settings validate allow-list entries with parse_entry
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


ALLOWED_HOSTS = "STEPSTREAM_WEBHOOK_ALLOWED_HOSTS"
ALLOW_PUBLIC = "STEPSTREAM_WEBHOOK_ALLOW_PUBLIC"


def parse_entry(entry: str) -> tuple[str, int | None]:
    """An allow-list entry's host (a name, an address or a network) and its port (None: any).

    ``host``, ``host:port``, ``10.0.0.0/8:8080``, ``[::1]``, ``[::1]:8080``; a bare IPv6
    address or network (``fd00::/8``) has no port. ValueError for anything else.
    """
    if entry.startswith("["):
        inner, closed, rest = entry[1:].partition("]")
        if not closed or not inner:
            raise ValueError(f"{entry!r}: an IPv6 entry is [address] or [address]:port")
        if not rest:
            return inner, None
        if not rest.startswith(":"):
            raise ValueError(f"{entry!r}: an IPv6 entry is [address] or [address]:port")
        return inner, _port(entry, rest[1:])
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if not host:
            raise ValueError(f"{entry!r} names no host")
        return host, _port(entry, port)
    return entry, None


def _port(entry: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65_536:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return int(text)


def redis_endpoints(urls: Iterable[str]) -> list[tuple[str, int]]:
    """The TCP host and port of each Redis URL (a Unix socket has none)."""
    endpoints: list[tuple[str, int]] = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in ("redis", "rediss", "valkey", "valkeys") and parts.hostname:
            try:
                endpoints.append((parts.hostname.rstrip("."), parts.port or 6379))
            except ValueError:
                continue  # not a URL Redis could be reached at either
    return endpoints


def _where(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _unwrapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _same_machine(a: IPAddress, b: IPAddress) -> bool:
    """Whether a connection to ``a`` may reach a server listening on ``b``: the same address,
    or both this machine (any loopback address, or the unspecified one, which connects here)."""
    a, b = _unwrapped(a), _unwrapped(b)
    if (a.is_loopback or a.is_unspecified) and (b.is_loopback or b.is_unspecified):
        return True
    return a == b


class Policy:
    """The operator's rules, from ``STEPSTREAM_WEBHOOK_ALLOWED_HOSTS`` and ``_ALLOW_PUBLIC``,
    and the one rule no setting lifts: the Redis servers Stepstream uses are never a target
    (allowing 127.0.0.1 for a receiver must not open the Valkey port on it)."""

    def __init__(
        self,
        allowed_hosts: Iterable[str] = (),
        *,
        allow_public: bool = True,
        redis_urls: Iterable[str] = (),
    ) -> None:
        names: dict[str, set[int] | None] = {}
        networks: list[tuple[IPNetwork, int | None]] = []
        for entry in allowed_hosts:
            host, port = parse_entry(entry)
            try:
                networks.append((ipaddress.ip_network(host, strict=False), port))
            except ValueError:
                name = host.lower().rstrip(".")
                ports = names.get(name, set())
                if port is None or ports is None:
                    names[name] = None  # an entry without a port: any port
                else:
                    names[name] = ports | {port}
        self.names = names
        self.networks = tuple(networks)
        self.allow_public = allow_public
        self.redis = redis_endpoints(redis_urls)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            settings.webhook_allowed_hosts,
            allow_public=settings.webhook_allow_public,
            redis_urls=settings.redis_urls,
        )

    def allows_name(self, host: str, port: int) -> bool:
        if host not in self.names:
            return False
        ports = self.names[host]
        return ports is None or port in ports

    def allows_address(self, address: IPAddress, port: int) -> bool:
        if any(address in net and allowed in (None, port) for net, allowed in self.networks):
            return True
        return self.allow_public and is_public(address)

    def _not_allowed(self, address: IPAddress, port: int) -> str:
        if is_public(address):  # refused only because public addresses are off
            return f"{ALLOW_PUBLIC} is false and {ALLOWED_HOSTS} does not allow it"
        return f"an address webhooks may not reach unless {ALLOWED_HOSTS} allows it"

    async def check(self, url: object) -> Target:
        """``url`` resolved, and every address it resolves to allowed (else Refused).

        An allowed host name may resolve to anything; any other name must resolve only to
        addresses the rules allow: one internal address among public ones is refused. Allow
        entries with a port allow that port only. A Redis server of Stepstream's own is
        refused whatever the rules say.
        """
        parts = parse_url(url)
        assert isinstance(url, str) and parts.hostname is not None
        host = parts.hostname.rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        addresses = [literal] if literal is not None else await resolve(host, port)
        await self._refuse_redis(addresses, port)
        if literal is not None:
            if not self.allows_address(literal, port):
                where = _where(literal, port)
                raise Refused(f"points at {where}, {self._not_allowed(literal, port)}")
            return Target(url, host, str(literal))
        if not self.allows_name(host.lower(), port):
            refused = [a for a in addresses if not self.allows_address(a, port)]
            if refused:
                where = _where(refused[0], port)
                raise Refused(
                    f"host {host!r} resolves to {where}, {self._not_allowed(refused[0], port)}"
                )
        return Target(url, host, str(addresses[0]))

    async def _refuse_redis(self, addresses: list[IPAddress], port: int) -> None:
        for redis_host, redis_port in self.redis:
            if redis_port != port:
                continue
            try:
                redis_addresses = [ipaddress.ip_address(redis_host.strip("[]"))]
            except ValueError:
                try:
                    redis_addresses = await resolve(redis_host, redis_port)
                except Unresolvable:
                    continue
            for address in addresses:
                if any(_same_machine(address, r) for r in redis_addresses):
                    raise Refused(
                        f"points at {_where(address, port)}, a Redis server Stepstream uses "
                        "(REDIS_URL): webhooks may never reach it, whatever "
                        f"{ALLOWED_HOSTS} says"
                    )


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
