"""How ``stepstream watch`` and ``stepstream tail`` show events: a live bar on a terminal,
one plain line per event in a pipe or a log, or one JSON object per line."""

from __future__ import annotations

import json
import shutil
import sys
import time
from datetime import datetime
from typing import Any, Protocol, TextIO

from stepstream._models import (
    CancelledEvent,
    ChildEvent,
    CompletedEvent,
    Event,
    FailedEvent,
    InputEvent,
    Job,
    JobState,
    LogEvent,
    OutputEvent,
    ProgressEvent,
    QueuedEvent,
    ResetEvent,
    RetryingEvent,
    SnapshotEvent,
    StartedEvent,
    Step,
    StepCompletedEvent,
    StepEvent,
    WaitingEvent,
    event_json,
)

REDRAW_INTERVAL = 0.05  # seconds: a burst of progress events redraws the bar 20 times a second


class Renderer(Protocol):
    def show(self, event: Event) -> None: ...

    def close(self) -> None:
        """Leave the output tidy (end a half-drawn bar line) before anything else is printed."""


def describe(event: Event) -> str:
    """One line saying what the event means, without the job id."""
    if isinstance(event, QueuedEvent):
        again = " again" if event.data.get("reason") == "retry" else ""
        return f"Queued{again}"
    if isinstance(event, StartedEvent):
        return f"Started attempt {event.attempt} of {event.max_attempts}"
    if isinstance(event, StepEvent):
        return str(event.step)
    if isinstance(event, ProgressEvent):
        return progress_text(event)
    if isinstance(event, StepCompletedEvent):
        how = "restored from an earlier attempt" if event.restored else "done"
        took = (
            f" in {format_ms(event.duration_ms)}"
            if event.duration_ms and not event.restored
            else ""
        )
        return f"✓ {event.step.name} {how}{took}"
    if isinstance(event, LogEvent):
        return f"[{event.level}] {event.message}"
    if isinstance(event, OutputEvent):
        # One line per event, whatever the text holds (the firehose's ``tail``).
        return f"{event.step.name} +{json.dumps(event.text, ensure_ascii=False)}"
    if isinstance(event, RetryingEvent):
        error = f": {event.error}" if event.error else ""
        when = f"; next attempt at {event.retry_at}" if event.retry_at else ""
        return f"Attempt {event.attempt} failed{error}{when}"
    if isinstance(event, WaitingEvent) and event.children is not None:
        left = event.children.get("size", 0) - event.children.get("done", 0)
        return f"Waiting for {left} child job{'s' if left != 1 else ''}"
    if isinstance(event, ChildEvent):
        return child_text(event)
    if isinstance(event, WaitingEvent):
        prompt = f": {event.prompt}" if event.prompt else ""
        until = f" (until {event.timeout_at})" if event.timeout_at else ""
        return f"Waiting for input {event.name!r}{prompt}{until}"
    if isinstance(event, InputEvent):
        return f"Input {event.name!r} given by {event.by}; resuming"
    if isinstance(event, CompletedEvent):
        return "Completed"
    if isinstance(event, FailedEvent):
        return f"Failed: {event.error}" if event.error else "Failed"
    if isinstance(event, CancelledEvent):
        return f"Cancelled: {event.reason}" if event.reason else "Cancelled"
    if isinstance(event, SnapshotEvent):
        return describe_job(event.job)
    if isinstance(event, ResetEvent):
        return f"Some events were missed ({event.reason}); continuing from the current state"
    return f"{event.type} {json.dumps(event.data, ensure_ascii=False)}"


def describe_job(job: Job) -> str:
    parts = [f"{job.task} is {job.state.value}"]
    if job.step is not None and not job.finished:
        parts.append(str(job.step))
    if job.message:
        parts.append(job.message)
    return " · ".join(parts)


def child_text(event: ChildEvent) -> str:
    """A child job's start or end, as its parent's stream tells it."""
    child = event.child
    name = f"Child {child.get('index')} ({child.get('task') or child.get('id')})"
    if child.get("state") == "running":
        return f"{name} started"
    return f"{name} {child.get('state')}" + (f" · {event.message}" if event.message else "")


def progress_text(event: ProgressEvent) -> str:
    counts = f"{_number(event.current)} of {_number(event.total)}" if event.total else ""
    text = event.message or counts
    fraction = event.fraction
    return f"{text} ({fraction:.0%})" if fraction is not None and text else text


