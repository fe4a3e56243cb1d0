"""A step's streamed text: ``async with ctx.output() as out: await out.write(delta)``.

Each delta is stored as an ``output`` event, ``{step, text, offset, attempt}``, where ``offset``
counts the characters (Unicode code points) of the step's text before the delta. Deltas written
within ``STEPSTREAM_OUTPUT_INTERVAL_SECONDS`` of the last event are gathered into the next one,
so a model that writes a token at a time makes tens of events per reply, not thousands.

Storage. The record keeps ``steps[i].text``, but rewriting the record's ``steps`` on every
delta would cost the whole record per delta. The text of the step being written lives instead
in one string key per job (``Keys.job_text``), ``<step index>\\n<text>``, which each ``output``
event's append extends with APPEND in the same atomic script as the event itself. A step's
begin empties it; its end folds the text into ``steps[i].text`` (one rewrite per step) and
deletes it. ``JobStore.get`` reads record and key in one MULTI and merges them
(``with_live_text``), so a snapshot's text is exactly the text of the events up to its
``last_event_id``, and the deltas after that id continue it at its length.

A step that runs again (a retry, a crash takeover) starts its text over: its first delta has
``offset`` 0 and the new ``attempt``. A checkpointed step that finished is restored with its
text, and nothing is streamed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable

from stepstream.tasks.commands import Command
from stepstream.tasks.models import JobRecord

# Text waiting for its event is sent at once when it reaches this, whatever the interval; an
# event never carries more (a larger write is split): the buffer is bounded, and so is an event.
MAX_DELTA_CHARS = 16_384


def text_commands(key: str, index: int, delta: str, offset: int, ttl: int) -> list[Command]:
    """What an ``output`` event's append runs with it: the first delta of a step's text
    replaces what the key held (an earlier step's, or an earlier attempt's), later ones extend
    it."""
    write = (
        Command("SET", [key], (f"{index}\n{delta}",))
        if offset == 0
        else Command("APPEND", [key], (delta,))
    )
    return [write, Command("EXPIRE", [key], (ttl,))]


def with_live_text(record: JobRecord | None, raw: str | None) -> JobRecord | None:
    """``record`` with the text of its step being written (the job's text key) merged in.

    The key names its step; a step that ended has its own text in the record already, so the
    key is only used for a step that has none.
    """
    if record is None or not raw:
        return record
    head, _, text = raw.partition("\n")
    try:
        index = int(head)
    except ValueError:
        return record
    if 1 <= index <= len(record.steps) and record.steps[index - 1].text is None:
        record.steps[index - 1].text = text
    return record


class StepText:
    """The text one step writes: what has been stored, and what waits for its event.

    ``emit(delta, offset)`` queues one ``output`` event (it does not wait for Redis; see
    tasks/writer.py). Deltas are sent at most once per ``interval`` seconds: a write after a
    quiet spell goes at once, writes in between are gathered and go when the interval is up.
    """

    def __init__(self, emit: Callable[[str, int], Awaitable[None]], interval: float) -> None:
        self._emit = emit
        self.interval = interval
        self._sent: list[str] = []
        self.offset = 0  # characters stored (queued for storing) so far
        self._buffer: list[str] = []
        self._buffered = 0
        self._last_sent = -math.inf
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def text(self) -> str:
        """The text sent so far (what the log holds), without what waits in the buffer."""
        return "".join(self._sent)

    async def write(self, delta: str) -> None:
        """Add ``delta`` to the step's text. Raises ``JobCancelled`` once the job was cancelled
        (at the latest on the write after the one that found out)."""
        if not isinstance(delta, str):
            raise TypeError(f"output is text: write a str, not {type(delta).__name__}")
        if not delta:
            return
        self._buffer.append(delta)
        self._buffered += len(delta)
        wait = self._last_sent + self.interval - time.monotonic()
        if wait <= 0 or self._buffered >= MAX_DELTA_CHARS:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._send_later(wait), name="output-interval")

    async def flush(self) -> None:
        """Send what waits now (a step's end, the end of an ``output()`` block)."""
        timer, self._timer = self._timer, None
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        async with self._lock:
            if not self._buffer:
                return
            text = "".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            # Before the first await: a write while this is stored waits for the next interval.
            self._last_sent = time.monotonic()
            for start in range(0, len(text), MAX_DELTA_CHARS):
                piece = text[start : start + MAX_DELTA_CHARS]
                offset = self.offset
                self.offset += len(piece)
                self._sent.append(piece)
                await self._emit(piece, offset)

    def discard(self) -> None:
        """Drop what waits (the step failed): only what reached the log is the step's text."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buffer.clear()
        self._buffered = 0

    async def _send_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        # A refused or failed append is remembered by the writer: the task's next event
        # raises it, where the task can see it.
        with contextlib.suppress(Exception):
            await self.flush()
