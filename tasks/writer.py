"""A running job's events on their way to the store, in order, several per round trip under load.

A task that reports progress in a tight loop would otherwise wait one Redis round trip per
event. Here an event that follows the task's previous one within ``BURST_GAP`` does not wait:
while one append is answered, the events that follow gather and go together in ONE
``append_many`` (one script call, one precondition check). An event after a longer gap, which
is every event of a task doing real work between events, is stored before ``progress()``
returns, with the rest of any burst before it, so a task that then blocks the event loop with
synchronous work does not hold that progress back. The last events of a burst followed at once
by such blocking work wait for the task's next await (CPU work belongs in ``asyncio.to_thread``,
which the job's lease needs anyway). The buffer is bounded, and a task that outruns Redis waits
for room. Events that mark a durable point (a step's start and end, LLM spending, the job's
end) wait for everything before them to be stored. A step's ``output`` deltas (tasks/output.py)
go like progress, already gathered to at most one per interval, each with the command that
extends the step's text key in the same append; the step's end waits for them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from stepstream.tasks.commands import Command
from stepstream.tasks.errors import JobCancelled
from stepstream.tasks.models import JobState
from stepstream.tasks.store import JobStore

MAX_PENDING = 256  # events gathered while one append is answered; more waits for room
# A task's next event this soon after its previous one returned is part of a burst: a tight
# loop comes back within microseconds. An event after shorter work waits at most that work
# for the next call; one after longer work is stored at once.
BURST_GAP = 0.005  # seconds


class _Queued:
    """An event on its way; ``stored_id``: its log id, once stored, for an event waited on."""

    __slots__ = ("event", "fields", "stored_id", "then", "waited")

    def __init__(
        self, event: dict[str, Any], fields: dict[str, Any], then: Sequence[Command], waited: bool
    ) -> None:
        self.event = event
        self.fields = fields
        self.then = then
        self.waited = waited
        self.stored_id: str | None = None


class EventWriter:
    def __init__(self, store: JobStore, job_id: str, owner: str | None) -> None:
        self.store = store
        self.job_id = job_id
        self.owner = owner
        self._pending: list[_Queued] = []
        self._sending: asyncio.Task[None] | None = None
        self._refused = False  # a cancel request, or the job left "running" under us
        self._error: BaseException | None = None
        self._last_return = 0.0

    async def write(
        self,
        event: dict[str, Any],
        fields: dict[str, Any],
        *,
        wait: bool,
        then: Sequence[Command] = (),
    ) -> str | None:
        """Queue ``event``; with ``wait``, return once it (and all before it) is stored, with
        its id in the log (None without ``wait``).
        ``then``: commands stored with it (in the same append), such as a step's text.

        Raises ``JobCancelled`` once an append was refused, and the store's error once one
        failed: the task stops at its next event, as it would if it had waited for each.
        """
        self._raise_if_stopped()
        in_burst = time.monotonic() - self._last_return < BURST_GAP
        queued = _Queued(event, fields, then, wait)
        self._pending.append(queued)
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send_all(), name=f"events:{self.job_id}")
        if wait or not in_burst or len(self._pending) >= MAX_PENDING:
            await self.flush()
        else:
            await asyncio.sleep(0)  # lets the sender move this event towards the wire
        self._last_return = time.monotonic()
        return queued.stored_id

    async def flush(self) -> None:
        """Wait until every queued event is stored; raise as ``write`` does."""
        if self._sending is not None:
            # Shielded: a task cancelled while waiting here must not cut an append in half.
            await asyncio.shield(self._sending)
        self._raise_if_stopped()

    async def settle(self) -> None:
        """Wait for the queued events without raising: before the runtime's own last event."""
        with contextlib.suppress(Exception):  # JobCancelled, or the store's error
            await self.flush()

    def _raise_if_stopped(self) -> None:
        if self._error is not None:
            raise self._error
        if self._refused:
            raise JobCancelled()

    async def _send_all(self) -> None:
        while self._pending and not self._refused and self._error is None:
            # A batch ends at an event waited on: the append answers with its last event's
            # id, which is then that event's (a step's end carries it into its span).
            pending = self._pending
            cut = next((i + 1 for i, q in enumerate(pending) if q.waited), len(pending))
            batch, self._pending = pending[:cut], pending[cut:]
            fields: dict[str, Any] = {}
            commands: list[Command] = []
            for queued in batch:
                fields.update(queued.fields)  # the record keeps the last value of each field
                commands.extend(queued.then)
            try:
                appended = await self.store.append_many(
                    self.job_id,
                    [queued.event for queued in batch],
                    fields,
                    owner=self.owner,
                    mode="update+cancel",
                    expect=(JobState.running,),
                    then=commands,
                )
            except Exception as exc:
                self._error = exc
                break
            if not appended.ok:
                self._refused = True
            else:
                batch[-1].stored_id = appended.job_event_id
        if self._refused or self._error is not None:
            self._pending.clear()  # nothing after a refusal may reach the log
