"""One pub/sub connection of the hub to one server, and the channels subscribed over it.

A link sends the ``SSUBSCRIBE`` and ``SUNSUBSCRIBE`` commands of the channels routed to it, in
order, and matches each confirmation to the subscription that asked for it; it reads the
messages and hands them to its hub in batches. Each (re)connection subscribes to every channel
routed to it, then to the hub's own channel (``SUBSCRIBE``): that confirmation, answered last,
says every subscription of the connection holds.

When the connection drops, the link tells its hub (whose streams catch up from the log once
their channel holds again), waits, lets the hub route its channels again (on a cluster a
replica may have taken the slots over), and connects again while it still has channels or
is the hub's standing connection. A server that stops serving a channel's slot unsubscribes
it by itself; the link tells the hub, which subscribes to it where it lives now.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection

from stepstream._backoff import Backoff
from stepstream.server.shards import Router

logger = logging.getLogger("stepstream.hub")

MAX_BATCH = 100  # messages already received, handed to the hub together
# Replies held while a confirmation awaits its verification (one round trip): past this, the
# connection is dropped and subscribed afresh rather than held without bound.
MAX_HELD = 10_000
# Between attempts to reconnect; jittered so that the web processes of a deployment do not all
# come back to a restarted server in the same instant.
RECONNECT_BACKOFF = Backoff(min_seconds=0.1, max_seconds=5.0, jitter=0.5)

SUBSCRIBE = "SSUBSCRIBE"
UNSUBSCRIBE = "SUNSUBSCRIBE"


class LinkOwner(Protocol):
    """The hub, as its links see it."""

    hub_channel: str
    subscribe_delay_seconds: float

    def ready(self, channel: str) -> asyncio.Future[None]: ...

    def dispatch_many(self, messages: list[tuple[str, str]]) -> None: ...

    def confirmed(self, channel: str) -> None: ...

    def link_up(self, link: Link) -> None: ...

    def link_down(self, link: Link) -> None: ...

    def moved(self, link: Link, channel: str) -> None: ...

    async def reroute(self, link: Link) -> None: ...

    def link_ended(self, link: Link) -> None: ...


class Link:
    """The hub's connection to the server at ``address`` (``ONE_SERVER`` on a standalone)."""

    def __init__(self, owner: LinkOwner, router: Router, address: str, *, standing: bool) -> None:
        self.owner = owner
        self.router = router
        self.address = address
        # A standing link stays connected with no channel (the standalone server's); another
        # ends once its channels have all moved elsewhere.
        self.standing = standing
        self.channels: set[str] = set()  # routed here, subscribed or not yet
        self.up = False  # every subscription of the current connection confirmed
        self.was_up = False
        # Took over the channels of a connection lost elsewhere (a dead primary's, now on its
        # replica): its coming up is a reconnection.
        self.recovering = False
        self._failures = 0  # connections lost in a row
        # The SSUBSCRIBEs sent on the current connection and not yet confirmed, by channel, in
        # the order sent: the server confirms them in that order, so an unsubscribe still in
        # flight (then a new viewer's SSUBSCRIBE) can never be taken for the new confirmation.
        self._acks: dict[str, deque[asyncio.Future[None]]] = {}
        # SUNSUBSCRIBEs sent and not yet answered, by channel: an answer beyond them is the
        # server's own (the channel's slot has moved).
        self._leaving: dict[str, int] = {}
        # Commands to send, in order: (command, slot, channels); one task sends them (_send).
        self._outbox: list[tuple[str, int, list[str]]] = []
        self._last_of_slot: dict[tuple[str, int], int] = {}
        self._connection: AbstractConnection | None = None  # the current one, once it is up
        self._sender: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # Confirmations received and held until the router has verified the server after them
        # (on a cluster: still a primary), with the messages received after them, in the order
        # received; one task verifies them.
        self._unverified: list[list[Any]] = []
        self._verifier: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"hub-link {self.address}")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, self._sender, self._verifier) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- channels ---------------------------------------------------------------------------

    def join(self, channel: str, ready: asyncio.Future[None]) -> None:
        """Subscribe to ``channel``; ``ready`` is done once the server has confirmed it (now,
        or on the next connection)."""
        self.channels.add(channel)
        if self._connection is not None:
            self._acks.setdefault(channel, deque()).append(ready)
            self._command(SUBSCRIBE, channel)

    def leave(self, channel: str) -> None:
        self.channels.discard(channel)
        if self._connection is not None:
            self._leaving[channel] = self._leaving.get(channel, 0) + 1
            self._command(UNSUBSCRIBE, channel)

    def release(self, channel: str) -> None:
        """``channel`` is subscribed elsewhere from now on (the server dropped it, or its slot
        moved): forget it here without a command."""
        self.channels.discard(channel)
        self._acks.pop(channel, None)

    def _command(self, command: str, channel: str) -> None:
        # A run of one command for one slot goes as one: a thousand streams opening on a
        # standalone server send one SSUBSCRIBE. Per slot, the order of commands is kept.
        slot = self.router.slot(channel)
        outbox = self._outbox
        last = self._last_of_slot.get((command, slot))
        if last is not None and self._last_of_slot.get((_other(command), slot), -1) < last:
            outbox[last][2].append(channel)
        else:
            self._last_of_slot[(command, slot)] = len(outbox)
            outbox.append((command, slot, [channel]))
        if self._sender is None and self._connection is not None:
            self._sender = asyncio.create_task(self._send(self._connection), name="hub-send")

    async def _send(self, connection: AbstractConnection) -> None:
        """Send the queued commands in order: the order their confirmations are matched in."""
        try:
            while self._outbox and self._connection is connection:
                batch, self._outbox, self._last_of_slot = self._outbox, [], {}
                delay = self.owner.subscribe_delay_seconds
                if delay and any(c == SUBSCRIBE for c, _, _ in batch):
                    await asyncio.sleep(delay)  # the test hook: a slow network
                commands = [(command, *channels) for command, _, channels in batch]
                # No health check: it would read a PING's answer under the listener's reads.
                await connection.send_packed_command(
                    connection.pack_commands(commands), check_health=False
                )
        except Exception as exc:
            # The listener notices the closed connection, reconnects and subscribes afresh.
            logger.warning("hub: could not send a subscription (%s); reconnecting", exc)
            await connection.disconnect()
        finally:
            if self._connection is connection:
                self._sender = None

    # -- the connection -----------------------------------------------------------------------

    def _connected(self, connection: AbstractConnection) -> None:
        """A new connection: subscribe to every channel routed here, slot by slot, then to the
        hub's own channel."""
        self._connection = connection
        self._acks = {channel: deque([self.owner.ready(channel)]) for channel in self.channels}
        self._leaving = {}
        by_slot: dict[int, list[str]] = {}
        for channel in self.channels:
            by_slot.setdefault(self.router.slot(channel), []).append(channel)
        self._outbox = [(SUBSCRIBE, slot, channels) for slot, channels in by_slot.items()]
        self._outbox.append(("SUBSCRIBE", -1, [self.owner.hub_channel]))
        self._last_of_slot = {}
        self._sender = asyncio.create_task(self._send(connection), name="hub-send")

    def _disconnected(self) -> None:
        """The connection is gone: no subscription holds until the next one confirms it."""
        self.up = False
        self._connection = None
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        self._outbox = []
        self._last_of_slot = {}
        self._acks = {}
        self._leaving = {}
        if self._verifier is not None:
            self._verifier.cancel()
            self._verifier = None
        self._unverified = []  # the dead connection's: its channels are subscribed afresh
        self.owner.link_down(self)

    def _confirmed(self, channel: str) -> None:
        acks = self._acks.get(channel)
        if acks:
            ready = acks.popleft()
            if not acks:
                del self._acks[channel]
            if not ready.done():
                ready.set_result(None)
        if channel in self.channels:  # not moved elsewhere while its confirmation was verified
            self.owner.confirmed(channel)

    def _unsubscribed(self, channel: str) -> None:
        leaving = self._leaving.get(channel, 0)
        if leaving > 1:
            self._leaving[channel] = leaving - 1
        elif leaving == 1:
            del self._leaving[channel]
        elif channel in self.channels:
            # Not asked for: this server no longer serves the channel's slot.
            logger.info("hub: %s dropped %s (its slot moved); resubscribing", self.address, channel)
            self.release(channel)
            self.owner.moved(self, channel)

    def _handle(self, reply: Any, batch: list[tuple[str, str]]) -> None:
        kind = reply[0]
        if self._unverified and kind != "sunsubscribe":
            # After a confirmation still held: a message must not reach a stream before the
            # confirmation's catch-up does (it would move the stream's cursor past the events
            # that catch-up is for).
            if len(self._unverified) >= MAX_HELD:
                raise ConnectionError("too many replies held for a verification")
            self._unverified.append(reply)
        elif kind == "smessage":
            batch.append((reply[1], reply[2]))
        elif kind == "sunsubscribe":
            self._unsubscribed(reply[1])
        elif kind == "ssubscribe" or kind == "subscribe":
            if self.router.verifies_subscriptions:
                self._unverified.append(reply)
                if self._verifier is None and self._connection is not None:
                    self._verifier = asyncio.create_task(
                        self._verify(self._connection), name="hub-verify"
                    )
            else:
                self._accept(reply)

    def _accept(self, reply: list[Any]) -> None:
        """A confirmation that counts: the subscription holds."""
        if reply[0] == "ssubscribe":
            self._confirmed(reply[1])
        elif reply[1] == self.owner.hub_channel and not self.up:
            # Sent last with every channel of this connection: they all hold now.
            self.up = True
            self._failures = 0  # connected again: the next loss starts over
            self.owner.link_up(self)
            self.was_up = True

    async def _verify(self, connection: AbstractConnection) -> None:
        """Accept the held confirmations once the server has passed the router's ``verify``
        after them; if it fails, drop the connection (the listener reconnects after routing
        the channels again, and the streams whose subscription held catch up then)."""
        try:
            while self._unverified and self._connection is connection:
                held = len(self._unverified)
                await self.router.verify(self.address)
                if self._connection is not connection:
                    return
                # What arrived meanwhile stays held: it waits for the next verification if a
                # confirmation is among it, else it goes out with these.
                later = self._unverified[held:]
                cut = next((i for i, r in enumerate(later) if r[0] != "smessage"), len(later))
                replies, self._unverified = self._unverified[: held + cut], later[cut:]
                messages: list[tuple[str, str]] = []
                for reply in replies:
                    if reply[0] == "smessage":
                        messages.append((reply[1], reply[2]))
                        continue
                    if messages:
                        self.owner.dispatch_many(messages)
                        messages = []
                    self._accept(reply)
                if messages:
                    self.owner.dispatch_many(messages)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("hub: %s failed its check (%s); reconnecting", self.address, exc)
            await connection.disconnect()
        finally:
            if self._verifier is asyncio.current_task():
                self._verifier = None

    async def _run(self) -> None:
        while True:
            connection: AbstractConnection | None = None
            try:
                if self._failures:
                    await self.owner.reroute(self)  # a replica may serve the slots now
                if not self.channels and not self.standing:
                    self.owner.link_ended(self)
                    return
                connection = self.router.connection(self.address)
                await connection.connect()  # type: ignore[no-untyped-call]
                await self.router.check(connection)  # on a cluster, a primary only
                self._connected(connection)
                await self._listen(connection)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._disconnected()
                self._failures += 1
                delay = RECONNECT_BACKOFF.delay(self._failures)
                logger.warning(
                    "hub: pub/sub connection %s lost (%s); retrying in %.1fs",
                    self.address or "to Redis",
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
            finally:
                if connection is not None:
                    if self._connection is connection:
                        self._disconnected()
                    try:
                        await connection.disconnect()
                    except Exception:
                        logger.debug("hub: closing the pub/sub connection failed", exc_info=True)

    async def _listen(self, connection: AbstractConnection) -> None:
        while True:
            reply = await connection.read_response(
                timeout=None, disconnect_on_error=False, push_request=True
            )
            if not isinstance(reply, list):
                continue
            batch: list[tuple[str, str]] = []
            self._handle(reply, batch)
            if not batch:
                continue
            # Take what else has arrived already: under load the fan-out writes several events
            # to each client at once instead of one by one.
            while len(batch) < MAX_BATCH:
                more = await connection.read_response(
                    timeout=0, disconnect_on_error=False, push_request=True
                )
                if more is None:
                    break
                if isinstance(more, list):
                    self._handle(more, batch)
            try:
                self.owner.dispatch_many(batch)
            except Exception:
                logger.exception("hub: could not dispatch a message")


def _other(command: str) -> str:
    return UNSUBSCRIBE if command == SUBSCRIBE else SUBSCRIBE