def format_ms(ms: float) -> str:
    if ms < 10:
        return f"{ms:.1f} ms"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def _number(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None


def result_text(result: Any) -> str:
    return json.dumps(result, indent=2, ensure_ascii=False)


class JsonLines:
    """One JSON object per event, ``{"id", "type", "data"}``: for ``jq`` and other programs."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def show(self, event: Event) -> None:
        self.out.write(json.dumps(event_json(event), ensure_ascii=False) + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


class PlainLines:
    """One line per event, no control characters: for pipes, files and CI logs."""

    def __init__(self, out: TextIO, job_id: str | None = None) -> None:
        self.out = out
        self.job_id = job_id  # None: the firehose, where each line names its job
        self.first_started_at: str | None = None
        self.text = StepTextPrinter(self)

    def show(self, event: Event) -> None:
        if self.job_id is None:
            clock = (event.at or "")[11:19] or "--:--:--"
            self._line(f"{clock}  {event.job_id or '-'}  {describe(event)}")
            return
        if self.text.show(event):
            return
        if isinstance(event, StartedEvent) and self.first_started_at is None:
            self.first_started_at = event.at
        if isinstance(event, QueuedEvent):
            self._line(f"{describe(event)}: job {event.job_id}")
        elif isinstance(event, StepEvent | FailedEvent | CancelledEvent):
            self._line(describe(event))
        elif isinstance(event, CompletedEvent):
            took = _seconds_between(self.first_started_at, event.at)
            self._line("Completed" + (f" in {format_ms(took * 1000)}" if took is not None else ""))
            self._line(result_text(event.result))
        elif isinstance(event, SnapshotEvent) and event.job.state is JobState.completed:
            self._line(describe(event))
            self._line(result_text(event.job.result))
        elif isinstance(event, SnapshotEvent) and event.job.error and event.job.finished:
            self._line(f"{describe(event)}: {event.job.error}")
        else:
            self._line(f"  {describe(event)}")
        if isinstance(event, SnapshotEvent):
            self.text.resume(event.job)

    def _line(self, text: str) -> None:
        self.text.end_line()
        self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


class StepTextPrinter:
    """A step's streamed text, printed as it arrives: the deltas run on after each other, and
    the next line of any other kind starts on a line of its own. A step that starts over (a new
    attempt) says so and prints its text again."""

    def __init__(self, lines: PlainLines) -> None:
        self.lines = lines
        self.step: int | None = None
        self.printed = 0  # characters of the step's text printed
        self.open = False  # the cursor is after printed text, not at a line's start

    def show(self, event: Event) -> bool:
        """Print ``event`` if it is an ``output`` event; False for any other."""
        if not isinstance(event, OutputEvent):
            return False
        if event.step.index != self.step or event.offset < self.printed:
            again = event.step.index == self.step
            self.lines._line(
                f"  {event.step.name}, attempt {event.attempt}, from the start:"
                if again
                else f"  {event.step.name}:"
            )
            self.step, self.printed = event.step.index, 0
        # A delta past what was printed (a gap in what we were sent) is printed as it is.
        skip = max(0, self.printed - event.offset)
        self._write(event.text[skip:])
        self.printed = max(self.printed, event.offset) + len(event.text) - skip
        return True

    def resume(self, job: Job) -> None:
        """After a snapshot: the text the running step has written so far."""
        if job.finished or job.step is None or not 1 <= job.step.index <= len(job.steps):
            return
        text = job.steps[job.step.index - 1].text
        if text:
            self.lines._line(f"  {job.step.name}:")
            self.step, self.printed = job.step.index, len(text)
            self._write(text)

    def _write(self, text: str) -> None:
        if text:
            self.lines.out.write(text)
            self.lines.out.flush()
            self.open = True

    def end_line(self) -> None:
        if self.open:
            self.open = False
            self.lines.out.write("\n")


class TerminalBar(PlainLines):
    """Finished steps as lines, and one live line redrawn in place:

    ``[█████████░░░░░░░░░░░░░░░]  38%  Step 3 of 7 · Embedding chunks — Embedded 12 of 50``
    """

    BAR_WIDTH = 24

    def __init__(self, out: TextIO, job_id: str) -> None:
        super().__init__(out, job_id)
        self.step: Step | None = None
        self.step_fraction = 0.0
        self.message = ""
        self.status = "Waiting for the job to start"
        self.drawn = False
        self.last_draw = 0.0
        encoding = (getattr(out, "encoding", None) or "").lower()
        self.fill, self.empty = ("█", "░") if "utf" in encoding else ("#", "-")

    def show(self, event: Event) -> None:
        if isinstance(event, StartedEvent) and self.first_started_at is None:
            self.first_started_at = event.at
        if isinstance(event, OutputEvent):
            self._clear()  # the text is the live line while it is written
            self.text.show(event)
            return
        if isinstance(event, SnapshotEvent):
            job = event.job
            self.step, self.message = job.step, job.message or ""
            self._roll_up(job.progress)
            if job.finished:
                super().show(event)
                return
            self.status = describe_job(job)
            self.text.resume(job)
            self._draw(force=True)
        elif isinstance(event, QueuedEvent):
            self.status = f"Queued: job {event.job_id}"
            self._draw(force=True)
        elif isinstance(event, StartedEvent):
            self.status = describe(event)
            self._draw(force=True)
        elif isinstance(event, StepEvent):
            self.step, self.step_fraction, self.message = event.step, 0.0, ""
            self._draw(force=True)
        elif isinstance(event, ProgressEvent):
            self.step_fraction = event.fraction or self.step_fraction
            self.message = progress_text(event)
            self._draw()
        elif isinstance(event, StepCompletedEvent):
            self.step, self.step_fraction, self.message = event.step, 1.0, ""
            if event.restored:
                took = " · restored from an earlier attempt"
            else:
                took = f" · {format_ms(event.duration_ms)}" if event.duration_ms else ""
            self._print(f"✓ {event.step}{took}")
            self._draw(force=True)
        elif isinstance(event, ChildEvent):
            # A parent's bar: its children's ends roll up into it (their starts draw nothing).
            if event.counts is not None:
                self._roll_up(event.progress)
                self.message = event.message or self.message
                self._draw()
        elif isinstance(event, LogEvent | RetryingEvent | ResetEvent | WaitingEvent | InputEvent):
            self._print(f"  {describe(event)}")
            self._draw(force=True)
        else:  # the end: completed, failed, cancelled
            self._clear()
            super().show(event)

    def _roll_up(self, progress: float | None) -> None:
        """Take the job's overall ``progress`` as the fraction of its current step."""
        if progress is None or self.step is None or not self.step.count:
            return
        inside = progress * self.step.count - (self.step.index - 1)
        self.step_fraction = max(0.0, min(1.0, inside))

    def _overall(self) -> float:
        if self.step is None or not self.step.count:
            return 0.0
        return min(1.0, (self.step.index - 1 + self.step_fraction) / self.step.count)

    def _draw(self, force: bool = False) -> None:
        if self.text.open:
            return  # drawn again on the line after the text
        now = time.monotonic()
        if not force and now - self.last_draw < REDRAW_INTERVAL:
            return
        self.last_draw = now
        overall = self._overall()
        filled = round(overall * self.BAR_WIDTH)
        bar = self.fill * filled + self.empty * (self.BAR_WIDTH - filled)
        what = str(self.step) if self.step else self.status
        if self.message:
            what += f" — {self.message}"
        line = f"[{bar}] {overall:4.0%}  {what}"
        # Never wrap: a wrapped line cannot be redrawn in place.
        width = shutil.get_terminal_size((80, 24)).columns - 1
        if len(line) > width:
            line = line[: max(0, width - 1)] + "…"
        self.out.write("\r\033[K" + line)
        self.out.flush()
        self.drawn = True

    def _clear(self) -> None:
        if self.drawn:
            self.out.write("\r\033[K")
            self.out.flush()
            self.drawn = False

    def _print(self, text: str) -> None:
        self._clear()
        self._line(text)

    def close(self) -> None:
        self._clear()


def make_renderer(mode: str, job_id: str | None, out: TextIO | None = None) -> Renderer:
    """``mode``: ``json``, ``plain`` or ``auto`` (a bar when ``out`` is a terminal)."""
    out = out or sys.stdout
    if mode == "json":
        return JsonLines(out)
    if mode == "auto" and job_id is not None and out.isatty():
        return TerminalBar(out, job_id)
    return PlainLines(out, job_id)
