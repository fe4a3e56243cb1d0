"""Where the hub subscribes to a channel: on the one server, or on the cluster primary that
serves the channel's hash slot.

A sharded channel (``SSUBSCRIBE``) lives in a slot like a key. On a standalone server every
channel is on that server: one address, one connection. On a cluster each primary carries the
channels of its slots only, so the hub holds one connection per primary it needs, found
through the cluster client's slot map; one ``SSUBSCRIBE`` may name channels of one slot only.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

# The one server's address: a standalone server needs no other.
ONE_SERVER = ""


class Router(Protocol):
    """The hub's view of where channels live."""

    # The server the hub stays connected to with no viewer (its own channel keeps the one
    # connection of a standalone server open); None on a cluster, whose connections open as
    # channels need them.
    standing_address: str | None

    def address(self, channel: str) -> str:
        """The server holding ``channel``'s subscribers; ``LookupError`` while unknown."""
        ...

    def slot(self, channel: str) -> int:
        """Channels of one slot may share an ``SSUBSCRIBE``."""
        ...

    def connection(self, address: str) -> AbstractConnection:
        """A new connection (not connected yet) to ``address``, for pub/sub only."""
        ...

    async def refresh(self) -> None:
        """Read where channels live again (a connection dropped, a slot moved)."""
        ...

    # Whether a subscription holds only once ``verify`` has passed after its confirmation.
    verifies_subscriptions: bool

    async def check(self, connection: AbstractConnection) -> None:
        """Before a new connection subscribes: raise ``ConnectionError`` if its server is not
        one to subscribe on (the link drops it, routes its channels again and retries)."""
        ...

    async def verify(self, address: str) -> None:
        """After subscriptions were confirmed at ``address``: raise ``ConnectionError`` if its
        server is not (or is no longer) one to subscribe on."""
        ...

    async def aclose(self) -> None: ...


class OneServer:
    """A standalone server (or the primary the Sentinels name): every channel there."""

    standing_address: str | None = ONE_SERVER
    verifies_subscriptions = False

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def address(self, channel: str) -> str:
        return ONE_SERVER

    def slot(self, channel: str) -> int:
        return 0  # no slots: every channel may go in one SSUBSCRIBE

    def connection(self, address: str) -> AbstractConnection:
        # The client's own kind of connection: through Sentinel, it asks for the primary.
        connection: AbstractConnection = self.redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        return connection

    async def refresh(self) -> None:
        return None

    async def check(self, connection: AbstractConnection) -> None:
        return None  # the one server; through Sentinel, the connection asked for the primary

    async def verify(self, address: str) -> None:
        return None

    async def aclose(self) -> None:
        await self.redis.aclose()


class ClusterSlots:
    """A cluster: a channel is on the primary its slot map names for the channel's slot."""

    standing_address: str | None = None
    verifies_subscriptions = True

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self._loaded = False
        self._refreshing: asyncio.Task[None] | None = None
        # One plain connection per server the links verify (``verify``), kept between uses.
        self._verifiers: dict[str, AbstractConnection] = {}

    def address(self, channel: str) -> str:
        nodes = self.cluster.nodes_manager.slots_cache.get(self.slot(channel))
        if not self._loaded or not nodes:
            raise LookupError(f"no primary known for {channel!r}")
        return str(nodes[0].name)  # "host:port"; the primary comes first

    def slot(self, channel: str) -> int:
        return int(key_slot(channel.encode()))

    def connection(self, address: str) -> AbstractConnection:
        host, _, port = address.rpartition(":")
        # The cluster client's options for a node (TLS, credentials, timeouts), as its own
        # connections to that node get them; the node object opens nothing by itself.
        options: dict[str, Any] = dict(self.cluster.get_connection_kwargs())
        node = ClusterNode(host, int(port), **options)
        connection: AbstractConnection = node.connection_class(**node.connection_kwargs)
        return connection

    async def check(self, connection: AbstractConnection) -> None:
        """A primary only. A replica takes ``SSUBSCRIBE`` for its primary's slots and hears
        their messages through replication, but only once its sync has begun: a killed
        primary restarted at its old address (where a slot map read before the failover
        sends the hub) is a replica that hears nothing of what its new primary publishes
        until then, while the streams, their subscription confirmed, have caught up from the
        log already. Those events would never reach them."""
        await _primary_only(connection)

    async def verify(self, address: str) -> None:
        """``check`` again, once the subscriptions are confirmed. A killed primary restarted
        at its old address claims its slots for a moment, until the cluster tells it they
        were taken over: the ``check`` before subscribing can pass, and the ``SSUBSCRIBE``
        land once it is a replica that hears nothing yet. A server that is a primary after
        the confirmation was one at it (or a replica promoted since, which hears its slots
        from then on); one that stops being a primary later unsubscribes its channels."""
        connection = self._verifiers.pop(address, None)
        if connection is None:
            connection = self.connection(address)
        try:
            await _primary_only(connection)  # connects on first use
        except BaseException:
            await connection.disconnect()
            raise
        self._verifiers[address] = connection

    async def refresh(self) -> None:
        """One reading of the slot map at a time, shared by whoever asks meanwhile."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh(), name="hub-slot-map")
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        # The slot map alone (CLUSTER SLOTS from the first node that answers): the hub sends
        # no command through the client, so it needs none of the rest of its setup.
        await self.cluster.nodes_manager.initialize()
        self._loaded = True

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for connection in self._verifiers.values():
            await connection.disconnect()
        self._verifiers.clear()
        manager = self.cluster.nodes_manager
        await manager.aclose()
        await manager.aclose("startup_nodes")


async def _primary_only(connection: AbstractConnection) -> None:
    await connection.send_command("ROLE", check_health=False)
    role = await connection.read_response()
    kind = role[0] if isinstance(role, list) and role else role
    if isinstance(kind, bytes):
        kind = kind.decode()
    if kind != "master":
        raise ConnectionError(f"the node is a {kind}, not a primary")
