"""A running job's events on their way to the store, in order, several per round trip under load.

A task that reports progress in a tight loop would otherwise wait one Redis round trip per
event. Here ``progress()`` and ``log()`` only wait until their append is on the wire: while it is
answered, the events that follow gather and go together in ONE ``append_many`` (one script
call, one precondition check). At a human pace nothing gathers and every event is sent as it
comes; the buffer is bounded, and a task that outruns Redis waits for room. Events that mark a
durable point (a step's start and end, LLM spending, the job's end) wait for everything before
them to be stored.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from tasks.errors import JobCancelled
from tasks.models import JobState
from tasks.store import JobStore

MAX_PENDING = 256  # events gathered while one append is answered; more waits for room


class EventWriter:
    def __init__(self, store: JobStore, job_id: str, owner: str | None) -> None:
        self.store = store
        self.job_id = job_id
        self.owner = owner
        self._pending: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self._sending: asyncio.Task[None] | None = None
        self._refused = False  # a cancel request, or the job left "running" under us
        self._error: BaseException | None = None

    async def write(self, event: dict[str, Any], fields: dict[str, Any], *, wait: bool) -> None:
        """Queue ``event``; with ``wait``, return once it (and all before it) is stored.

        Raises ``JobCancelled`` once an append was refused, and the store's error once one
        failed: the task stops at its next event, as it would if it had waited for each.
        """
        self._raise_if_stopped()
        self._pending.append((event, fields))
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send_all(), name=f"events:{self.job_id}")
        if wait or len(self._pending) >= MAX_PENDING:
            await self.flush()
        else:
            await asyncio.sleep(0)  # lets the sender put this event on the wire now

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
            batch, self._pending = self._pending, []
            fields: dict[str, Any] = {}
            for _, event_fields in batch:
                fields.update(event_fields)  # the record keeps the last value of each field
            try:
                appended = await self.store.append_many(
                    self.job_id,
                    [event for event, _ in batch],
                    fields,
                    owner=self.owner,
                    mode="update+cancel",
                    expect=(JobState.running,),
                )
            except Exception as exc:
                self._error = exc
                break
            if not appended.ok:
                self._refused = True
        if self._refused or self._error is not None:
            self._pending.clear()  # nothing after a refusal may reach the log
